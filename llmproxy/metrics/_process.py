"""Metrics shared by several worker processes, and the DNS cache's counters.

prometheus_client's multiprocess mode: each process writes its values to
files in the directory named by :data:`MULTIPROC_DIR_ENV`, and the first
process's ``/metrics`` reads them all. prometheus_client chooses that mode
once, when it is first imported, so it is imported lazily here.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmproxy.config import Config

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily

#: The environment variable that puts prometheus_client in multiprocess mode
#: (read when it is first imported, and when each value is created).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_possible() -> bool:
    """Say whether prometheus_client can still run in multiprocess mode here.

    Returns:
        True when prometheus_client is not imported yet (setting
        :data:`MULTIPROC_DIR_ENV` now is in time), or was imported in
        multiprocess mode; False when it was imported without the variable
        and keeps every value in this process's memory.
    """
    values = sys.modules.get("prometheus_client.values")
    if values is None:
        return True
    return values.ValueClass is not values.MutexValue


def forget_process(pid: int, path: str) -> None:
    """Drop an ended process's live gauges from the shared metrics.

    prometheus_client's ``mark_process_dead``: its ``livesum`` gauges (in
    flight, connections) stop counting; its counters and histograms stay in
    the sums.

    Args:
        pid: The process that ended.
        path: The multiprocess directory.
    """
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, path)


def multiprocess_dir_for(config: Config) -> str | None:
    """The multiprocess directory these instruments should use, if any.

    Args:
        config: ``workers`` above 1 asks for the shared files.

    Returns:
        The directory, when ``workers`` is above 1, :data:`MULTIPROC_DIR_ENV`
        names a directory and prometheus_client runs in multiprocess mode;
        else None (this process's values, served as they are).
    """
    if getattr(config, "workers", 1) <= 1:
        return None
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if not path or not os.path.isdir(path) or not multiprocess_possible():
        return None
    return path


class DNSCollector:
    """Reports the caching resolver's hit and miss counters.

    A prometheus_client collector (its ``Collector`` is a protocol: a
    ``collect`` method is all it takes).
    """

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self._base = {"hits": 0, "misses": 0}
        self._seen: Any = None
        # Scrapes run in the reactor's thread pool, possibly two at once.
        self._lock = threading.Lock()

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Yield the hit and miss counters (monotonic across reloads)."""
        from prometheus_client.core import CounterMetricFamily

        with self._lock:
            resolver = self.resolver
            if resolver is not self._seen:
                # A reload brought a new cache: keep the counters monotonic.
                if self._seen is not None:
                    for name in self._base:
                        self._base[name] += getattr(self._seen, name, 0)
                self._seen = resolver
            hits = self._base["hits"] + getattr(resolver, "hits", 0)
            misses = self._base["misses"] + getattr(resolver, "misses", 0)
        yield CounterMetricFamily(
            "llmproxy_dns_cache_hits", "DNS lookups answered from the cache.", value=hits
        )
        yield CounterMetricFamily(
            "llmproxy_dns_cache_misses", "DNS lookups that needed a query.", value=misses
        )
