"""Access records, usage tokens, Prometheus metrics and readiness."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import ResponseFailed

from helpers import collect, fetch, raw_connect, send
from llmproxy.config import parse_config_text
from llmproxy.app import Gateway
from llmproxy.web import build_site

WAIT = 10.0
CHAT = {"model": "gpt-known", "messages": [{"role": "user", "content": "Hello there"}]}


class Served:
    """A proxy with its admin site, both on loopback."""

    def __init__(self, proxy: str, admin: str, root: Any) -> None:
        self.proxy = proxy
        self.admin = admin
        self.root = root


@pytest_twisted.async_yield_fixture
async def served(reactor: Any, upstreams: Any) -> Any:
    """A fake upstream behind a proxy whose admin site is also served."""
    upstream, base = await upstreams.start()
    config = parse_config_text(
        f'target_map:\n  "/v1/": "{base}"\n'
        f'model_routes:\n  "gpt-known": "{base}"\n  "claude-known": "{base}"\n',
        environ={},
    )
    gateway = Gateway(config, reactor)
    gateway.startService()
    root = gateway.resource
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(build_site(config, reactor, root))
    admin_port = await endpoint.listen(build_site(config, reactor, gateway.admin_resource()))
    yield (
        upstream,
        Served(
            f"http://127.0.0.1:{port.getHost().port}",
            f"http://127.0.0.1:{admin_port.getHost().port}",
            root,
        ),
    )
    await port.stopListening()
    await admin_port.stopListening()
    await gateway.stopService()


async def until_logged(reactor: Any, access: Any, count: int) -> None:
    """Wait (bounded) until ``count`` access records exist.

    The record is written when the proxy finishes the response, which may
    be a moment after the client has read it.
    """
    await access.wait(count).addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_access_record_of_a_chat_completion(reactor, served, client, access) -> None:
    """One record per request, with every field and the upstream's usage."""
    upstream, s = served
    response, body = await fetch(
        client, reactor, s.proxy + "/v1/chat/completions", CHAT,
        headers={"X-Request-ID": "acc-1"},
    )
    usage = json.loads(body)["usage"]
    await until_logged(reactor, access, 1)
    (record,) = access
    assert record["request_id"] == "acc-1"
    assert record["client_ip"] == "127.0.0.1"
    assert record["method"] == "POST"
    assert record["path"] == "/v1/chat/completions"
    assert record["status"] == 200
    assert record["model"] == "gpt-known"
    assert record["route"] == "/v1/"
    assert record["upstream"] == upstream_base(upstream, s)
    assert record["bytes_in"] == len(json.dumps(CHAT))
    assert record["bytes_out"] == len(body)
    assert record["stream"] is False
    assert record["outcome"] == "ok"
    assert record["latency_ms"] >= record["ttfb_ms"] >= 0
    assert record["egress"] == "direct"
    assert record["prompt_tokens"] == usage["prompt_tokens"]
    assert record["completion_tokens"] == usage["completion_tokens"]
    assert record["total_tokens"] == usage["total_tokens"]


def upstream_base(upstream: Any, s: Served) -> str:
    """The base URL the served fixture routed to."""
    return s.root.proxy.router.route(b"/v1/x", None).pool.urls[0]


@pytest.mark.parametrize(
    "path, body, expected",
    [
        ("/v1/chat/completions",
         {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, True),
        ("/v1/chat/completions", {**CHAT, "stream": True}, False),
        ("/v1/messages",
         {"model": "claude-known", "max_tokens": 50, "stream": True,
          "messages": [{"role": "user", "content": "Hi you"}]}, True),
    ],
    ids=["openai-usage-chunk", "openai-no-usage", "anthropic"],
)
@pytest_twisted.ensureDeferred
async def test_usage_from_streams(reactor, served, client, access, path, body, expected) -> None:
    """Tokens are read from SSE streams while they pass through."""
    upstream, s = served
    response, data = await fetch(
        client, reactor, s.proxy + path, body, headers={"X-Fake-Chunks": "7"}
    )
    await until_logged(reactor, access, 1)
    (record,) = access
    assert record["stream"] is True
    if expected:
        assert record["completion_tokens"] > 0
        assert record["total_tokens"] == record["prompt_tokens"] + record["completion_tokens"]
    else:
        assert "total_tokens" not in record


@pytest_twisted.ensureDeferred
async def test_outcomes(reactor, served, client, access) -> None:
    """ok, error, upstream_aborted and client_closed are told apart."""
    upstream, s = served
    await fetch(client, reactor, s.proxy + "/nowhere", CHAT)
    response = await send(
        client, reactor, s.proxy + "/v1/chat/completions", {**CHAT, "stream": True},
        headers={"X-Fake-Abort-After": "1"},
    )
    with pytest.raises(ResponseFailed):
        await collect(response).done.addTimeout(WAIT, reactor)
    raw = await raw_connect(
        reactor, s.proxy,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Fake-Header-Delay: 30\r\n\r\n",
    )
    arrived = await upstream.next_request().addTimeout(WAIT, reactor)
    raw.transport.abortConnection()
    await arrived.done.addTimeout(WAIT, reactor)
    await until_logged(reactor, access, 3)
    assert [(r["status"], r["outcome"]) for r in access] == [
        (404, "error"), (200, "upstream_aborted"), (None, "client_closed"),
    ]


async def scrape(client: Any, reactor: Any, admin: str) -> dict[tuple, float]:
    """GET /metrics and parse it with prometheus_client's parser."""
    response, text = await fetch(client, reactor, admin + "/metrics", method=b"GET")
    assert response.code == 200
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """Sum the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_by_model_and_status(
    reactor, served, client, access
) -> None:
    """/metrics parses, and its counts equal the requests made."""
    upstream, s = served
    for _ in range(3):
        await fetch(client, reactor, s.proxy + "/v1/chat/completions", CHAT)
    for _ in range(2):
        await fetch(client, reactor, s.proxy + "/v1/chat/completions",
                    {**CHAT, "model": "never-configured-1"}, headers={"X-Fake-Status": "429"})
    await fetch(client, reactor, s.proxy + "/v1/chat/completions",
                {**CHAT, "model": "never-configured-2"})
    await fetch(client, reactor, s.proxy + "/nowhere", CHAT)
    await until_logged(reactor, access, 7)
    samples = await scrape(client, reactor, s.admin)
    name = "llmproxy_requests_total"
    assert total(samples, name) == 7
    assert total(samples, name, model="gpt-known", status_class="2xx") == 3
    assert total(samples, name, model="other", status_class="4xx") == 2
    assert total(samples, name, model="other", status_class="2xx") == 1
    assert total(samples, name, route="none", status_class="4xx") == 1
    leaked = [key for key in samples if "never-configured" in str(key)]
    assert all(key[0].startswith("llmproxy_tokens_") for key in leaked), leaked
    assert total(samples, "llmproxy_tokens_total", type="completion", model="gpt-known") > 0
    # Tokens count by the model the upstream reports (the fake one echoes it).
    assert total(samples, "llmproxy_tokens_total", type="completion",
                 model="never-configured-2") > 0
    assert total(samples, "llmproxy_request_duration_seconds_count") == 7
    assert total(samples, "llmproxy_upstream_ttfb_seconds_count") == 6
    assert total(samples, "llmproxy_inflight_requests") == 0
    assert ("llmproxy_dns_cache_misses_total", ()) in samples
    assert ("llmproxy_rate_limited_total", ()) in samples


@pytest_twisted.ensureDeferred
async def test_upstream_errors_are_counted_by_kind(reactor, proxies, client, access) -> None:
    """A refused upstream counts in llmproxy_upstream_errors_total{kind}."""
    from twisted.internet.protocol import Factory

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    await port.stopListening()
    proxy = await proxies.start(f'target_map: {{"/v1/": "http://127.0.0.1:{number}"}}\n')
    await fetch(client, reactor, proxy + "/v1/chat/completions", CHAT)
    await until_logged(reactor, access, 1)
    registry = proxies.roots[-1].metrics.registry
    value = registry.get_sample_value(
        "llmproxy_upstream_errors_total",
        {"kind": "upstream_refused", "upstream": f"http://127.0.0.1:{number}"},
    )
    assert value == 1


@pytest_twisted.ensureDeferred
async def test_metrics_only_on_the_admin_site(reactor, served, client) -> None:
    """/metrics is not served (or proxied) on the public port."""
    upstream, s = served
    response, body = await fetch(client, reactor, s.proxy + "/metrics", method=b"GET")
    assert response.code == 404
    assert b"llmproxy_requests_total" not in body
    for path in ("/healthz", "/readyz"):
        response, body = await fetch(client, reactor, s.admin + path, method=b"GET")
        assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_until_listening(reactor, served, client) -> None:
    """/readyz says 503 while the daemon is not listening yet."""
    upstream, s = served
    s.root.ready = False
    for base in (s.proxy, s.admin):
        response, body = await fetch(client, reactor, base + "/readyz", method=b"GET")
        assert response.code == 503
        response, body = await fetch(client, reactor, base + "/healthz", method=b"GET")
        assert response.code == 200
    s.root.ready = True
    response, body = await fetch(client, reactor, s.admin + "/readyz", method=b"GET")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_rotation_under_load_keeps_every_access_record(
    reactor, served, client, access, tmp_path
) -> None:
    """Concurrent requests with a tiny max_bytes: each record once, none lost."""
    import gzip

    from twisted.internet.defer import gatherResults, ensureDeferred

    from llmproxy.logs import file_log_service

    upstream, s = served
    service = file_log_service(
        str(tmp_path / "logs" / "llmproxy.log"),
        max_bytes=3000, backups=1000, compress=True, level="info", reactor=reactor,
    )
    service.startService()
    try:
        ids = [f"rot-{i:03d}" for i in range(150)]
        await gatherResults([
            ensureDeferred(fetch(client, reactor, s.proxy + "/v1/chat/completions", CHAT,
                                 headers={"X-Request-ID": rid}))
            for rid in ids
        ]).addTimeout(WAIT * 3, reactor)
        await until_logged(reactor, access, len(ids))
    finally:
        await service.stopService().addTimeout(WAIT, reactor)
    files = sorted((tmp_path / "logs").iterdir())
    assert len(files) > 10, "it rotated"
    assert all(f.suffix == ".gz" for f in files if f.name != "llmproxy.log")
    seen = []
    for path in files:
        data = path.read_bytes()
        text = gzip.decompress(data) if path.suffix == ".gz" else data
        for line in text.decode().splitlines():
            event = json.loads(line)
            if event.get("log_namespace") == "llmproxy.access":
                seen.append(event["request_id"])
    assert sorted(seen) == ids
