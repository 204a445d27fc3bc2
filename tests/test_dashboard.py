"""The Grafana dashboard in etc/grafana: a valid dashboard whose every query
reads metrics that a running gateway serves.

The dashboard's PromQL names metrics as Prometheus stores them (a counter
with ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``), so each
name is looked for, exactly, among the sample names of a ``/metrics`` scrape.
A labelled counter has no sample until it is first counted: the loopback test
makes each one count before it scrapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory

from conftest import timeout
from helpers import fetch
from llmproxy.web import build_site

DASHBOARD = Path(__file__).resolve().parent.parent / "etc" / "grafana" / "llmproxy.json"

#: A metric name in a query.
METRIC = re.compile(r"\bllmproxy_[a-z0-9_]+")

#: Sample names that only a rate() or increase() makes sense of.
RATED = ("_total", "_bucket", "_sum", "_count")

CHAT = {"model": "m-good", "messages": [{"role": "user", "content": "one two three four"}],
        "max_tokens": 6}
#: The fake upstream's usage for CHAT: 4 prompt words and its 6-word reply.
TOKENS = 4 + 6


def load() -> dict[str, Any]:
    """The dashboard, parsed (a JSON error fails the test)."""
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, those inside collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query: panel targets and query variables."""
    exprs = [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    """The metric names the dashboard's queries read."""
    return {name for expr in queries(dashboard) for name in METRIC.findall(expr)}


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    """It parses; a datasource variable picks the Prometheus every query
    uses; every panel has a place on the grid, a unit and at least one
    query."""
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    every = panels(dashboard)
    assert len(every) >= 10
    nested = [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [panel["id"] for panel in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in every:
        title = panel.get("title")
        assert title, panel
        assert panel["type"] in ("timeseries", "stat"), title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24 and position["h"] > 0, title
        targets = panel.get("targets")
        assert targets, f"{title}: no targets"
        assert len({t["refId"] for t in targets}) == len(targets), f"{title}: refIds repeat"
        for target in targets:
            assert target["expr"].strip(), f"{title}: an empty query"
            assert METRIC.search(target["expr"]), f"{title}: queries no llmproxy metric"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title


def test_counters_are_rated_and_quantiles_keep_their_buckets() -> None:
    """A counter or histogram series is only read through rate() or
    increase() (its raw value is a count since the process started), and
    histogram_quantile() sums its buckets by ``le``."""
    for expr in queries(load()):
        if expr.startswith("label_values("):
            continue
        for match in METRIC.finditer(expr):
            if match.group().endswith(RATED):
                before = expr[:match.start()]
                assert before.endswith(("rate(", "increase(")), expr
        for aggregated in re.findall(r"histogram_quantile\([^,]+, sum by \(([^)]*)\)", expr):
            assert "le" in [label.strip() for label in aggregated.split(",")], expr
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_the_metrics_it_queries_are_llmproxys() -> None:
    """The dashboard covers requests, latency, tokens, cost, budgets and
    upstream health, and the metrics set aside below are ones it queries."""
    names = queried_metrics(load())
    for name in (
        "llmproxy_requests_total", "llmproxy_request_duration_seconds_bucket",
        "llmproxy_upstream_ttfb_seconds_bucket", "llmproxy_tokens_total",
        "llmproxy_cost_usd_total", "llmproxy_budget_tokens_total",
        "llmproxy_upstream_ejections_total", "llmproxy_upstream_errors_total",
        "llmproxy_budget_usd_total", "llmproxy_key_refused_total",
        "llmproxy_budget_estimated_tokens_total",
    ):
        assert name in names


async def _closed_port(reactor: Any) -> str:
    """The base URL of a loopback port nothing listens on (it refuses)."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}"


def _config(good: str, dead: str, stale: str) -> str:
    """Routes that fail over, fall back, fail, and meet a stale connection;
    prices; a named key, one with a token budget for a few CHATs, and one
    with a money budget and a models list."""
    return (
        f'target_map:\n  "/v1/": "{good}"\n'
        "model_routes:\n"
        f'  "m-good": "{good}"\n'
        f'  "m-main": {{urls: ["{dead}"], eject_after: 1}}\n'
        f'  "m-backup": "{good}"\n'
        f'  "m-dead": "{dead}"\n'
        f'  "m-stale": {{urls: ["{stale}"], retries: 0}}\n'
        'fallbacks: {"m-main": "m-backup"}\n'
        "auth:\n  keys:\n"
        "    - {key: key-team-secret, name: team}\n"
        "    - {key: key-capped-secret, name: capped, budget: {tokens: 100, per: day}}\n"
        "    - {key: key-wallet-secret, name: wallet, models: [m-good],"
        " budget: {usd: 5, per: day}}\n"
        'prices: {"m-*": {input: 1, output: 2}}\n'
    )


@pytest_twisted.ensureDeferred
async def test_every_metric_the_dashboard_queries_is_served(
    reactor, upstreams, raw_servers, proxies, loopback, client, access
) -> None:
    """After requests that succeed, fail over to a fallback, fail upstream,
    meet a stale pooled connection, are charged by estimate, spend a token
    and a money budget and are refused, every metric the dashboard queries
    has a sample in ``/metrics``."""
    _, good = await upstreams.start()
    dead = await _closed_port(reactor)
    stale, stale_base = await raw_servers(answers_per_connection=1)
    proxy = await proxies.start(_config(good, dead, stale_base))
    gateway = proxies.gateways[-1]
    admin = await loopback(build_site(gateway.config, reactor, gateway.admin_resource()))
    url = proxy + "/v1/chat/completions"

    async def ask(key: str, model: str) -> int:
        response, _ = await fetch(client, reactor, url, {**CHAT, "model": model},
                                  headers={"Authorization": f"Bearer {key}"})
        return response.code

    assert await ask("key-team-secret", "m-good") == 200
    # Refused by its one upstream (ejected), then answered by the fallback.
    assert await ask("key-team-secret", "m-main") == 200
    assert await ask("key-team-secret", "m-dead") == 502
    # Answers without usage to a budgeted key, charged by estimate; the
    # second one is sent again after its pooled connection closed unanswered.
    assert await ask("key-capped-secret", "m-stale") == 200
    assert await ask("key-capped-secret", "m-stale") == 200
    assert stale.connections == 2
    # Spends the budget; then one is refused over budget.
    codes = [await ask("key-capped-secret", "m-good") for _ in range(10)]
    assert 200 in codes and codes[-1] == 429, codes
    # A money budget charged; a model outside the key's list refused.
    assert await ask("key-wallet-secret", "m-good") == 200
    assert await ask("key-wallet-secret", "m-dead") == 403
    assert await ask("not-a-key", "m-good") == 401
    await timeout(access.wait(7 + len(codes)), reactor)

    response, text = await fetch(client, reactor, admin + "/metrics", method=b"GET")
    assert response.code == 200
    families = list(text_string_to_metric_families(text.decode()))
    samples = {sample.name for family in families for sample in family.samples}

    wanted = queried_metrics(load())
    missing = sorted(wanted - samples)
    assert not missing, f"queried by the dashboard, not in /metrics: {missing}"
