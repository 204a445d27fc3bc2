"""The console observer: one readable line per event, whatever its fields hold.

Client text (a ``model``, a path, an upstream's error message) reaches
console lines. These tests feed it control characters, line separators and
unencodable text through the real observers, and once through a running
daemon's stdout, and check that every event stays one line that cannot be
mistaken for another.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure

from helpers import collect, send
from llmproxy.logs import console_observer
from llmproxy.proxy._access import ACCESS_FORMAT, new_record
from test_tap import WAIT, demo_config, free_port, spawn_twistd

#: The start of a line a hostile client would like to see on stdout.
FORGED_STAMP = "2026-01-01T00:00:00+0000 [llmproxy.access#info]"

#: A ``model`` that would print a forged access line if printed as it is.
FORGED_MODEL = f"gpt-x\r\n{FORGED_STAMP} POST /forged 200 ok"

#: Characters a console line never holds as they are, and their escapes.
ESCAPES = [
    ("\x00", "\\x00"), ("\t", "\\t"), ("\n", "\\n"), ("\x0b", "\\x0b"),
    ("\x0c", "\\x0c"), ("\r", "\\r"), ("\x1b", "\\x1b"), ("\x1c", "\\x1c"),
    ("\x1f", "\\x1f"), ("\x7f", "\\x7f"), ("\x80", "\\x80"), ("\x85", "\\x85"),
    ("\x9b", "\\x9b"), ("\x9f", "\\x9f"), ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"), ("\u202e", "\\u202e"), ("\u2066", "\\u2066"),
    ("\ud800", "\\ud800"), ("\udc80", "\\udc80"), ("\udfff", "\\udfff"),
]


def utf8_stream() -> io.TextIOWrapper:
    """A strict UTF-8 text stream over bytes, as stdout is under journald.

    Returns:
        The stream; its ``buffer`` holds what was written.
    """
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")


def written(stream: io.TextIOWrapper) -> str:
    """What a stream from :func:`utf8_stream` holds, decoded strictly.

    Args:
        stream: The stream.

    Returns:
        The text written so far.
    """
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode(stream.encoding)


def access(observer: ILogObserver, when: float = 1_790_000_000.5, **fields: Any) -> None:
    """Log an access record as the proxy does, to ``observer``.

    Args:
        observer: The observer.
        when: The record's time.
        **fields: Fields over a fresh record's.
    """
    record = new_record("rid-1", b"POST", b"/v1/chat/completions")
    record.update(status=200, outcome="ok", latency_ms=12.5, upstream="http://up",
                  egress="direct")
    record.update(fields)
    observer({
        **record, "log_namespace": "llmproxy.access", "log_level": LogLevel.info,
        "log_format": ACCESS_FORMAT, "log_time": when, "log_source": None,
    })


def assert_one_line(text: str) -> str:
    """Check that ``text`` is one line by every rule that splits lines.

    ``str.splitlines`` splits at CR, LF, VT, FF, FS, GS, RS, NEL, and the
    line and paragraph separators: more than any log reader does.

    Args:
        text: What an observer wrote for one event.

    Returns:
        The line without its newline.
    """
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_forged_model_stays_in_its_access_line() -> None:
    """A model holding CR LF and a log line prints as one escaped line."""
    stream = io.StringIO()
    access(console_observer("info", stream), model=FORGED_MODEL)
    line = assert_one_line(stream.getvalue())
    assert f"model=gpt-x\\r\\n{FORGED_STAMP} POST /forged 200 ok upstream=" in line
    assert line.endswith(" request_id=rid-1")
    assert not line.startswith(FORGED_STAMP)


def test_a_lone_surrogate_in_the_model_is_printed_escaped() -> None:
    """A lone surrogate gives a line (escaped) on a strict UTF-8 stream."""
    stream = utf8_stream()
    observer = console_observer("info", stream)
    access(observer, model="gpt-\udc80")
    access(observer, model="next")
    text = written(stream)
    first, second = text.splitlines()
    assert " model=gpt-\\udc80 upstream=" in first
    assert " model=next " in second


def test_an_ordinary_access_record_prints_as_before() -> None:
    """A record without unsafe text prints exactly as it always has."""
    stream = utf8_stream()
    when = 1_790_000_000.75
    observer = console_observer("info", stream)
    access(observer, when, model="gpt-4o")
    access(observer, when, model="modèle-中文 C:\\models\\x1b")
    stamp = formatTime(when)
    assert written(stream) == (
        f"{stamp} [llmproxy.access#info] POST /v1/chat/completions 200 ok "
        "12.5ms model=gpt-4o upstream=http://up egress=direct request_id=rid-1\n"
        f"{stamp} [llmproxy.access#info] POST /v1/chat/completions 200 ok "
        "12.5ms model=modèle-中文 C:\\models\\x1b upstream=http://up "
        "egress=direct request_id=rid-1\n"
    )


@pytest.mark.parametrize(("char", "escape"), ESCAPES)
def test_each_unsafe_character_is_escaped_visibly(char: str, escape: str) -> None:
    """Each control, separator, bidi override or surrogate has its escape.

    Args:
        char: An unsafe character.
        escape: What the line shows instead.
    """
    stream = utf8_stream()
    observer = console_observer("info", stream)
    access(observer, model=f"a{char}b")
    Logger(namespace="tests.console", observer=observer).warn(
        "upstream said {message}", message=f"a{char}b"
    )
    text = written(stream)
    assert text.count("\n") == 2
    record, message = text.splitlines()
    assert f" model=a{escape}b " in record
    assert message.endswith(f" [tests.console#warn] upstream said a{escape}b")


def test_a_forged_line_in_any_event_stays_in_its_line() -> None:
    """Client text in an ordinary event (an upstream's message) is escaped."""
    stream = io.StringIO()
    Logger(namespace="tests.console", observer=console_observer("info", stream)).error(
        "upstream {url} said {message} for {path}",
        url="http://up", message=f"bad\n{FORGED_STAMP} forged", path="/v1/\x1b[2Jx",
    )
    line = assert_one_line(stream.getvalue())
    assert line.endswith(
        f"[tests.console#error] upstream http://up said bad\\n{FORGED_STAMP} forged"
        " for /v1/\\x1b[2Jx"
    )


def test_ordinary_events_print_as_twisted_prints_them() -> None:
    """Events without unsafe text give Twisted's classic log text exactly."""
    events: list[dict[str, Any]] = []
    logger = Logger(namespace="tests.console", observer=events.append)
    logger.info("hello {who}", who="world")
    logger.debug("unicode {x}", x="é中")
    events.append({"log_format": "no time", "log_level": LogLevel.info})
    events.append({"log_format": "by system", "log_system": "sys", "log_time": 2.5,
                   "log_level": LogLevel.info})
    events.append({"log_format": "broken {missing}", "log_time": 3.0,
                   "log_level": LogLevel.warn, "log_namespace": "tests.console"})
    events.append({"log_time": 4.0, "log_level": LogLevel.info})  # no text
    try:
        raise ValueError("plain")
    except ValueError:
        logger.failure("it failed")
    for event in events:
        stream = io.StringIO()
        console_observer("debug", stream)(event)
        assert stream.getvalue() == (formatEventAsClassicLogText(event) or "")


def test_a_traceback_carrying_client_text_cannot_forge_a_line() -> None:
    """A failure's traceback stays below its event, every line escaped.

    The exception's message is client text: its LF starts a continuation
    line (indented, as Twisted indents tracebacks), its CR and separators
    are escaped.
    """
    stream = utf8_stream()
    logger = Logger(namespace="tests.console", observer=console_observer("info", stream))
    try:
        raise ValueError(f"evil\r\u2028\n{FORGED_STAMP} forged\udc80")
    except ValueError:
        logger.failure("request {model} failed", model=FORGED_MODEL)
    lines = written(stream).splitlines()
    assert lines[0].endswith(
        f"[tests.console#critical] request gpt-x\\r\\n{FORGED_STAMP} POST /forged 200 ok failed"
    )
    assert all(line.startswith("\t") for line in lines[1:])
    assert "\tTraceback (most recent call last):" in lines
    assert "\tbuiltins.ValueError: evil\\r\\u2028" in lines
    assert f"\t{FORGED_STAMP} forged\\udc80" in lines


def test_an_unobtainable_traceback_is_still_printed() -> None:
    """A log_failure without a traceback gives a note, not an exception."""
    stream = io.StringIO()
    observer = console_observer("info", stream)
    observer({"log_format": "odd {n}", "n": 1, "log_level": LogLevel.error,
              "log_failure": object(), "log_time": 5.0})
    first, second = stream.getvalue().splitlines()
    assert first.endswith(" [-#error] odd 1")
    assert second.startswith("\t(UNABLE TO OBTAIN TRACEBACK FROM EVENT): AttributeError(")


@pytest.mark.parametrize(
    ("encoding", "model", "shown"),
    [
        ("ascii", "café €", "caf\\xe9 \\u20ac"),
        ("latin-1", "café €\r", "café \\u20ac\\r"),
        ("utf-16", "café €\r", "café €\\r"),
        ("cp1252", "café € 中", "café € \\u4e2d"),
    ],
)
def test_text_a_narrow_stream_cannot_hold_is_escaped(
    encoding: str, model: str, shown: str
) -> None:
    """On a stream whose encoding lacks a character, it is escaped.

    Args:
        encoding: The stream's encoding (strict).
        model: The model logged.
        shown: How the line shows it.
    """
    stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict")
    observer = console_observer("info", stream)
    access(observer, model=model)
    Logger(namespace="tests.console", observer=observer).info("m={m}", m=model)
    text = written(stream)
    record, message = text.splitlines()
    assert f" model={shown} upstream=" in record
    assert message.endswith(f" m={shown}")


def test_an_unknown_encoding_is_taken_as_ascii() -> None:
    """A stream naming an encoding Python lacks gets ASCII only."""

    class Odd(io.StringIO):
        """A text stream claiming an encoding nobody knows."""

        encoding = "no-such-codec"  # type: ignore[assignment]

    stream = Odd()
    access(console_observer("info", stream), model="é")
    assert " model=\\xe9 upstream=" in assert_one_line(stream.getvalue())


@given(st.text(st.characters(blacklist_categories=())))
def test_any_text_gives_one_encodable_line(text: str) -> None:
    """Whatever a field holds, each event is one line a strict stream takes.

    Args:
        text: Any text, surrogates and controls included.
    """
    stream = utf8_stream()
    observer = console_observer("info", stream)
    access(observer, model=text)
    Logger(namespace="tests.console", observer=observer).info("said {t}", t=text)
    lines = written(stream).splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" request_id=rid-1")
    assert " said " in lines[1]


@pytest_twisted.ensureDeferred
async def test_the_daemon_prints_forged_models_on_one_escaped_line(
    reactor: Any, tmp_path: Path, client: Any
) -> None:
    """twistd's stdout: a forged model and a lone surrogate, one line each."""
    port, demo_port = free_port(), free_port()
    config = demo_config(
        tmp_path / "console.yml", port, demo_port,
        # A model route makes the proxy read (and log) each request's model.
        f'model_routes: {{"demo": "http://127.0.0.1:{demo_port}"}}\n'
        "log: {console_access: true}\n",
    )
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for model in (FORGED_MODEL, "lone-\udc80", "demo"):
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
            response = await send(client, reactor, url, body)
            await collect(response).done.addTimeout(WAIT, reactor)
        await process.wait_for(b" model=demo ").addTimeout(WAIT, reactor)
    finally:
        if not process.ended.called:
            process.transport.signalProcess("TERM")
        await process.ended.addTimeout(WAIT, reactor)
    lines = process.output.decode("utf-8").splitlines()
    records = [line for line in lines if "[llmproxy.access#info]" in line]
    assert len(records) == 3, lines
    assert f" model=gpt-x\\r\\n{FORGED_STAMP} POST /forged 200 ok upstream=" in records[0]
    assert " model=lone-\\udc80 upstream=" in records[1]
    assert not [line for line in lines if line.startswith(FORGED_STAMP)]
    assert "Traceback" not in process.output.decode("utf-8")
    # Each upstream connection's client factory starting and stopping is
    # debug chatter, not info an operator reads.
    assert "factory" not in process.output.decode("utf-8").lower(), lines
