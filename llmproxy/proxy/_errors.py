"""OpenAI-shaped error answers, and what an upstream failure was."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.server import Request

from llmproxy.config import TimeoutsConfig
from llmproxy.egress import TLSHandshakeTimeout, TLSSetupError, TunnelError, TunnelTimeout


class ResponseHeaderTimeout(Exception):
    """The upstream sent no response head within ``timeouts.response_header``."""


def error_body(message: str, type_: str, code: str, request_id: str) -> bytes:
    """Render an error in the OpenAI shape.

    Args:
        message: What went wrong, for a person.
        type_: The error type (``invalid_request_error``, ``upstream_error``).
        code: A stable machine-readable code.
        request_id: The request's id.

    Returns:
        The JSON body ``{"error": {"message", "type", "code", "request_id"}}``.
    """
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": type_,
                "code": code,
                "request_id": request_id,
            }
        }
    ).encode("utf-8")


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (``Too Many Requests``).

    twisted.web's own table lacks some (429, 431 are "Unknown Status");
    Python's has a few of RFC 9110's older names, replaced here.
    """
    phrase = _RFC9110_PHRASES.get(status)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown Status"


# Where RFC 9110 renamed a status that Python's HTTPStatus still names the
# old way.
_RFC9110_PHRASES = {
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    422: b"Unprocessable Content",
}


def write_raw_error(
    transport: Any, status: int, message: str, type_: str, code: str, rid: str
) -> None:
    """Answer on a connection with no request to answer through, then close it.

    For what is refused before twisted.web has a whole request (a body over
    the limit, a request too slow to arrive, a head too large): a complete
    HTTP/1.1 response with a JSON error and ``Connection: close``.

    Args:
        transport: The client's connection.
        status: The HTTP status code.
        message: What went wrong.
        type_: The error type.
        code: The error code.
        rid: The request id.
    """
    body = error_body(message, type_, code, rid)
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"X-Request-ID: %s\r\n"
        b"Connection: close\r\n\r\n"
        % (status, reason_phrase(status), len(body), rid.encode("ascii"))
    )
    transport.write(head + body)
    transport.loseConnection()


def send_error(
    request: Request, status: int, message: str, type_: str, code: str, rid: str
) -> None:
    """Answer a request with a JSON error and finish it.

    Args:
        request: The downstream request.
        status: The HTTP status code.
        message: What went wrong.
        type_: The error type.
        code: The error code.
        rid: The request id.
    """
    body = error_body(message, type_, code, rid)
    request.setResponseCode(status, reason_phrase(status))
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.setRawHeaders(b"x-request-id", [rid.encode("ascii")])
    request.write(body)
    request.finish()


_WRAPPERS = (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)


def causes(failure: Failure) -> list[Failure]:
    """The root failures inside Twisted's wrapper exceptions."""
    if failure.check(*_WRAPPERS):
        reasons = getattr(failure.value, "reasons", None) or []
        found = [cause for reason in reasons for cause in causes(reason)]
        if found:
            return found
    return [failure]


def describe_failure(failure: Failure) -> str:
    """One line about why an upstream exchange failed."""
    texts = []
    for cause in causes(failure):
        value = cause.value
        text = " ".join(str(value).split()) or type(value).__name__
        if text not in texts:
            texts.append(text[:300])
    return "; ".join(texts)


def is_tls_failure(failure: Failure) -> bool:
    """Whether ``failure`` is a TLS error (handshake, certificate, name)."""
    return failure.check(SSL.Error, VerificationError) is not None


def classify_failure(
    failure: Failure, where: str | None, timeouts: TimeoutsConfig
) -> tuple[int, str, str]:
    """Map an upstream failure to the client's error.

    Args:
        failure: Why the attempt failed.
        where: The upstream's base URL, for the message.
        timeouts: The configured time limits, for the message.

    Returns:
        ``(status, code, message)``.
    """
    if failure.check(ResponseHeaderTimeout):
        return (
            504,
            "upstream_timeout",
            f"upstream {where} sent no response headers within "
            f"{timeouts.response_header:g} s",
        )
    found = causes(failure)
    for cause in found:
        if cause.check(TLSSetupError):
            return 502, "upstream_tls_error", str(cause.value)
        if cause.check(TLSHandshakeTimeout):
            return 504, "upstream_connect_timeout", str(cause.value)
        if cause.check(TunnelTimeout):
            return 504, "upstream_proxy_timeout", str(cause.value)
        if cause.check(TunnelError):
            return 502, "upstream_proxy_error", str(cause.value)
        if is_tls_failure(cause):
            return 502, "upstream_tls_error", (
                f"TLS to upstream {where} failed (bad or untrusted certificate?): "
                f"{describe_failure(cause)}"
            )
        if cause.check(ierror.DNSLookupError):
            return 502, "upstream_dns_error", (
                f"upstream host name of {where} does not resolve"
            )
        if cause.check(ierror.ConnectionRefusedError):
            return 502, "upstream_refused", f"upstream {where} refused the connection"
        if cause.check(ierror.TimeoutError, ierror.TCPTimedOutError):
            return 504, "upstream_connect_timeout", (
                f"connecting to upstream {where} timed out after "
                f"{timeouts.connect:g} s"
            )
    if any(cause.check(ierror.ConnectError) for cause in found):
        return 502, "upstream_unreachable", (
            f"upstream {where} is unreachable: {describe_failure(failure)}"
        )
    return 502, "upstream_failed", (
        f"upstream {where} failed before responding: {describe_failure(failure)}"
    )


def idle_before_body(url: str, stream_idle: float) -> tuple[int, str, str]:
    """The error for an upstream that sent its head, then no body byte
    within ``timeouts.stream_idle``: ``(status, code, message)``."""
    return (504, "upstream_timeout", (
        f"upstream {url} sent its response head, then no body byte for "
        f"{stream_idle:g} s"
    ))
