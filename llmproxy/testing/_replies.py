"""The fake upstream's canned JSON replies and the helpers behind them.

Chat completions, Responses API responses, Anthropic messages, embeddings,
the model list, the echo and OpenAI-shaped errors, built as plain dicts from
the request payload.
Private to the package: :mod:`~llmproxy.testing._exchange` and
:mod:`~llmproxy.testing._sse` use the functions, and
:mod:`llmproxy.testing.upstream` re-exports the constants.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from typing import Any

from llmproxy.testing._request import UpstreamRequest

DEFAULT_MODEL = "fake-model"
REPLY_TEXT = "Hello from the llmproxy fake upstream."
EMBEDDING_DIMENSIONS = 8


def error(message: str, kind: str, code: str) -> dict[str, Any]:
    """An OpenAI-shaped error body.

    Args:
        message: The human-readable message.
        kind: The error ``type``, such as ``"invalid_request_error"``.
        code: The error ``code``.
    """
    return {"error": {"message": message, "type": kind, "code": code}}


def split_reply(pieces: int) -> list[str]:
    """Split :data:`REPLY_TEXT` into ``pieces`` roughly equal word pieces."""
    words = re.findall(r"\S+\s*", REPLY_TEXT)
    units = words if pieces <= len(words) else list(REPLY_TEXT)
    n = len(units)
    return ["".join(units[i * n // pieces : (i + 1) * n // pieces]) for i in range(pieces)]


def _words(value: object) -> int:
    """Count the words in strings, lists, messages and text parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _embedding(item: object) -> list[float]:
    """A deterministic vector whose values are exact in float32."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    values = struct.unpack(f"<{EMBEDDING_DIMENSIONS}H", digest[: 2 * EMBEDDING_DIMENSIONS])
    return [value / 32768 - 1 for value in values]


def _model(payload: dict[str, Any]) -> str:
    """The ``model`` of the request body, else :data:`DEFAULT_MODEL`."""
    model = payload.get("model")
    return model if isinstance(model, str) and model else DEFAULT_MODEL


def models() -> dict[str, Any]:
    """The ``GET /v1/models`` reply: one model, :data:`DEFAULT_MODEL`."""
    model = {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "llmproxy"}
    return {"object": "list", "data": [model]}


def echo(record: UpstreamRequest) -> dict[str, Any]:
    """The ``/echo`` reply: the method, uri, headers and body received.

    Args:
        record: The request to echo.
    """

    def text(raw: bytes) -> str:
        return raw.decode("latin-1")

    headers = [
        [text(name).lower(), text(value)]
        for name, values in record.headers.getAllRawHeaders()
        for value in values
    ]
    seen = {"method": text(record.method), "uri": text(record.uri), "headers": headers}
    return {**seen, "body": text(record.body)}


def chat_base(payload: dict[str, Any], serial: int, created: int) -> dict[str, Any]:
    """The fields every chat completion object (or chunk) starts with.

    Args:
        payload: The request body.
        serial: The number of requests recorded, for the id.
        created: The creation time, in whole seconds.
    """
    ident = f"chatcmpl-fake{serial:06d}"
    base: dict[str, Any] = {"id": ident, "object": "chat.completion", "created": created}
    base["model"] = _model(payload)
    return base


def chat_usage(payload: dict[str, Any]) -> dict[str, int]:
    """The chat ``usage``: prompt words (at least 1) and the reply's words."""
    prompt, output = max(1, _words(payload.get("messages"))), len(REPLY_TEXT.split())
    usage = {"prompt_tokens": prompt, "completion_tokens": output}
    usage["total_tokens"] = prompt + output
    return usage


def chat_completion(payload: dict[str, Any], serial: int, created: int) -> dict[str, Any]:
    """A whole (non-streamed) ``chat.completion`` object.

    Args:
        payload: The request body.
        serial: The number of requests recorded, for the id.
        created: The creation time, in whole seconds.
    """
    reply = {"role": "assistant", "content": REPLY_TEXT, "refusal": None}
    choice = {"index": 0, "message": reply, "logprobs": None, "finish_reason": "stop"}
    base = chat_base(payload, serial, created)
    return {**base, "choices": [choice], "usage": chat_usage(payload)}


def response(payload: dict[str, Any], serial: int, created: int) -> dict[str, Any]:
    """A whole (completed) Responses API ``response`` object.

    One assistant message holding :data:`REPLY_TEXT`; the usage counts the
    words of ``input`` and ``instructions`` (at least 1) and of the reply.

    Args:
        payload: The request body.
        serial: The number of requests recorded, for the ids.
        created: The creation time, in whole seconds.
    """
    prompt = max(1, _words(payload.get("input")) + _words(payload.get("instructions")))
    output = len(REPLY_TEXT.split())
    text = {"type": "output_text", "text": REPLY_TEXT, "annotations": []}
    item = {"type": "message", "id": f"msg_fake{serial:06d}", "status": "completed",
            "role": "assistant", "content": [text]}
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }
    instructions = payload.get("instructions")
    return {
        "id": f"resp_fake{serial:06d}",
        "object": "response",
        "created_at": created,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "model": _model(payload),
        "output": [item],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": usage,
        "metadata": {},
    }


def embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/embeddings`` reply: one vector per input, float or base64."""
    raw = payload.get("input", "")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    data = []
    for index, item in enumerate(inputs):
        vector: Any = _embedding(item)
        if payload.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = max(1, sum(_words(i) if isinstance(i, str) else 1 for i in inputs))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": _model(payload), "usage": usage}


def message(payload: dict[str, Any], serial: int) -> dict[str, Any]:
    """A whole Anthropic ``message`` object.

    Args:
        payload: The request body.
        serial: The number of requests recorded, for the id.
    """
    prompt = max(1, _words(payload.get("messages")) + _words(payload.get("system")))
    output = len(REPLY_TEXT.split())
    return {
        "id": f"msg_fake{serial:06d}",
        "type": "message",
        "role": "assistant",
        "model": _model(payload),
        "content": [{"type": "text", "text": REPLY_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": output},
    }
