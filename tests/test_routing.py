"""Routing: paths and models to upstream pools.

Unit tests for :mod:`llmproxy.routing`, and one end to end on a running
daemon: a huge body is routed by the model it names last, in bounded memory.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from helpers import fetch
from test_tap import WAIT, free_port, spawn_twistd

from llmproxy.config import RouteConfig, parse_config_text
from llmproxy.routing import MAX_COOLDOWN, Route, Router, UpstreamPool, extract_model


def routes(table: Mapping[str, str | Iterable[str]]) -> dict[str, RouteConfig]:
    """Build a route table from base URLs.

    Args:
        table: Key to one base URL, or to several.

    Returns:
        The table as config objects, in the given order.
    """
    return {
        key: RouteConfig(urls=(urls,) if isinstance(urls, str) else tuple(urls))
        for key, urls in table.items()
    }


def router(
    target_map: Mapping[str, str | Iterable[str]],
    model_routes: Mapping[str, str | Iterable[str]] | None = None,
) -> Router:
    """Build a router from plain tables.

    Args:
        target_map: Path key to base URL(s).
        model_routes: Model name to base URL(s).

    Returns:
        The router.
    """
    return Router(routes(target_map), routes(model_routes or {}))


def routed_key(r: Router, path: bytes, model: str | None = None) -> str | None:
    """Return the target_map key a request matches.

    Args:
        r: The router.
        path: The request path.
        model: The request's model.

    Returns:
        The matched key, or None if nothing matched.
    """
    found = r.route(path, model)
    return None if found is None else found.path_key


# -- paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "path", "expected"),
    [
        (["/chat/completions"], b"/chat/completions", "/chat/completions"),
        (["/chat"], b"/chat/completions", None),
        (["/chat"], b"/chat/", None),
        (["/chat/completions"], b"/chat/completions/", None),
        (["/chat/completions"], b"/chat/completionsX", None),
        (["/v1/"], b"/v1/chat/completions", "/v1/"),
        (["/v1/"], b"/v1/", "/v1/"),
        (["/v1/"], b"/v1", None),
        (["/v1/"], b"/v2/models", None),
        (["/v1/", "/v1/audio/"], b"/v1/audio/x", "/v1/audio/"),
        (["/v1/audio/", "/v1/"], b"/v1/audio/x", "/v1/audio/"),
        (["/v1/", "/v1/audio/"], b"/v1/audios/x", "/v1/"),
        (["/v1/", "/v1/audio/"], b"/v1/audio", "/v1/"),
        (["/v1/", "/v1/chat"], b"/v1/chat", "/v1/chat"),
        (["/v1/", "/v1/chat"], b"/v1/chat/x", "/v1/"),
        (["/"], b"/anything/at/all", "/"),
        (["/", "/v1/"], b"/v1/x", "/v1/"),
        (["/embeddings"], b"", None),
        (["/v1/"], b"v1/x", None),
    ],
)
def test_path_matching(keys: list[str], path: bytes, expected: str | None) -> None:
    """Exact keys match exactly; keys ending in '/' match as prefixes.

    Args:
        keys: The target_map keys, in file order.
        path: The request path.
        expected: The key that must match, or None for no match.
    """
    r = router({key: f"http://up{i}.example" for i, key in enumerate(keys)})

    assert routed_key(r, path) == expected


def test_route_carries_the_path_pool() -> None:
    """A path-only route uses the matched key's base URLs."""
    r = router({"/v1/": "http://a", "/embeddings": ["http://e1", "http://e2"]})

    found = r.route(b"/embeddings", None)

    assert isinstance(found, Route)
    assert found.path_key == "/embeddings"
    assert found.model is None
    assert found.pool.urls == ("http://e1", "http://e2")


def test_non_ascii_key_matches_utf8_path() -> None:
    """Keys are compared with the path as UTF-8 bytes."""
    r = router({"/ü/": "http://a"})

    assert routed_key(r, "/ü/x".encode()) == "/ü/"


# -- models ----------------------------------------------------------------


def test_known_model_overrides_the_path_pool() -> None:
    """A model listed in model_routes is served by its own pool."""
    r = router({"/v1/": "http://path"}, {"gpt-4": ["http://m1", "http://m2"]})

    found = r.route(b"/v1/chat/completions", "gpt-4")

    assert found is not None
    assert found.model == "gpt-4"
    assert found.path_key == "/v1/"
    assert found.pool.urls == ("http://m1", "http://m2")


@pytest.mark.parametrize("model", [None, "unknown-model", "", "GPT-4"])
def test_unknown_model_falls_back_to_the_path_pool(model: str | None) -> None:
    """A missing or unlisted model uses the path's pool.

    Args:
        model: A model that model_routes does not list (case matters).
    """
    r = router({"/v1/": "http://path"}, {"gpt-4": "http://model"})

    found = r.route(b"/v1/chat/completions", model)

    assert found is not None
    assert found.model is None
    assert found.pool.urls == ("http://path",)


def test_known_model_does_not_rescue_an_unmatched_path() -> None:
    """A model route only applies to paths that target_map matches."""
    r = router({"/v1/": "http://path"}, {"gpt-4": "http://model"})

    assert r.route(b"/admin/secrets", "gpt-4") is None


def test_from_config() -> None:
    """Router.from_config uses the config's target_map and model_routes."""
    config = parse_config_text(
        """\
target_map:
  "/v1/": "http://path.example/"
  "/v1/audio/": "http://audio.example"
model_routes:
  m:
    urls: ["http://m1.example/", "http://m2.example"]
""",
        environ={},
    )
    r = Router.from_config(config)

    audio = r.route(b"/v1/audio/speech", None)
    model = r.route(b"/v1/chat", "m")

    assert audio is not None and audio.pool.urls == ("http://audio.example",)
    assert model is not None and model.pool.urls == ("http://m1.example", "http://m2.example")


@pytest.mark.parametrize(
    "base", ["http://up.example/", "http://up.example/v1/", "http://up.example/v1//"]
)
def test_base_url_plus_path_has_no_double_slash(base: str) -> None:
    """With the config's base URLs, base + path never contains '//'.

    Args:
        base: A base URL as written in the config, with trailing slashes.
    """
    config = parse_config_text(f'target_map:\n  "/v1/": "{base}"\n', environ={})
    path = b"/v1/chat/completions"

    found = Router.from_config(config).route(path, None)

    assert found is not None
    url = found.pool.pick() + path.decode()
    assert "//" not in url.split("://", 1)[1]


# -- round robin -----------------------------------------------------------


def test_round_robin_cycles_through_urls() -> None:
    """Three URLs are used as a, b, c, a, b, c, ..."""
    pool = UpstreamPool(name="m", urls=("a", "b", "c"))

    assert [pool.pick() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_single_url_pool_always_picks_it() -> None:
    """A pool of one URL always returns that URL."""
    pool = UpstreamPool(name="/v1/", urls=("only",))

    assert {pool.pick() for _ in range(5)} == {"only"}


def test_round_robin_state_is_kept_across_requests() -> None:
    """Successive requests to one route share its turn; routes are separate."""
    r = router(
        {"/v1/": ["p1", "p2"]},
        {"m": ["a", "b", "c"], "n": ["x", "y"]},
    )

    def pick(model: str | None) -> str:
        found = r.route(b"/v1/chat", model)
        assert found is not None
        return found.pool.pick()

    picks = [pick("m"), pick("n"), pick("m"), pick(None), pick("m"), pick("m"), pick(None)]

    assert picks == ["a", "x", "b", "p1", "c", "a", "p2"]


def test_same_model_on_two_paths_shares_its_pool() -> None:
    """A model's rotation continues whichever path the request used."""
    r = router({"/v1/": "http://p", "/embeddings": "http://e"}, {"m": ["a", "b"]})

    first = r.route(b"/v1/chat", "m")
    second = r.route(b"/embeddings", "m")

    assert first is not None and second is not None
    assert [first.pool.pick(), second.pool.pick()] == ["a", "b"]


# -- extract_model ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model": "gpt-4", "messages": []}', "gpt-4"),
        (b'  \n{"model":"m"}', "m"),
        (b'{"model": "caf\\u00e9"}', "café"),
        ('{"model": "café"}'.encode(), "café"),
        (b'{"model": ""}', ""),
        (b'{"messages": [{"model": "inner"}]}', None),
        (b'{"model": 4}', None),
        (b'{"model": null}', None),
        (b'{"model": ["gpt-4"]}', None),
        (b'{"model": {"name": "gpt-4"}}', None),
        (b'[{"model": "gpt-4"}]', None),
        (b'"gpt-4"', None),
        (b"", None),
        (b"   ", None),
        (b"{", None),
        # Not validated as JSON past the model (the upstream does that).
        (b'{"model": "gpt-4"', "gpt-4"),
        (b'{"model": "gpt-4"} trailing', "gpt-4"),
        (b'{"model": "gpt-4', None),
        (b'{"model": "\xff\xfe"}', None),
        (b"\xff\xfe\x00\x01", None),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None),
        (
            b"--boundary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            b"whisper-1\r\n--boundary\r\nContent-Disposition: form-data; "
            b"name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\x00\x00\xff\r\n--boundary--\r\n",
            None,
        ),
        (b'{"model": "m", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "m"),
        (b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "last"}', "last"),
        (b'{"deep": ' + b"[" * 100_000 + b'{"model": "nested"}' + b"]" * 100_000 + b"}", None),
        (b'{"text": "say \\"model\\": \\"x\\"", "model": "real"}', "real"),
        (b'{"a": "\\\\", "model": "after-escaped-backslash"}', "after-escaped-backslash"),
        (b'{"a": "[{", "model": "brackets-in-strings"}', "brackets-in-strings"),
        (b'{"model": "first", "x": {"model": "inner"}, "model": "second"}', "second"),
        (b'{"model": "first", "model": 4}', None),
        (b'{"name": "model", "n": 1}', None),
        (b'{"model" : \n "spaced"}', "spaced"),
        (b'{"messages": [' + b'{"model": 1},' * 1001 + b'{}], "model": "too-many"}', None),
        (b"{" * 100_000, None),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, None),
    ],
    ids=lambda value: repr(value[:40]) if isinstance(value, bytes) else None,
)
def test_extract_model(body: bytes, expected: str | None) -> None:
    """Only a JSON object with a string ``model`` yields a model.

    Args:
        body: A request body.
        expected: The model it names, or None.
    """
    assert extract_model(body) == expected


@settings(max_examples=300)
@given(
    body=st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=256).map(lambda b: b"{" + b),
        st.binary(max_size=64).map(lambda b: b'{"model": "' + b + b'"}'),
        st.integers(min_value=1, max_value=5000).map(lambda n: b"{" + b'"a":[' * n),
    )
)
def test_extract_model_never_raises(body: bytes) -> None:
    """Any bytes at all give a string or None, never an exception.

    Args:
        body: An arbitrary request body.
    """
    result = extract_model(body)

    assert result is None or isinstance(result, str)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(
    document=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
    model=st.text(max_size=30),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_extract_model_returns_the_model_of_any_json_object(
    document: dict[str, Any], model: str, ensure_ascii: bool, indent: int | None
) -> None:
    """For any JSON object with a text ``model``, that text is returned.

    Args:
        document: Other members of the object.
        model: The model name.
        ensure_ascii: Whether non-ASCII text is escaped.
        indent: How the JSON is laid out.
    """
    document["model"] = model
    body = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent).encode()

    assert extract_model(body) == model


KEYS = st.sampled_from(["model", "messages", "a", 'mo"del', "model\\"]) | st.text(max_size=5)
NESTED = st.recursive(
    st.none() | st.integers() | st.sampled_from(["model", "[{", '"model": "x"', "\\", ""])
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    document=st.dictionaries(KEYS, NESTED, max_size=6),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_extract_model_agrees_with_json_loads(
    document: dict[str, Any], ensure_ascii: bool, indent: int | None
) -> None:
    """On any JSON object, the model found is the one json.loads would give.

    ``model`` keys and look-alike strings are spread at every depth, inside
    strings and as values.

    Args:
        document: A JSON object.
        ensure_ascii: Whether non-ASCII text is escaped.
        indent: How the JSON is laid out.
    """
    body = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent).encode()
    model = json.loads(body).get("model")

    assert extract_model(body) == (model if isinstance(model, str) else None)


# -- the routing rule, against an oracle ----------------------------------


def oracle(keys: Iterable[str], path: str) -> str | None:
    """The routing rule, written the slow and obvious way.

    Args:
        keys: The target_map keys.
        path: The request path.

    Returns:
        The key the path should route to, or None.
    """
    keys = list(keys)
    if path in keys:
        return path
    prefixes = [k for k in keys if k.endswith("/") and path.startswith(k)]
    return max(prefixes, key=len, default=None)


SEGMENTS = st.sampled_from(["v1", "v2", "a", "ab", "audio", "chat", ""])
PATHS = st.builds(
    lambda parts, slash: "/" + "/".join(parts) + ("/" if slash else ""),
    st.lists(SEGMENTS, max_size=4),
    st.booleans(),
)


@settings(max_examples=300)
@given(keys=st.lists(PATHS, min_size=1, max_size=8, unique=True), path=PATHS)
def test_routing_matches_the_oracle(keys: list[str], path: str) -> None:
    """The chosen key is the exact key, else the longest '/'-ending prefix.

    Args:
        keys: Random target_map keys.
        path: A random request path.
    """
    r = router({key: f"http://up{i}" for i, key in enumerate(keys)})

    assert routed_key(r, path.encode()) == oracle(keys, path)


@settings(max_examples=100)
@given(keys=st.lists(PATHS, min_size=1, max_size=8, unique=True), data=st.data())
def test_routing_exact_keys_always_win(keys: list[str], data: st.DataObject) -> None:
    """Any key used as the path routes to itself, whatever else matches.

    Args:
        keys: Random target_map keys.
        data: Draws one of the keys.
    """
    key = data.draw(st.sampled_from(keys))
    r = router({k: f"http://up{i}" for i, k in enumerate(keys)})

    assert routed_key(r, key.encode()) == key


# -- passive health --------------------------------------------------------


def health_pool(
    urls: tuple[str, ...] = ("a", "b", "c"), **settings_: Any
) -> tuple[UpstreamPool, Clock]:
    """Build a pool from a RouteConfig on a fake clock.

    Args:
        urls: The base URLs.
        **settings_: Further RouteConfig fields.

    Returns:
        The pool and its clock.
    """
    clock = Clock()
    return UpstreamPool.from_route("m", RouteConfig(urls=urls, **settings_), clock), clock


def attempt(pool: UpstreamPool, dead: set[str]) -> tuple[str | None, list[str]]:
    """Run one request the way the proxy does: retry on other URLs.

    Args:
        pool: The pool.
        dead: URLs whose requests fail.

    Returns:
        The URL that answered (None if none did) and the URLs that failed.
    """
    tried: list[str] = []
    for _ in range(pool.retries + 1):
        url = pool.pick(exclude=tried)
        assert url is not None and url not in tried
        pool.started(url)
        if url in dead:
            pool.failed(url)
            pool.finished(url)
            tried.append(url)
            continue
        pool.succeeded(url)
        pool.finished(url)
        return url, tried
    return None, tried


def health_of(pool: UpstreamPool, url: str) -> dict[str, Any]:
    """Return one URL's entry of ``pool.state()``.

    Args:
        pool: The pool.
        url: One of its URLs.

    Returns:
        The state dict for ``url``.
    """
    return next(entry for entry in pool.state() if entry["url"] == url)


def test_from_route_copies_the_settings() -> None:
    """from_route takes the route's settings; retries defaults to size - 1."""
    pool, clock = health_pool(retry_on=(503,), eject_after=2, cooldown=7.0)
    explicit, _ = health_pool(retries=0)

    assert pool.retries == 2 and explicit.retries == 0
    assert pool.retry_on == frozenset({503})
    assert (pool.eject_after, pool.cooldown, pool.clock) == (2, 7.0, clock)
    assert UpstreamPool(name="x", urls=("a", "b")).retries == 1


def test_one_dead_url_is_ejected_retried_and_restored() -> None:
    """A dead URL costs one retry per request until ejected, then a trial per cooldown.

    Every request finds a live URL within ``retries``. The dead URL is
    picked ``eject_after`` times, then only once per cooldown (the trial);
    failed trials double the cooldown up to 300 s and a good one restores it.
    """
    pool, clock = health_pool(eject_after=5, cooldown=30.0)
    dead = {"b"}
    failures = 0
    for _ in range(200):
        answered, tried = attempt(pool, dead)
        assert answered in {"a", "c"}
        failures += len(tried)
    assert failures == 5
    assert health_of(pool, "b")["healthy"] is False
    assert health_of(pool, "b")["ejected_until"] == 30.0

    expected = [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    for cooldown in expected:
        assert health_of(pool, "b")["cooldown"] == cooldown
        clock.advance(cooldown - 0.5)
        assert "b" not in {pool.pick() for _ in range(30)}
        clock.advance(0.5)
        held = [pool.pick() for _ in range(30)]
        assert held.count("b") == 1
        assert pool.failed("b") is True
    assert health_of(pool, "b")["cooldown"] == MAX_COOLDOWN

    dead.clear()
    clock.advance(MAX_COOLDOWN)
    picks = [attempt(pool, dead)[0] for _ in range(30)]
    assert picks.count("b") == 10
    assert health_of(pool, "b") == {
        "url": "b",
        "healthy": True,
        "ejected_until": None,
        "consecutive_failures": 0,
        "outstanding": 0,
        "cooldown": 30.0,
    }


def test_ejection_needs_consecutive_failures() -> None:
    """A success resets the count; failed() says True only when it ejects."""
    pool, _ = health_pool(eject_after=3)

    results = [pool.failed("a"), pool.failed("a")]
    pool.succeeded("a")
    results += [pool.failed("a"), pool.failed("a"), pool.failed("a"), pool.failed("a")]

    assert results == [False, False, False, False, True, False]
    assert health_of(pool, "a")["consecutive_failures"] == 4
    assert [pool.pick() for _ in range(4)] == ["b", "c", "b", "c"]


def test_succeeded_outside_a_trial_does_not_restore() -> None:
    """A late success from before the ejection leaves the URL ejected."""
    pool, _ = health_pool(("a", "b"), eject_after=1)
    pool.failed("a")

    pool.succeeded("a")

    assert health_of(pool, "a")["healthy"] is False
    assert {pool.pick() for _ in range(4)} == {"b"}


def test_trial_verdict_counts_whether_before_or_after_finished() -> None:
    """finished() before failed() still ends the trial with a longer cooldown."""
    pool, clock = health_pool(("a", "b"), eject_after=1, cooldown=10.0)
    pool.failed("a")
    clock.advance(10)
    trial = next(url for url in iter(pool.pick, None) if url == "a")
    pool.started(trial)
    pool.finished(trial)
    assert "a" not in {pool.pick() for _ in range(4)}

    assert pool.failed(trial) is True

    assert health_of(pool, "a")["cooldown"] == 20.0
    assert health_of(pool, "a")["ejected_until"] == 30.0


def test_abandoned_trial_is_due_again_after_a_cooldown() -> None:
    """A trial with no verdict blocks new trials for one cooldown only."""
    pool, clock = health_pool(("a", "b"), eject_after=1, cooldown=10.0)
    pool.failed("a")
    clock.advance(10)
    trial = next(url for url in iter(pool.pick, None) if url == "a")
    pool.started(trial)
    pool.finished(trial)
    clock.advance(9.5)
    assert "a" not in {pool.pick() for _ in range(4)}

    clock.advance(0.5)

    assert [pool.pick() for _ in range(4)].count("a") == 1
    assert health_of(pool, "a")["healthy"] is False


def test_all_ejected_returns_the_one_ejected_longest_ago() -> None:
    """With every URL cooling, pick still answers: the oldest ejection first."""
    pool, clock = health_pool(eject_after=1, cooldown=30.0)
    for url in ("c", "a", "b"):
        pool.failed(url)
        clock.advance(1)

    assert [pool.pick() for _ in range(3)] == ["c", "c", "c"]
    assert pool.pick(exclude=("c",)) == "a"
    assert pool.pick(exclude=("c", "a")) == "b"
    assert all(not entry["healthy"] for entry in pool.state())


def test_longest_ago_is_by_ejection_time_not_by_end_of_cooldown() -> None:
    """A URL re-ejected for longer still counts from when it was ejected."""
    pool, clock = health_pool(("a", "b"), eject_after=1, cooldown=30.0)
    pool.failed("a")
    clock.advance(30)
    assert pool.pick() == "a"
    pool.failed("a")
    clock.advance(1)
    pool.failed("b")
    clock.advance(1)

    assert health_of(pool, "a")["ejected_until"] == 90.0
    assert health_of(pool, "b")["ejected_until"] == 61.0
    assert pool.pick() == "a"


def test_trial_in_flight_on_the_only_url_still_picks_it() -> None:
    """A one-URL pool never refuses, even during its trial."""
    pool, clock = health_pool(("only",), eject_after=1)
    pool.failed("only")
    clock.advance(30)

    assert [pool.pick() for _ in range(3)] == ["only"] * 3
    pool.succeeded("only")
    assert health_of(pool, "only")["healthy"] is True


# -- strategies -------------------------------------------------------------


def longest_streak(picks: list[str], url: str) -> int:
    """Return the longest run of ``url`` in ``picks``.

    Args:
        picks: Picked URLs in order.
        url: The URL.

    Returns:
        The length of its longest run.
    """
    return max((len(list(run)) for key, run in itertools.groupby(picks) if key == url), default=0)


def test_weighted_shares_match_weights() -> None:
    """Weights 5, 3, 2 give exactly 500/300/200 of 1,000 picks, smoothly."""
    pool, _ = health_pool(strategy="weighted", weights=(5, 3, 2))

    picks = [pool.pick() for _ in range(1000)]

    assert Counter(picks) == {"a": 500, "b": 300, "c": 200}
    assert longest_streak(picks, "a") <= 2
    assert longest_streak(picks, "b") == longest_streak(picks, "c") == 1
    for start in range(990):
        assert Counter(picks[start : start + 10]) == {"a": 5, "b": 3, "c": 2}


def test_weighted_is_nginx_smooth_sequence() -> None:
    """Weights 5, 1, 1 give nginx's documented sequence a a b a c a a."""
    pool, _ = health_pool(strategy="weighted", weights=(5, 1, 1))

    assert "".join(pool.pick() or "" for _ in range(14)) == "aabacaa" * 2


def test_weighted_skips_ejected_urls() -> None:
    """An ejected URL's share goes to the others."""
    pool, _ = health_pool(strategy="weighted", weights=(5, 3, 2), eject_after=1)
    pool.failed("a")

    picks = Counter(pool.pick() for _ in range(500))

    assert picks == {"b": 300, "c": 200}


def test_least_outstanding_prefers_the_idle_url() -> None:
    """The URL with fewest requests in flight is picked."""
    pool, _ = health_pool(strategy="least_outstanding")
    pool.started("a")
    pool.started("a")
    pool.started("b")

    first = pool.pick()
    assert first == "c"
    pool.started("c")
    pool.started("c")
    assert pool.pick() == "b"


def test_least_outstanding_ties_go_round_robin() -> None:
    """Equally busy URLs take turns."""
    pool, _ = health_pool(strategy="least_outstanding")

    assert [pool.pick() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    pool.started("a")
    assert [pool.pick() for _ in range(4)] == ["b", "c", "b", "c"]


def test_outstanding_never_negative() -> None:
    """finished() without started() leaves the count at zero."""
    pool, _ = health_pool()
    pool.finished("a")
    pool.started("a")
    pool.finished("a")
    pool.finished("a")
    pool.finished("unknown")

    assert health_of(pool, "a")["outstanding"] == 0


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_outstanding"])
def test_pick_respects_exclude(strategy: str) -> None:
    """pick never returns an excluded URL, and None once all are excluded.

    Args:
        strategy: The balancing strategy.
    """
    pool, _ = health_pool(strategy=strategy, weights=(1, 2, 3))

    assert {pool.pick(exclude={"a"}) for _ in range(12)} == {"b", "c"}
    assert {pool.pick(exclude=["a", "c"]) for _ in range(5)} == {"b"}
    assert pool.pick(exclude=("a", "b", "c")) is None


def test_round_robin_turns_are_shared_by_concurrent_requests() -> None:
    """Picks of interleaved requests still take turns across the pool."""
    pool, _ = health_pool()

    first, second = pool.pick(), pool.pick()
    third = pool.pick(exclude=[first])

    assert [first, second, third] == ["a", "b", "c"]


# -- aliases, fallbacks, pools ---------------------------------------------


ALIAS_CONFIG = """\
target_map:
  "/v1/": "http://path.example"
model_routes:
  gpt-4: {urls: ["http://g1.example", "http://g2.example"]}
  claude: "http://c.example"
  small: "http://s.example"
model_aliases:
  best: gpt-4
  cheap: small
fallbacks:
  gpt-4: [claude, small]
"""


def test_alias_routes_to_the_real_model() -> None:
    """An alias uses its model's pool and asks for the model to be rewritten."""
    r = Router.from_config(parse_config_text(ALIAS_CONFIG, environ={}), Clock())

    alias = r.route(b"/v1/chat/completions", "best")
    real = r.route(b"/v1/chat/completions", "gpt-4")

    assert alias is not None and real is not None
    assert alias.pool is real.pool
    assert (alias.model, alias.rewrite_model) == ("gpt-4", "gpt-4")
    assert real.rewrite_model is None
    assert alias.fallbacks == real.fallbacks == ("claude", "small")


def test_fallbacks_default_to_none() -> None:
    """Models without fallbacks, and path routes, carry an empty chain."""
    r = Router.from_config(parse_config_text(ALIAS_CONFIG, environ={}))

    cheap = r.route(b"/v1/x", "cheap")
    path = r.route(b"/v1/x", "unknown")

    assert cheap is not None and cheap.fallbacks == () and cheap.rewrite_model == "small"
    assert path is not None and path.fallbacks == () and path.model is None


def test_pool_for_model_and_pools() -> None:
    """pool_for_model resolves models and aliases; pools lists each pool once."""
    r = Router.from_config(parse_config_text(ALIAS_CONFIG, environ={}))

    assert r.pool_for_model("claude") is not None
    assert r.pool_for_model("best") is r.pool_for_model("gpt-4")
    assert r.pool_for_model("nope") is None
    assert [pool.name for pool in r.pools()] == ["/v1/", "gpt-4", "claude", "small"]


def test_router_pools_share_the_clock() -> None:
    """Pools built by the router eject and recover on the router's clock."""
    clock = Clock()
    r = Router(
        routes({"/v1/": "http://p"}),
        {"m": RouteConfig(urls=("x", "y"), eject_after=1, cooldown=5.0)},
        clock=clock,
    )
    pool = r.pool_for_model("m")
    assert pool is not None
    pool.failed("x")
    assert {pool.pick() for _ in range(4)} == {"y"}

    clock.advance(5)

    assert "x" in {pool.pick() for _ in range(2)}


def test_alias_of_unknown_model_is_ignored() -> None:
    """A direct Router with an alias to a model it lacks uses the path pool."""
    r = Router(routes({"/v1/": "http://p"}), routes({"m": "http://m"}),
               model_aliases={"a": "missing", "m": "other"})

    found = r.route(b"/v1/x", "a")
    direct = r.route(b"/v1/x", "m")

    assert found is not None and found.model is None
    assert direct is not None and direct.model == "m" and direct.rewrite_model is None


# -- health state machine, against random operations ----------------------


URL_NAMES = ("a", "b", "c", "d")
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("pick"), st.frozensets(st.sampled_from(URL_NAMES))),
        st.tuples(
            st.sampled_from(["started", "finished", "failed", "succeeded"]),
            st.sampled_from((*URL_NAMES, "zzz")),
        ),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=400)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    urls=st.lists(st.sampled_from(URL_NAMES), min_size=1, max_size=4),
    strategy=st.sampled_from(["round_robin", "weighted", "least_outstanding"]),
    weight_seed=st.lists(st.integers(min_value=1, max_value=5), min_size=4, max_size=4),
    eject_after=st.integers(min_value=1, max_value=3),
    cooldown=st.sampled_from([0.0, 1.0, 30.0, 500.0]),
    operations=OPERATIONS,
)
def test_random_operations_keep_the_invariants(
    urls: list[str],
    strategy: str,
    weight_seed: list[int],
    eject_after: int,
    cooldown: float,
    operations: list[tuple[str, Any]],
) -> None:
    """Any sequence of calls keeps pick within bounds and counts sane.

    Args:
        urls: The pool's URLs (duplicates allowed).
        strategy: The balancing strategy.
        weight_seed: Weights to take one per URL.
        eject_after: Consecutive failures before ejection.
        cooldown: Base cooldown.
        operations: Calls to make, in order.
    """
    pool, clock = health_pool(
        tuple(urls),
        strategy=strategy,
        weights=tuple(weight_seed[: len(urls)]),
        eject_after=eject_after,
        cooldown=cooldown,
    )
    for name, arg in operations:
        if name == "pick":
            picked = pool.pick(exclude=arg)
            if set(urls) <= arg:
                assert picked is None
            else:
                assert picked in urls and picked not in arg
        elif name == "advance":
            clock.advance(arg)
        elif name == "failed":
            assert pool.failed(arg) in (True, False)
        else:
            getattr(pool, name)(arg)
        for entry in pool.state():
            assert entry["outstanding"] >= 0
            assert entry["consecutive_failures"] >= 0
            assert entry["healthy"] is (entry["ejected_until"] is None)
            assert cooldown <= entry["cooldown"] <= max(MAX_COOLDOWN, cooldown)
    assert [entry["url"] for entry in pool.state()] == list(dict.fromkeys(urls))


# --------------------------------------------------------------------------
# End to end: a body that could take the process


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest_twisted.ensureDeferred
async def test_a_huge_body_of_tiny_objects_routes_by_its_last_model(
    reactor, upstreams, client, tmp_path: Path
) -> None:
    """16 MiB of tiny objects with ``model`` last: routed by it, memory bounded."""
    default, default_base = await upstreams.start()
    big, big_base = await upstreams.start()
    port = free_port()
    config = tmp_path / "config.yml"
    config.write_text(
        f'listen: "tcp:{port}:interface=127.0.0.1"\nadmin_listen: null\n'
        f'log: {{file: null, access: false}}\nmax_body_bytes: 33554432\n'
        f'target_map:\n  "/v1/": "{default_base}"\n'
        f'model_routes:\n  "big-model": "{big_base}"\n'
    )
    process = spawn_twistd(reactor, config, tmp_path)
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        response, _ = await fetch(client, reactor, url, CHAT)  # warm up
        assert response.code == 200
        before = _peak_rss_mb(process.transport.pid)
        size = 16 * 1024 * 1024
        body = b'{"messages": [' + b"{}," * (size // 3) + b'{}], "model": "big-model"}'
        response, _ = await fetch(client, reactor, url, body,
                                  headers={"Content-Type": "application/json"})
        assert response.code == 200
        assert big.requests and len(big.requests[-1].body) == len(body)
        assert not any(len(r.body) == len(body) for r in default.requests)
        grown = _peak_rss_mb(process.transport.pid) - before
        assert grown < 5 * size / 2**20, f"peak RSS grew by {grown:.0f} MB"
    finally:
        process.transport.signalProcess("TERM")
        await process.ended.addTimeout(WAIT, reactor)
