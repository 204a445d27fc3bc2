"""Compressing rotated log files: :func:`gzip_file`, a blocking helper.

:class:`~llmproxy.logs.RotatingJSONLog` runs it in the reactor's thread
pool, one backup at a time; it never runs on the reactor thread.
"""

from __future__ import annotations

import gzip
import shutil

__all__ = ["gzip_file"]

#: Bytes copied at a time while compressing.
_CHUNK = 1024 * 1024


def gzip_file(source: str, target: str) -> None:
    """Gzip ``source`` into ``target``, reading and writing in chunks.

    Blocking: run it in a thread, not on the reactor.

    Args:
        source: The file to compress.
        target: The gzip file to create (overwritten if it exists).
    """
    with open(source, "rb") as src, gzip.open(target, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
