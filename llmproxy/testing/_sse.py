"""The fake upstream's server-sent event streams.

Builds the OpenAI ``chat.completion.chunk`` stream, the OpenAI Responses
API stream and the Anthropic ``messages`` stream as lists of encoded
events, each marked as a content piece or not (``X-Fake-Abort-After``
counts content pieces). Private to the package:
:mod:`~llmproxy.testing._exchange` writes them.
"""

from __future__ import annotations

import json
from typing import Any

from llmproxy.testing._replies import chat_base, chat_usage, split_reply

#: Encoded events, each with whether it is a content piece.
Events = list[tuple[bytes, bool]]


def _sse(data: object, event: str | None = None) -> bytes:
    """Encode one event: an optional ``event:`` line and a JSON ``data:`` line."""
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()


def chat_events(payload: dict[str, Any], serial: int, created: int, pieces: int) -> Events:
    """A streamed chat completion, ending with ``data: [DONE]``.

    Args:
        payload: The request body (``stream_options.include_usage`` adds a
            usage event).
        serial: The number of requests recorded, for the id.
        created: The creation time, in whole seconds.
        pieces: The number of content pieces.

    Returns:
        The events.
    """
    base = chat_base(payload, serial, created)
    usage = chat_usage(payload)
    base["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    events = [(chunk({"role": "assistant", "content": ""}), False)]
    events += [(chunk({"content": piece}), True) for piece in split_reply(pieces)]
    events.append((chunk({}, "stop"), False))
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append((_sse({**base, "choices": [], "usage": usage}), False))
    return events + [(b"data: [DONE]\n\n", False)]


def message_events(message: dict[str, Any], pieces: int) -> Events:
    """A streamed Anthropic message, from ``message_start`` to ``message_stop``.

    Args:
        message: The whole message, as :func:`~llmproxy.testing._replies.message` builds it.
        pieces: The number of ``content_block_delta`` pieces.

    Returns:
        The events.
    """
    prompt, output = message["usage"]["input_tokens"], message["usage"]["output_tokens"]
    usage = {"input_tokens": prompt, "output_tokens": 1}
    start = {**message, "content": [], "stop_reason": None, "usage": usage}
    sequence: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
    ]
    for text in split_reply(pieces):
        delta = {"type": "text_delta", "text": text}
        sequence.append(("content_block_delta", {"index": 0, "delta": delta}))
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    sequence.append(("content_block_stop", {"index": 0}))
    sequence.append(("message_delta", {"delta": stop, "usage": {"output_tokens": output}}))
    sequence.append(("message_stop", {}))
    return _typed(sequence, "content_block_delta")


def response_events(response: dict[str, Any], pieces: int) -> Events:
    """A streamed Responses API response, from ``response.created`` to
    ``response.completed`` (which carries the whole response and its usage).

    Args:
        response: The completed response, as
            :func:`~llmproxy.testing._replies.response` builds it.
        pieces: The number of ``response.output_text.delta`` pieces.

    Returns:
        The events, numbered by ``sequence_number``.
    """
    item = response["output"][0]
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    started = {**item, "status": "in_progress", "content": []}
    sequence: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": pending}),
        ("response.in_progress", {"response": pending}),
        ("response.output_item.added", {"output_index": 0, "item": started}),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
    ]
    for text in split_reply(pieces):
        sequence.append(("response.output_text.delta", {**where, "delta": text, "logprobs": []}))
    sequence += [
        ("response.output_text.done", {**where, "text": part["text"], "logprobs": []}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": response}),
    ]
    return _typed(sequence, "response.output_text.delta", numbered=True)


def _typed(
    sequence: list[tuple[str, dict[str, Any]]], piece: str, numbered: bool = False
) -> Events:
    """Encode ``(type, data)`` pairs as events named by their ``type``.

    Args:
        sequence: The events' types and the rest of their data.
        piece: The type of the content pieces.
        numbered: Whether each event's data carries its ``sequence_number``.

    Returns:
        The events.
    """
    events = []
    for number, (name, data) in enumerate(sequence):
        head: dict[str, Any] = {"type": name}
        if numbered:
            head["sequence_number"] = number
        events.append((_sse({**head, **data}, name), name == piece))
    return events
