"""Prometheus instruments (served by :class:`llmproxy.web.MetricsResource`).

:class:`Metrics` holds every instrument in a registry of its own and counts
a finished request from its access record. With ``workers: N`` above 1 the
instruments use prometheus_client's multiprocess mode: each process writes
its values to files in the directory named by :data:`MULTIPROC_DIR_ENV`
(made per run by :mod:`llmproxy.workers`), and the first process's
``/metrics`` reads them all (:attr:`Metrics.multiprocess_dir`).
prometheus_client chooses that mode once, when it is first imported, so it
is imported lazily: only when the first :class:`Metrics` is built, after the
daemon has set the variable.

Importing this package has no side effects: no reactor is installed, and
prometheus_client is not imported.
"""

from __future__ import annotations

from llmproxy.metrics._instruments import REFUSALS, Metrics
from llmproxy.metrics._labels import BoundedLabels
from llmproxy.metrics._process import MULTIPROC_DIR_ENV, forget_process, multiprocess_possible

__all__ = [
    "MULTIPROC_DIR_ENV",
    "REFUSALS",
    "BoundedLabels",
    "Metrics",
    "forget_process",
    "multiprocess_possible",
]
