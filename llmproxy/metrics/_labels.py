"""Label values kept bounded: the first names seen, then ``other``."""

from __future__ import annotations

import threading

class BoundedLabels:
    """Gives each of the first ``limit`` distinct names its own label value,
    every later one ``other`` (and no name ``none``).

    Attributes:
        limit: How many names get a label of their own.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def label(self, name: str | None) -> str:
        """The label value for ``name``."""
        if not name:
            return "none"
        if name in self._seen:
            return name
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(name)
                return name
        return "other"
