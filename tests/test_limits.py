"""Unit tests for :mod:`llmproxy.limits`: client IPs, token buckets, API keys.

Keys files are read by the config (:mod:`llmproxy.config`); their tests
here load a config naming one and build the :class:`KeyStore` from it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from llmproxy.config import AuthConfig, ClientKey, ConfigError, parse_config_text
from llmproxy.net import NetworkSet
from llmproxy.limits import (
    KeyStore,
    Limits,
    MemoryStore,
    RateLimiter,
    client_ip,
    presented_key,
    retry_after,
)

TRUSTED = NetworkSet(["10.0.0.0/8", "fd00::/8"])


def headers(**values: str | list[str]) -> Headers:
    """Build request headers from keyword arguments.

    Args:
        **values: Header name (``_`` for ``-``) to one value or several lines.

    Returns:
        The headers, each line in the given order.
    """
    return Headers(
        {
            name.replace("_", "-").encode(): [
                v.encode("utf-8")
                for v in ([value] if isinstance(value, str) else value)
            ]
            for name, value in values.items()
        }
    )


# --------------------------------------------------------------------------
# client_ip


def test_untrusted_peer_headers_ignored() -> None:
    """A peer outside the trusted set cannot choose its address by header."""
    spoofed = headers(x_forwarded_for="203.0.113.7", x_real_ip="198.51.100.1")
    assert client_ip("192.0.2.10", spoofed, TRUSTED) == "192.0.2.10"


def test_no_trusted_proxies_means_peer() -> None:
    """With an empty trusted set, even a private peer's headers are ignored."""
    spoofed = headers(x_forwarded_for="203.0.113.7")
    assert client_ip("10.0.0.2", spoofed, NetworkSet([])) == "10.0.0.2"


def test_trusted_chain_right_most_untrusted() -> None:
    """The client is the right-most address that is not a trusted proxy."""
    chain = headers(x_forwarded_for="203.0.113.7, 10.0.0.9")
    assert client_ip("10.0.0.2", chain, TRUSTED) == "203.0.113.7"


def test_spoofed_left_part_of_chain_ignored() -> None:
    """Addresses a client prepended itself sit left of the real one."""
    chain = headers(x_forwarded_for="6.6.6.6, 1.1.1.1, 203.0.113.7, 10.0.0.9")
    assert client_ip("10.0.0.2", chain, TRUSTED) == "203.0.113.7"


def test_all_trusted_chain_gives_left_most() -> None:
    """When every hop is a trusted proxy, the left-most one is the client."""
    chain = headers(x_forwarded_for="10.0.0.5, 10.0.0.9")
    assert client_ip("10.0.0.2", chain, TRUSTED) == "10.0.0.5"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["203.0.113.7, 10.0.0.3", "198.51.100.9"], "198.51.100.9"),
        (["198.51.100.9, 203.0.113.7", "10.0.0.3"], "203.0.113.7"),
        (["203.0.113.7", "10.0.0.3, 10.0.0.4"], "203.0.113.7"),
        (["203.0.113.7,", "", " , 10.0.0.3"], "203.0.113.7"),
    ],
)
def test_multiple_xff_headers_joined_in_order(lines: list[str], expected: str) -> None:
    """Several X-Forwarded-For lines read as one list; empty items are skipped.

    Args:
        lines: The header lines, in order.
        expected: The client.
    """
    chain = headers(x_forwarded_for=lines)
    assert client_ip("10.0.0.2", chain, TRUSTED) == expected


def test_x_real_ip_from_trusted_peer() -> None:
    """Without X-Forwarded-For, a trusted peer's X-Real-IP is the client."""
    assert client_ip("10.0.0.2", headers(x_real_ip=" 203.0.113.7 "), TRUSTED) == (
        "203.0.113.7"
    )


def test_x_forwarded_for_wins_over_x_real_ip() -> None:
    """X-Forwarded-For is preferred when both are present."""
    both = headers(x_forwarded_for="203.0.113.7", x_real_ip="198.51.100.1")
    assert client_ip("10.0.0.2", both, TRUSTED) == "203.0.113.7"


@pytest.mark.parametrize("value", ["unknown", "", "203.0.113.7, 198.51.100.1"])
def test_invalid_x_real_ip_gives_peer(value: str) -> None:
    """An X-Real-IP that is not one IP address is ignored.

    Args:
        value: The header's value.
    """
    assert client_ip("10.0.0.2", headers(x_real_ip=value), TRUSTED) == "10.0.0.2"


def test_trusted_peer_without_headers() -> None:
    """A trusted peer that forwards nothing is itself the client."""
    assert client_ip("10.0.0.2", Headers(), TRUSTED) == "10.0.0.2"


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("10.0.0.2", "[2001:db8::1]:443", "2001:db8::1"),
        ("10.0.0.2", "[2001:db8::1]", "2001:db8::1"),
        ("10.0.0.2", "2001:DB8:0::1", "2001:db8::1"),
        ("10.0.0.2", "203.0.113.7:5555", "203.0.113.7"),
        ("10.0.0.2", "::ffff:203.0.113.7", "203.0.113.7"),
        ("10.0.0.2", "[::ffff:203.0.113.7]:80", "203.0.113.7"),
        ("10.0.0.2", "203.0.113.7, ::ffff:10.0.0.9", "203.0.113.7"),
        ("::ffff:10.0.0.2", "203.0.113.7", "203.0.113.7"),
        ("fd00::1", "2001:db8::5, fd00::2", "2001:db8::5"),
    ],
)
def test_ipv6_ports_and_mapped_forms(peer: str, xff: str, expected: str) -> None:
    """Ports and brackets are stripped; IPv4-mapped IPv6 is read as IPv4.

    Args:
        peer: The TCP peer.
        xff: The X-Forwarded-For value.
        expected: The client in canonical form.
    """
    assert client_ip(peer, headers(x_forwarded_for=xff), TRUSTED) == expected


@pytest.mark.parametrize(
    ("peer", "expected"),
    [("::ffff:192.0.2.10", "192.0.2.10"), ("2001:DB8::1", "2001:db8::1")],
)
def test_untrusted_peer_normalised(peer: str, expected: str) -> None:
    """The peer itself comes back in canonical form.

    Args:
        peer: The TCP peer.
        expected: Its canonical form.
    """
    assert client_ip(peer, headers(x_forwarded_for="1.2.3.4"), TRUSTED) == expected


@pytest.mark.parametrize(
    "xff",
    [
        "203.0.113.7, garbage",
        "garbage, 10.0.0.9",
        "unknown",
        "203.0.113.7:http",
        "203.0.113.7:",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "fe80::1%eth0",
        "300.1.2.3",
        "1.2.3",
        "_hidden",
        "203.0.113.7 198.51.100.1",
    ],
)
def test_garbage_entry_stops_walk_at_peer(xff: str) -> None:
    """An entry that is not an IP makes the chain unusable: the peer is used.

    Args:
        xff: The X-Forwarded-For value.
    """
    assert client_ip("10.0.0.2", headers(x_forwarded_for=xff), TRUSTED) == "10.0.0.2"


def test_garbage_left_of_client_is_never_reached() -> None:
    """Garbage beyond the first untrusted address does not matter."""
    chain = headers(x_forwarded_for="garbage, 203.0.113.7, 10.0.0.9")
    assert client_ip("10.0.0.2", chain, TRUSTED) == "203.0.113.7"


def test_peer_that_is_not_an_ip() -> None:
    """No peer gives None; a non-IP peer (UNIX socket) is returned as is."""
    spoofed = headers(x_forwarded_for="203.0.113.7")
    assert client_ip(None, spoofed, TRUSTED) is None
    assert client_ip("/run/llmproxy.sock", spoofed, TRUSTED) == "/run/llmproxy.sock"


_addresses = st.one_of(
    st.ip_addresses(network="10.0.0.0/8"),
    st.ip_addresses(network="fd00::/8"),
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
)


@st.composite
def _entries(draw: st.DrawFn) -> tuple[str, object]:
    """Draw one X-Forwarded-For entry and the address it names.

    Args:
        draw: Hypothesis's draw function.

    Returns:
        The entry text, and its address (IPv4-mapped read as IPv4), or None
        for garbage.
    """
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(alphabet="ghijkxyz []%-_", max_size=8)), None
    address = draw(_addresses)
    port = draw(st.integers(0, 65535))
    if address.version == 4:
        text = draw(
            st.sampled_from(
                [str(address), f"{address}:{port}", f"::ffff:{address}", f"[{address}]"]
            )
        )
    else:
        text = draw(
            st.sampled_from([str(address), f"[{address}]", f"[{address}]:{port}"])
        )
        if address.ipv4_mapped:
            address = address.ipv4_mapped
    return draw(st.sampled_from(["", " "])) + text + draw(st.sampled_from(["", " "])), (
        address
    )


@settings(max_examples=150, deadline=None)
@given(
    peer=_addresses,
    xff=st.lists(st.lists(_entries(), max_size=4), max_size=3),
    real_ip=st.lists(_entries(), max_size=2),
)
def test_client_ip_is_peer_or_a_header_address(
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address,
    xff: list[list[tuple[str, object]]],
    real_ip: list[tuple[str, object]],
) -> None:
    """Whatever the headers, the result is the peer or an address they named.

    Args:
        peer: The TCP peer.
        xff: X-Forwarded-For lines, each a list of entries.
        real_ip: X-Real-IP lines.
    """
    values: dict[str, list[str]] = {}
    if xff:
        values["x_forwarded_for"] = [",".join(t for t, _ in line) for line in xff]
    if real_ip:
        values["x_real_ip"] = [t for t, _ in real_ip]
    named = {a for line in xff for _, a in line} | {a for _, a in real_ip}
    result = client_ip(str(peer), headers(**values), TRUSTED)
    assert result is not None
    canonical_peer = getattr(peer, "ipv4_mapped", None) or peer
    allowed = {str(canonical_peer)} | {str(a) for a in named if a is not None}
    assert result in allowed
    if canonical_peer not in TRUSTED:
        assert result == str(canonical_peer)


@settings(max_examples=150, deadline=None)
@given(
    peer=st.one_of(st.none(), st.text(max_size=20), _addresses.map(str)),
    xff=st.lists(st.text(max_size=40), max_size=3),
    real_ip=st.lists(st.text(max_size=40), max_size=2),
)
def test_client_ip_never_raises(
    peer: str | None, xff: list[str], real_ip: list[str]
) -> None:
    """Arbitrary text in the peer and the headers never raises.

    Args:
        peer: The TCP peer, possibly not an address at all.
        xff: X-Forwarded-For lines of any text.
        real_ip: X-Real-IP lines of any text.
    """
    values: dict[str, list[str]] = {}
    if xff:
        values["x_forwarded_for"] = xff
    if real_ip:
        values["x_real_ip"] = real_ip
    result = client_ip(peer, headers(**values), NetworkSet(["0.0.0.0/0", "::/0"]))
    assert result is None or isinstance(result, str)


# --------------------------------------------------------------------------
# RateLimiter


def test_burst_then_refusal() -> None:
    """A full bucket allows ``burst`` requests at once, then refuses."""
    limiter = RateLimiter(5, 10, Clock())
    assert [limiter.take("a") for _ in range(10)] == [0.0] * 10
    assert limiter.take("a") == pytest.approx(0.2)
    assert limiter.take("b") == 0.0  # buckets are per key


def test_refill_at_rate() -> None:
    """Tokens come back at ``rate`` per second, never above ``burst``."""
    clock = Clock()
    limiter = RateLimiter(5, 10, clock)
    for _ in range(10):
        limiter.take("a")
    clock.advance(0.1)
    assert limiter.take("a") == pytest.approx(0.1)
    clock.advance(0.1)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.2)
    clock.advance(1.0)
    assert [limiter.take("a") for _ in range(5)] == [0.0] * 5
    assert limiter.take("a") > 0
    clock.advance(3600)
    assert [limiter.take("a") for _ in range(10)] == [0.0] * 10
    assert limiter.take("a") > 0


def test_fractional_rate() -> None:
    """A rate of 0.5 gives one token every 2 seconds."""
    clock = Clock()
    limiter = RateLimiter(0.5, 1, clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(2.0)
    clock.advance(1.0)
    assert limiter.take("a") == pytest.approx(1.0)
    clock.advance(1.0)
    assert limiter.take("a") == 0.0
    assert retry_after(limiter.take("a")) == 2


def test_waiting_the_returned_time_is_enough() -> None:
    """Advancing by exactly the returned wait makes the next take succeed."""
    clock = Clock()
    limiter = RateLimiter(3, 2, clock)
    limiter.take("a")
    limiter.take("a")
    for _ in range(20):
        wait = limiter.take("a")
        assert wait > 0
        clock.advance(wait)
        assert limiter.take("a") == 0.0


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(0.1, 50),
    burst=st.integers(1, 20),
    steps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_never_more_than_burst_plus_refill(
    rate: float, burst: int, steps: list[float]
) -> None:
    """Over any schedule, allowed requests never exceed ``burst + rate * t``.

    Args:
        rate: Tokens per second.
        burst: Bucket size.
        steps: Clock advances between requests.
    """
    clock = Clock()
    limiter = RateLimiter(rate, burst, clock)
    allowed = 0
    for step in steps:
        clock.advance(step)
        if limiter.take("a") == 0.0:
            allowed += 1
    assert allowed <= burst + rate * clock.seconds() + 1e-6


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (2.5, 3), (1.0 + 1e-12, 1), (59.9, 60)],
)
def test_retry_after(seconds: float, expected: int) -> None:
    """Retry-After is whole seconds, rounded up, at least 1.

    Args:
        seconds: The wait.
        expected: The header value.
    """
    assert retry_after(seconds) == expected


def test_retry_after_rejects_infinity() -> None:
    """A non-finite wait is a bug, not a header value."""
    with pytest.raises(ValueError):
        retry_after(float("inf"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "burst": 1},
        {"rate": -1, "burst": 1},
        {"rate": float("nan"), "burst": 1},
        {"rate": 1, "burst": 0},
        {"rate": 1, "burst": 1, "max_clients": 0},
    ],
)
def test_limiter_rejects_bad_limits(kwargs: dict) -> None:
    """Limits that cannot work are refused at construction.

    Args:
        kwargs: The constructor's arguments (besides the clock).
    """
    with pytest.raises(ValueError):
        RateLimiter(clock=Clock(), **kwargs)


def test_table_never_exceeds_max_clients() -> None:
    """100,000 distinct clients at once keep at most ``max_clients`` buckets."""
    limiter = RateLimiter(1, 10, Clock(), max_clients=1000)
    for i in range(100_000):
        assert limiter.take(f"client-{i}") == 0.0
        assert len(limiter) <= 1000
    assert len(limiter) == 1000


def test_eviction_is_least_recently_used() -> None:
    """The evicted bucket is the one used longest ago, not an active one."""
    limiter = RateLimiter(1, 1, Clock(), max_clients=2)
    limiter.take("a")
    limiter.take("b")
    limiter.take("a")  # refused, but "a" is now the most recent
    limiter.take("c")  # evicts "b"
    assert limiter.take("a") > 0  # still limited
    assert limiter.take("b") == 0.0  # evicted: starts full again


def test_idle_buckets_disappear_once_full() -> None:
    """Buckets are dropped lazily once they would have refilled to full."""
    clock = Clock()
    limiter = RateLimiter(1, 5, clock)
    for i in range(500):
        limiter.take(f"client-{i}")  # each full again at t=1
    clock.advance(0.5)
    limiter.take("active")
    assert len(limiter) == 501  # nothing has refilled yet
    clock.advance(0.5)
    for _ in range(100):
        limiter.take("active")  # refused mostly, but each take prunes a few
    assert len(limiter) == 1
    assert limiter.take("client-0") == 0.0


def test_prune_stops_at_first_live_bucket() -> None:
    """Pruning keeps a bucket that has not refilled yet."""
    clock = Clock()
    limiter = RateLimiter(1, 2, clock)
    limiter.take("old")
    limiter.take("old")  # empty: full again at t=2
    clock.advance(1.5)
    for _ in range(20):
        limiter.take("new")
    assert len(limiter) == 2
    assert limiter.take("old") == 0.0  # 1.5 tokens back
    assert limiter.take("old") == pytest.approx(0.5)


# --------------------------------------------------------------------------
# KeyStore and presented_key

PLAIN = "sk-plain-0123456789abcdef"
HASHED = "sk-hashed-fedcba9876543210"
HASHED_LINE = "sha256:" + hashlib.sha256(HASHED.encode()).hexdigest()


def key_store(*keys: str) -> KeyStore:
    """A store of ``keys``, as ``auth.keys`` would list them.

    Args:
        *keys: Plain keys or ``sha256:`` entries.

    Returns:
        The store.
    """
    return KeyStore.from_config(AuthConfig(keys=tuple(ClientKey(key=k) for k in keys)))


def loaded_auth(section: str) -> AuthConfig:
    """The ``auth`` section of a config, as loading it gives it.

    Args:
        section: The section's YAML (a flow mapping).

    Returns:
        The section, with its keys file's entries read.

    Raises:
        ConfigError: The section or its keys file is wrong.
    """
    text = f'target_map: {{"/": "http://a"}}\nauth: {section}\n'
    auth = parse_config_text(text, environ={}).auth
    assert auth is not None
    return auth


def keys_file_auth(path: Path) -> AuthConfig:
    """The ``auth`` section of a config with one key and ``path`` as its keys file.

    Args:
        path: The keys file.

    Returns:
        The section, with the file's entries read.

    Raises:
        ConfigError: The file is unreadable or malformed.
    """
    return loaded_auth(f'{{keys: [config-key], keys_file: "{path}"}}')


def test_plain_and_hashed_keys() -> None:
    """Plain keys are hashed at load; ``sha256:`` entries are stored hashes."""
    upper_hex = "sha256:" + HASHED_LINE.split(":", 1)[1].upper()
    store = key_store(PLAIN, upper_hex)
    assert len(store) == 2
    plain_id = store.check(PLAIN)
    hashed_id = store.check(HASHED)
    assert plain_id == "key-" + hashlib.sha256(PLAIN.encode()).hexdigest()[:8]
    assert hashed_id == "key-" + hashlib.sha256(HASHED.encode()).hexdigest()[:8]
    assert plain_id != hashed_id
    assert store.check(PLAIN) == plain_id  # stable


def test_wrong_and_missing_keys() -> None:
    """Unknown, empty and missing keys match nothing."""
    store = key_store(PLAIN)
    assert store.check(PLAIN + "x") is None
    assert store.check(PLAIN[:-1]) is None
    assert store.check(HASHED_LINE) is None  # the hash is not the key
    assert store.check("") is None
    assert store.check(None) is None
    assert key_store().check(PLAIN) is None


def test_id_is_not_the_key() -> None:
    """The id is safe to log: it does not contain the key."""
    store = key_store(PLAIN)
    key_id = store.check(PLAIN)
    assert key_id is not None
    assert PLAIN not in key_id and key_id not in PLAIN
    assert PLAIN not in repr(store)


def test_every_digest_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check compares against every stored digest, even after a match.

    Args:
        monkeypatch: Pytest's patcher.
    """
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    store = key_store(PLAIN, HASHED, "third-key")
    assert store.check(PLAIN) is not None
    assert len(calls) == 3
    calls.clear()
    assert store.check("nope") is None
    assert len(calls) == 3


def test_keys_file(tmp_path: Path) -> None:
    """A keys file, read with the config: comments and blank lines skipped,
    both entry kinds read.

    Args:
        tmp_path: A fresh directory.
    """
    path = tmp_path / "keys"
    path.write_text(
        f"# team keys\n\n  {PLAIN}  \n   # indented comment\n{HASHED_LINE}\n"
    )
    auth = keys_file_auth(path)
    assert len(auth.file_keys) == 2
    assert PLAIN not in repr(auth) and HASHED_LINE not in repr(auth)
    path.unlink()  # read once, when the config loaded
    store = KeyStore.from_config(auth)
    assert len(store) == 3
    assert store.check(PLAIN) is not None
    assert store.check(HASHED) is not None
    assert store.check("config-key") is not None
    assert store.check("# team keys") is None


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:" + "ab" * 31,
        "sha256:" + "zz" * 32,
        "sha256:" + "ab" * 33,
        "sha256:",
    ],
)
def test_keys_file_malformed_line(tmp_path: Path, bad: str) -> None:
    """A malformed ``sha256:`` line is an error naming its line number only.

    Args:
        tmp_path: A fresh directory.
        bad: The malformed entry.
    """
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{PLAIN}\n{bad}\n")
    with pytest.raises(ConfigError, match="line 3") as info:
        keys_file_auth(path)
    assert info.value.key == "auth.keys_file"
    message = str(info.value)
    assert repr(str(path)) in message
    assert PLAIN not in message
    assert bad.removeprefix("sha256:") not in message or bad == "sha256:"
    assert info.value.__cause__ is None


def test_malformed_config_key() -> None:
    """A malformed or empty config key names its index, not its value."""
    with pytest.raises(ConfigError) as refused:
        loaded_auth(f"{{keys: [{PLAIN}, 'sha256:nothex']}}")
    assert refused.value.key == "auth.keys[1]"
    assert "nothex" not in str(refused.value) and PLAIN not in str(refused.value)
    # A section made by hand, which nothing checked: the store refuses it.
    with pytest.raises(ValueError, match=r"keys\[1\]") as info:
        key_store(PLAIN, "sha256:nothex")
    assert "nothex" not in str(info.value)
    with pytest.raises(ValueError, match=r"keys\[0\]"):
        key_store("  ")
    loose = AuthConfig(file_keys=(ClientKey(key="sha256:"),))
    with pytest.raises(ValueError, match=r"file_keys\[0\]"):
        KeyStore.from_config(loose)


def test_keys_file_unreadable(tmp_path: Path) -> None:
    """A missing file or one that is not UTF-8 is a clear error.

    Args:
        tmp_path: A fresh directory.
    """
    with pytest.raises(ConfigError, match="cannot read") as missing:
        keys_file_auth(tmp_path / "missing")
    assert missing.value.key == "auth.keys_file"
    binary = tmp_path / "binary"
    binary.write_bytes(b"good-key\n\xff\xfesecret\n")
    with pytest.raises(ConfigError, match="line 2: not UTF-8") as info:
        keys_file_auth(binary)
    assert info.value.key == "auth.keys_file"
    assert "secret" not in str(info.value) and info.value.__context__ is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"authorization": f"Bearer {PLAIN}"}, PLAIN),
        ({"authorization": f"bearer   {PLAIN} "}, PLAIN),
        ({"authorization": f"BEARER\t{PLAIN}"}, PLAIN),
        ({"x_api_key": f" {PLAIN} "}, PLAIN),
        ({"authorization": f"Bearer {PLAIN}", "x_api_key": "other"}, PLAIN),
        ({"authorization": "Basic dXNlcjpwdw==", "x_api_key": PLAIN}, PLAIN),
        ({"authorization": "Bearer", "x_api_key": PLAIN}, PLAIN),
        ({"authorization": "Basic dXNlcjpwdw=="}, None),
        ({"authorization": "Bearer "}, None),
        ({"x_api_key": ""}, None),
        ({}, None),
    ],
)
def test_presented_key(values: dict[str, str], expected: str | None) -> None:
    """The key comes from ``Authorization: Bearer`` or ``x-api-key``.

    Args:
        values: The request headers.
        expected: The key found, or None.
    """
    assert presented_key(headers(**values)) == expected


def test_presented_key_checks_end_to_end() -> None:
    """Both header forms resolve to the same key id."""
    store = key_store(PLAIN)
    via_bearer = store.check(presented_key(headers(authorization=f"Bearer {PLAIN}")))
    via_header = store.check(presented_key(headers(x_api_key=PLAIN)))
    assert via_bearer is not None and via_bearer == via_header


def test_the_memory_store_is_a_service() -> None:
    """Like the Redis store, the in-process one is a Twisted service, which
    :meth:`Limits.close` stops."""
    store = MemoryStore(Clock(), RateLimiter(1, 1, Clock()))
    assert verifyObject(IService, store)
    store.startService()
    assert store.running
    limits = Limits(store, Clock(), 1, 1)
    assert limits.close() is None
    assert not store.running
