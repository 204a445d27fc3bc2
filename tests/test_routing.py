"""Unit tests for :mod:`llmproxy.routing`: paths and models to upstream pools."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.config import RouteConfig, parse_config_text
from llmproxy.routing import Route, Router, UpstreamPool, extract_model


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
        (b'{"model": "gpt-4"', None),
        (b'{"model": "gpt-4"} trailing', None),
        (b'{"model": "\xff\xfe"}', None),
        (b"\xff\xfe\x00\x01", None),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None),
        (
            b"--boundary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            b"whisper-1\r\n--boundary\r\nContent-Disposition: form-data; "
            b"name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\x00\x00\xff\r\n--boundary--\r\n",
            None,
        ),
        (b'{"model": "m", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
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
