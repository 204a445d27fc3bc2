"""What the end-to-end tests of keys as policies share.

A gate that holds requests on their way to an upstream (so that requests
admitted together stay in flight together), the admin site of a proxy
(``/budgets`` and ``/metrics``), configs with client keys, raw requests for
clients that hang up, and a trap for secrets in log events.

Fixtures (import them into a test module to use them)::

    from policies import admins, secrets_never_logged  # noqa: F401 (fixtures)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from helpers import fetch
from llmproxy.web import build_site

#: Client keys. None of them may ever show in a log event, an error or
#: ``/metrics``.
KEY_A = "sk-team-a-7Hq2LmSecretA"
KEY_B = "sk-team-b-9Xw4PzSecretB"
KEY_H = "sk-hashed-3Kd8VbSecretH"
KEY_F = "sk-file-5Rt1NcSecretF"
KEY_U = "sk-dollars-2Yp6JsSecretU"
SECRETS = (KEY_A, KEY_B, KEY_H, KEY_F, KEY_U)

URL = "/v1/chat/completions"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}],
        "max_tokens": 6}
#: The fake upstream's usage for CHAT: 4 prompt words and its 6-word reply.
TOKENS = 4 + 6


def tokens_of(size: int) -> int:
    """The proxy's estimate of the tokens in ``size`` bytes (bytes / 4,
    rounded up)."""
    return -(-size // 4)


def ask(body: dict[str, Any]) -> int:
    """What a budgeted request for ``body`` holds while it runs: its input
    (bytes / 4, rounded up) and its ``max_tokens``."""
    return tokens_of(len(json.dumps(body))) + body["max_tokens"]


def bearer(key: str, **more: str) -> dict[str, str]:
    """The Authorization header for ``key``, and ``more`` headers."""
    return {"Authorization": f"Bearer {key}", **more}


def sha256(key: str) -> str:
    """The hex SHA-256 of ``key``, as ``key_sha256`` and keys files take it."""
    return hashlib.sha256(key.encode()).hexdigest()


def team_a(budget: str = "", more: str = "") -> str:
    """team-a's ``auth.keys`` entry, with a budget (YAML) and more fields."""
    fields = f", budget: {budget}" if budget else ""
    return f"{{key: {KEY_A}, name: team-a{fields}{more}}}"


#: team-b's ``auth.keys`` entry: a name, no policy.
TEAM_B = f"{{key: {KEY_B}, name: team-b}}"


def config(base: str, keys: list[str], extra: str = "") -> str:
    """A proxy sending ``/v1/`` to ``base``, with client keys.

    Args:
        base: The upstream's base URL.
        keys: ``auth.keys`` entries as YAML flow mappings.
        extra: More top-level YAML.

    Returns:
        The config's text.
    """
    entries = "".join(f"    - {entry}\n" for entry in keys)
    return f'target_map:\n  "/v1/": "{base}"\nauth:\n  keys:\n{entries}{extra}'


def raw_post(path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    """A whole HTTP/1.1 POST of ``body`` as JSON, for a raw connection."""
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def no_secret_in(*texts: bytes | str) -> None:
    """No client key in any of ``texts``."""
    for text in texts:
        text = text.decode() if isinstance(text, bytes) else text
        assert not any(secret in text for secret in SECRETS), text[:500]


def error_of(body: bytes) -> dict[str, Any]:
    """The ``error`` of an OpenAI-shaped error body, checked for its shape
    and for secrets."""
    no_secret_in(body)
    error = json.loads(body)["error"]
    assert {"message", "type", "code"} <= set(error), error
    return error


class Gate(Resource):
    """Holds the requests for a resource until it is opened.

    Attributes:
        inner: The resource the requests go to.
        held: The requests held while it is closed, in arrival order.
        is_open: Whether requests go straight through.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        """Let requests through to ``inner`` until :meth:`close`."""
        super().__init__()
        self.inner = inner
        self.held: list[Request] = []
        self.is_open = True

    def render(self, request: Request) -> Any:
        """Pass ``request`` on, or hold it while closed."""
        if self.is_open:
            return self.inner.render(request)
        self.held.append(request)
        return NOT_DONE_YET

    def close(self) -> None:
        """Hold the requests that come from now on."""
        self.is_open = False

    def open(self) -> None:
        """Pass on the held requests, and those that come later."""
        self.is_open = True
        held, self.held = self.held, []
        for request in held:
            self.inner.render(request)


class Admin:
    """A proxy's admin site on loopback.

    Attributes:
        url: Its base URL.
    """

    def __init__(self, reactor: Any, client: Any, url: str) -> None:
        """Ask the admin site at ``url`` with ``client``."""
        self.reactor, self.client, self.url = reactor, client, url

    async def budgets(self) -> tuple[dict[str, dict[str, Any]], bytes]:
        """``GET /budgets``: each named key's row by name, and the body
        (checked to show no client key)."""
        response, body = await fetch(self.client, self.reactor, self.url + "/budgets",
                                     method=b"GET")
        assert response.code == 200
        no_secret_in(body)
        return {row["name"]: row for row in json.loads(body)["keys"]}, body

    async def budget(self, name: str) -> dict[str, Any]:
        """The ``/budgets`` row of the key named ``name``."""
        return (await self.budgets())[0][name]

    async def metrics(self) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
        """``GET /metrics``: the samples by name and sorted labels, and the
        text (checked to show no client key)."""
        response, body = await fetch(self.client, self.reactor, self.url + "/metrics",
                                     method=b"GET")
        assert response.code == 200
        text = body.decode()
        no_secret_in(text)
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples, text

    async def sample(self, name: str, **labels: str) -> float | None:
        """One sample of ``/metrics`` by its name and all its labels."""
        samples, _ = await self.metrics()
        return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def admins(reactor: Any, loopback: Any, client: Any) -> Any:
    """``await admins(gateway)``: that gateway's admin site on loopback."""

    async def serve(gateway: Any) -> Admin:
        site = build_site(gateway.config, reactor, gateway.admin_resource())
        return Admin(reactor, client, await loopback(site))

    return serve


@pytest.fixture(autouse=True)
def secrets_never_logged() -> Iterator[list[str]]:
    """Fail the test if a client key shows in any log event (its message
    or any of its fields); yields the events' texts."""
    texts: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        texts.append((formatEvent(event) or "") + json.dumps(event, default=repr))

    globalLogPublisher.addObserver(observe)
    yield texts
    globalLogPublisher.removeObserver(observe)
    for secret in SECRETS:
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"a client key was logged: {leaks[0][:500]}"
