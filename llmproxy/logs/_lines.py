"""Serialising log events as lines of twisted.logger's JSON format.

:func:`event_line` turns any event into one line, with a fast path for
access records (:data:`ACCESS_NAMESPACE`) and fallbacks for events that
cannot be serialised as they are.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import LogEvent, LogLevel, eventAsJSON


#: The line written when nothing else about an event can be serialised.
_LAST_RESORT = b'{"log_format": "Unserialisable log event", "log_level": null}\n'


def safe_repr(value: object) -> str:
    """``repr(value)``, or a placeholder when ``repr`` itself fails.

    Args:
        value: Any object.

    Returns:
        A string describing ``value``.
    """
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


#: Access records (one per request) get a fast path in both observers.
ACCESS_NAMESPACE = "llmproxy.access"

_LEVEL_JSON = {
    level: json.loads(eventAsJSON({"log_level": level}))["log_level"]
    for level in LogLevel.iterconstants()
}


def _access_line(event: LogEvent) -> bytes | None:
    """An access record as twisted.logger JSON, without its slow path.

    Access records hold only JSON scalars, so ``json.dumps`` of their fields
    (plus the format, namespace, time and level, encoded as ``eventAsJSON``
    does) reads back with ``eventFromJSON`` like any other line.
    """
    names = tuple(event)
    kept = _KEPT.get(names)
    if kept is None:
        kept = [k for k in names if not k.startswith("log_")]
        if len(_KEPT) < 256:  # access records come in a few shapes
            _KEPT[names] = kept
    when = event.get("log_time")
    if type(when) is not float or when != when or when in (_INF, -_INF):
        return None
    # The log_* fields are the same for every record but the time: their
    # JSON is made once per (format, namespace, level) and appended.
    key = (event.get("log_format"), event.get("log_namespace"), event.get("log_level"))
    tail = _TAILS.get(key)
    try:
        if tail is None:
            tail = _ENCODER.encode({
                "log_format": key[0], "log_namespace": key[1],
                "log_level": _LEVEL_JSON.get(key[2]),
            })[1:-1]
            if len(_TAILS) < 64:
                _TAILS[key] = tail
        head = _ENCODER.encode({k: event[k] for k in kept})
    except (TypeError, ValueError):
        return None
    line = f"{head[:-1]}{', ' if kept else ''}{tail}, \"log_time\": {when!r}}}\n"
    return line.encode("utf-8", "backslashreplace")


_INF = float("inf")
# The keys written for each shape (key order) of access record seen.
_KEPT: dict[tuple[str, ...], list[str]] = {}
# The JSON of the constant log_* fields, by (format, namespace, level).
_TAILS: dict[tuple[object, object, object], str] = {}
# json.dumps' defaults, without the circular-reference check (scalars only).
_ENCODER = json.JSONEncoder(check_circular=False)


def event_line(event: LogEvent) -> bytes:
    """Serialise one event as one line of twisted.logger's JSON format.

    The event is not modified. An event that cannot be serialised as it
    is (a format naming a missing field, a value whose ``str`` raises, a
    circular structure) still yields a line: the same event without its
    format, explaining what went wrong, or at least a minimal event with
    its level, namespace and time.

    Args:
        event: A log event.

    Returns:
        UTF-8 JSON followed by ``\\n``, with no newline inside.
    """
    if event.get("log_namespace") == ACCESS_NAMESPACE:
        line = _access_line(event)
        if line is not None:
            return line
    try:
        return (eventAsJSON(dict(event)) + "\n").encode("utf-8", "backslashreplace")
    except Exception as e:
        error = safe_repr(e)
    try:
        fallback = {
            k: v for k, v in event.items() if k not in ("log_format", "log_flattened")
        }
        fallback["log_format"] = (
            "Unable to format event {log_bad_format}: {log_format_error}"
        )
        fallback["log_bad_format"] = safe_repr(event.get("log_format"))
        fallback["log_format_error"] = error
        return (eventAsJSON(fallback) + "\n").encode("utf-8", "backslashreplace")
    except Exception:
        pass
    try:
        minimal: dict[str, Any] = {
            "log_format": "Unable to serialise event: {log_format_error}",
            "log_format_error": error,
        }
        level = event.get("log_level")
        if isinstance(level, type(LogLevel.info)):
            minimal["log_level"] = level
        for key, kind in (("log_namespace", str), ("log_time", (int, float))):
            value = event.get(key)
            if isinstance(value, kind):
                minimal[key] = value
        return (eventAsJSON(minimal) + "\n").encode("utf-8", "backslashreplace")
    except Exception:
        return _LAST_RESORT
