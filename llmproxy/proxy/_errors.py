"""OpenAI-shaped error answers, and what an upstream failure was."""

from __future__ import annotations

import json

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.server import Request


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
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.setRawHeaders(b"x-request-id", [rid.encode("ascii")])
    request.write(body)
    request.finish()


_WRAPPERS = (ResponseFailed, ResponseNeverReceived)


def _causes(failure: Failure) -> list[Failure]:
    """The root failures inside Twisted's wrapper exceptions."""
    if failure.check(*_WRAPPERS):
        reasons = getattr(failure.value, "reasons", None) or []
        found = [cause for reason in reasons for cause in _causes(reason)]
        if found:
            return found
    return [failure]


def _describe_failure(failure: Failure) -> str:
    """One line about why an upstream exchange failed."""
    texts = []
    for cause in _causes(failure):
        value = cause.value
        text = " ".join(str(value).split()) or type(value).__name__
        if text not in texts:
            texts.append(text[:300])
    return "; ".join(texts)


def _is_tls_failure(failure: Failure) -> bool:
    return failure.check(SSL.Error, VerificationError) is not None
