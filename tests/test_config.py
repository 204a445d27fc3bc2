"""Unit tests for :mod:`llmproxy.config`: YAML in, frozen attrs classes out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.config import (
    Config,
    ConfigError,
    ConfigErrors,
    dump_config,
    PoolConfig,
    RateLimitConfig,
    RouteConfig,
    TimeoutsConfig,
    key_digest,
    load_config,
    parse_config,
    parse_config_text,
    parse_redis_url,
)

#: The repository root, so that shipped files are found from any cwd.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: The smallest valid config: one path mapped to one base URL.
MINIMAL = 'target_map:\n  "/v1/": "http://up.example"\n'

#: A config in the seed's format, using every key the seed knew.
SEED = """\
port: 8080
proxy_url: "http://proxy.example:3128"
rate_limit:
  rate: 2.5
  burst: 10
target_map:
  "/chat/completions": "https://ark.example/api/v3"
  "/embeddings": "https://embed.example/api/paas/v4"
  "/v1/": "https://api.openai.example"
model_routes:
  "gpt-4o": "https://api.openai.example/v1"
  "embedding-2":
    urls:
      - "https://a.example/v4"
      - "https://b.example/v4"
"""


def parse(text: str, environ: Mapping[str, str] | None = None) -> Config:
    """Parse YAML text with an explicit, by default empty, environment.

    Args:
        text: The YAML document.
        environ: The variables ``${NAME}`` may use.

    Returns:
        The validated configuration.
    """
    return parse_config_text(text, environ={} if environ is None else environ)


def config_error(text: str, environ: Mapping[str, str] | None = None) -> ConfigError:
    """Parse YAML text that must be refused, and return the error.

    Args:
        text: The YAML document.
        environ: The variables ``${NAME}`` may use.

    Returns:
        The ConfigError raised, already checked to be a single line whose
        text is ``key: message``.
    """
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    err = info.value
    assert str(err) == f"{err.key}: {err.message}"
    assert "\n" not in str(err)
    return err


# -- the seed's format -----------------------------------------------------


def test_seed_config_loads_unchanged() -> None:
    """The seed's keys parse into the matching attrs classes."""
    config = parse(SEED)

    assert config.listen == "tcp:8080:backlog=1024"
    assert config.proxy_url == "http://proxy.example:3128"
    assert config.rate_limit == RateLimitConfig(rate=2.5, burst=10)
    assert dict(config.target_map) == {
        "/chat/completions": RouteConfig(urls=("https://ark.example/api/v3",)),
        "/embeddings": RouteConfig(urls=("https://embed.example/api/paas/v4",)),
        "/v1/": RouteConfig(urls=("https://api.openai.example",)),
    }
    assert dict(config.model_routes) == {
        "gpt-4o": RouteConfig(urls=("https://api.openai.example/v1",)),
        "embedding-2": RouteConfig(
            urls=("https://a.example/v4", "https://b.example/v4")
        ),
    }


def test_seed_config_keeps_file_order() -> None:
    """target_map and model_routes keep the order the file gives."""
    config = parse(SEED)

    assert list(config.target_map) == ["/chat/completions", "/embeddings", "/v1/"]
    assert list(config.model_routes) == ["gpt-4o", "embedding-2"]


def test_parse_config_accepts_parsed_data() -> None:
    """parse_config takes the already-loaded YAML data (a dict)."""
    config = parse_config(
        {"port": 9000, "target_map": {"/v1/": "http://up.example/"}},
        environ={},
        source="inline",
    )

    assert config.listen == "tcp:9000:backlog=1024"
    assert config.target_map["/v1/"].urls == ("http://up.example",)
    assert config.source == "inline"


@pytest.mark.parametrize(
    ("obj", "field", "value"),
    [
        (parse(SEED), "listen", "tcp:1"),
        (parse(SEED), "target_map", {}),
        (parse(SEED).rate_limit, "rate", 1.0),
        (parse(SEED).target_map["/v1/"], "urls", ()),
        (TimeoutsConfig(), "response_header", 1.0),
        (PoolConfig(), "max_per_host", 1),
    ],
    ids=["Config.listen", "Config.target_map", "RateLimitConfig", "RouteConfig",
         "TimeoutsConfig", "PoolConfig"],
)
def test_config_classes_are_frozen(obj: Any, field: str, value: Any) -> None:
    """Every config class refuses attribute assignment.

    Args:
        obj: An instance of a config class.
        field: One of its attributes.
        value: A new value to try to assign.
    """
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(obj, field, value)


def test_route_tables_are_read_only() -> None:
    """The route mappings cannot be changed behind the config's back."""
    config = parse(SEED)

    with pytest.raises(TypeError):
        config.target_map["/x/"] = RouteConfig(urls=("http://x",))  # type: ignore[index]
    with pytest.raises(TypeError):
        config.model_routes["m"] = RouteConfig(urls=("http://x",))  # type: ignore[index]
    assert isinstance(config.target_map["/v1/"].urls, tuple)


@pytest.mark.parametrize("name", ["config.yml", "demo.yml"])
def test_shipped_config_files_load(name: str) -> None:
    """The files under etc/ are valid configs.

    Args:
        name: The file's name under ``etc/``.
    """
    path = REPO_ROOT / "etc" / name

    config = load_config(str(path), environ={})

    assert config.source == str(path)
    assert config.target_map
    assert all(key.startswith("/") for key in config.target_map)


def test_shipped_demo_config_values() -> None:
    """etc/demo.yml listens on loopback and round-robins its demo model."""
    config = load_config(str(REPO_ROOT / "etc" / "demo.yml"), environ={})

    assert config.listen == "tcp:8000:interface=127.0.0.1:backlog=1024"
    assert config.demo_upstream == "tcp:9001:interface=127.0.0.1"
    assert len(config.model_routes["demo"].urls) == 2


# -- listen / port ---------------------------------------------------------


def test_listen_defaults_to_tcp_8000() -> None:
    """Without port or listen the proxy listens on tcp:8000."""
    assert parse(MINIMAL).listen == "tcp:8000:backlog=1024"


def test_port_becomes_a_tcp_endpoint() -> None:
    """The seed's ``port`` is turned into an endpoint string."""
    assert parse(MINIMAL + "port: 9000\n").listen == "tcp:9000:backlog=1024"
    assert parse(MINIMAL + "backlog: 64\n").listen == "tcp:8000:backlog=64"
    explicit = 'listen: "tcp:1:backlog=5"\n'
    assert parse(MINIMAL + explicit).listen == "tcp:1:backlog=5"


def test_listen_endpoint_string_is_kept() -> None:
    """``listen`` takes any Twisted server endpoint string as given."""
    config = parse(MINIMAL + 'listen: "tcp:8443:interface=127.0.0.1"\n')

    assert config.listen == "tcp:8443:interface=127.0.0.1:backlog=1024"


def test_port_and_listen_together_is_an_error_naming_listen() -> None:
    """Giving both ``port`` and ``listen`` is refused, naming ``listen``."""
    err = config_error(MINIMAL + "port: 9000\nlisten: tcp:9001\n")

    assert err.key == "listen"
    assert "port" in err.message


@given(port=st.integers(min_value=1, max_value=65535))
def test_any_valid_port_is_accepted(port: int) -> None:
    """Every port from 1 to 65535 gives ``tcp:<port>``.

    Args:
        port: A valid TCP port.
    """
    assert parse(MINIMAL + f"port: {port}\n").listen == f"tcp:{port}:backlog=1024"


@given(
    port=st.one_of(
        st.integers(max_value=0), st.integers(min_value=65536, max_value=10**12)
    )
)
def test_any_invalid_port_is_refused(port: int) -> None:
    """Every port outside 1-65535 is a ConfigError on ``port``.

    Args:
        port: An out-of-range integer.
    """
    err = config_error(MINIMAL + f"port: {port}\n")

    assert err.key == "port"
    assert "out of range" in err.message


# -- environment variables -------------------------------------------------


def test_environment_variables_expand_in_string_values() -> None:
    """``${NAME}`` in a string value is replaced from ``environ``."""
    text = """\
listen: "tcp:${PORT}"
proxy_url: "http://${PROXY_HOST}:3128"
target_map:
  "/v1/": "https://${UP}/base"
model_routes:
  m:
    urls: ["http://${UP}", "http://${UP}:81"]
"""
    environ = {"PORT": "9100", "PROXY_HOST": "proxy.local", "UP": "up.local"}

    config = parse(text, environ)

    assert config.listen == "tcp:9100:backlog=1024"
    assert config.proxy_url == "http://proxy.local:3128"
    assert config.target_map["/v1/"].urls == ("https://up.local/base",)
    assert config.model_routes["m"].urls == ("http://up.local", "http://up.local:81")


def test_environment_is_not_read_when_environ_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An explicit ``environ`` is used instead of the process environment.

    Args:
        monkeypatch: Sets a variable in the real environment.
    """
    monkeypatch.setenv("LLMPROXY_TEST_ONLY_IN_OS_ENVIRON", "x")

    err = config_error(
        MINIMAL + 'proxy_url: "http://${LLMPROXY_TEST_ONLY_IN_OS_ENVIRON}:3128"\n'
    )

    assert err.key == "proxy_url"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + 'proxy_url: "http://u:${PROXY_PASSWORD}@proxy:3128"\n', "proxy_url"),
        ('target_map:\n  "/v1/": "https://${UPSTREAM}"\n', 'target_map["/v1/"]'),
        (
            MINIMAL + 'model_routes:\n  gpt-4:\n    urls: ["http://a", "${B}"]\n',
            "model_routes.gpt-4.urls[1]",
        ),
        (MINIMAL + 'listen: "tcp:${PORT}"\n', "listen"),
    ],
)
def test_unset_environment_variable_names_key_and_variable(text: str, key: str) -> None:
    """An unset ``${NAME}`` is an error naming the key and the variable.

    Args:
        text: A config using an unset variable.
        key: The key path whose value uses it.
    """
    err = config_error(text, environ={"OTHER": "1"})

    assert err.key == key
    assert "not set" in err.message
    variable = text.split("${", 1)[1].split("}", 1)[0]
    assert variable in err.message


# -- errors ----------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A config file that does not exist is a one-line error naming it.

    Args:
        tmp_path: A fresh directory.
    """
    path = tmp_path / "absent.yml"

    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})

    assert info.value.key == str(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert "\n" not in str(info.value)


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    """load_config parses the file and records its name as the source.

    Args:
        tmp_path: A fresh directory.
    """
    path = tmp_path / "c.yml"
    path.write_text(SEED, encoding="utf-8")

    config = load_config(str(path), environ={})

    assert config == attrs.evolve(parse(SEED), source=str(path))


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    """Invalid YAML in a file is reported with the file's name.

    Args:
        tmp_path: A fresh directory.
    """
    path = tmp_path / "broken.yml"
    path.write_text("port: 8000\ntarget_map: [\n", encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})

    assert info.value.key == str(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('port: 8000\ntarget_map:\n  "/v1/": http://a: b\n', 3),
        ('port: 8000\ntarget_map:\n "/v1/": "http://a"\n  "/x/": "http://b"\n', 4),
        ("port: 8000\n\ttarget_map: x\n", 2),
        ('target_map: {"/v1/": "http://a"\nport: 8000\nlisten: x\n', 2),
        ("port: 8000\nport: 8000\nport: [\n\n\n", 6),
    ],
)
def test_invalid_yaml_names_the_line(text: str, line: int) -> None:
    """Text that is not YAML is an error giving the line of the mistake.

    Args:
        text: Broken YAML.
        line: The 1-based line the parser stops at.
    """
    err = config_error(text)

    assert err.key == "<config>"
    assert "invalid YAML" in err.message
    assert f"line {line}," in err.message


#: (YAML text, expected key path prefix, expected fragment of the message).
ERROR_CASES: list[tuple[str, str, str]] = [
    # unknown keys, with a suggestion
    (MINIMAL + 'tagret_map: {"/x/": "http://a"}\n', "tagret_map", "did you mean 'target_map'"),
    ('prot: 80\n' + MINIMAL, "prot", "did you mean 'port'"),
    (MINIMAL + "rate_limit: {rate: 1, brust: 2}\n", "rate_limit.brust", "did you mean 'burst'"),
    (MINIMAL + "timeouts: {response_headers: 5}\n", "timeouts.response_headers",
     "did you mean 'response_header'"),
    (MINIMAL + "pool: {max_per_hosts: 5}\n", "pool.max_per_hosts", "did you mean 'max_per_host'"),
    (MINIMAL + "model_routes:\n  gpt-4:\n    url: http://a\n", "model_routes.gpt-4.url",
     "did you mean 'urls'"),
    (MINIMAL + "zzz: 1\n", "zzz", "unknown key"),
    # wrong types
    (MINIMAL + 'port: "80"\n', "port", "expected an integer"),
    (MINIMAL + "port: true\n", "port", "expected an integer"),
    (MINIMAL + "rate_limit: {rate: fast}\n", "rate_limit.rate", "expected a number"),
    (MINIMAL + "rate_limit: {rate: 5, burst: 1.5}\n", "rate_limit.burst", "expected an integer"),
    (MINIMAL + "rate_limit: 5\n", "rate_limit", "expected a mapping"),
    (MINIMAL + "max_connections: 0\n", "max_connections", "at least 1"),
    (MINIMAL + "max_connections: many\n", "max_connections", "expected an integer"),
    (MINIMAL + "timeouts: {request_read: -1}\n", "timeouts.request_read", "positive"),
    ("target_map: [a]\n", "target_map", "expected a mapping"),
    ('target_map:\n  "/v1/": 42\n', 'target_map["/v1/"]', "expected a URL"),
    ('target_map:\n  "/v1/": {urls: 5}\n', 'target_map["/v1/"].urls', "expected a list"),
    (MINIMAL + "listen: 8000\n", "listen", "expected a string"),
    ("- port: 80\n", "<config>", "expected a mapping"),
    ("", "<config>", "empty"),
    # URLs
    ('target_map:\n  "/v1/": "ftp://up.example"\n', 'target_map["/v1/"]', "not an http(s) URL"),
    ('target_map:\n  "/v1/": "up.example"\n', 'target_map["/v1/"]', "not an http(s) URL"),
    ('target_map:\n  "/v1/": "http://"\n', 'target_map["/v1/"]', "not an http(s) URL"),
    (MINIMAL + 'model_routes:\n  gpt-4:\n    urls: ["http://a", "ftp://x"]\n',
     "model_routes.gpt-4.urls[1]", "not an http(s) URL: 'ftp://x'"),
    (MINIMAL + "model_routes:\n  gpt-4:\n    urls: []\n", "model_routes.gpt-4.urls",
     "at least one URL"),
    (MINIMAL + "model_routes:\n  gpt-4: {}\n", "model_routes.gpt-4.urls", "required"),
    ('target_map:\n  "/v1/": "http://h:0"\n', 'target_map["/v1/"]', "out of range"),
    ('target_map:\n  "/v1/": "http://h:99999"\n', 'target_map["/v1/"]', "out of range"),
    ('target_map:\n  "/v1/": "http://h:65536"\n', 'target_map["/v1/"]', "out of range"),
    ('target_map:\n  "/v1/": "http://u:pw@h"\n', 'target_map["/v1/"]', "credentials"),
    ('target_map:\n  "/v1/": "http://h/?a=1"\n', 'target_map["/v1/"]', "?query"),
    (MINIMAL + 'proxy_url: "socks5://proxy:1080"\n', "proxy_url", "not an http(s) URL"),
    (MINIMAL + 'proxy_url: "http://proxy:3128/path"\n', "proxy_url", "no path"),
    # ports
    (MINIMAL + "port: 0\n", "port", "out of range"),
    (MINIMAL + "port: 65536\n", "port", "out of range"),
    # target_map
    ("port: 8000\n", "target_map", "required"),
    ("target_map: {}\n", "target_map", "required"),
    ('target_map:\n  "v1/": "http://a"\n', "target_map", "must start with '/'"),
    ('target_map:\n  "": "http://a"\n', "target_map", "empty"),
    # numbers
    (MINIMAL + "timeouts: {response_header: 0}\n", "timeouts.response_header", "positive"),
    (MINIMAL + "timeouts: {response_header: -5}\n", "timeouts.response_header", "positive"),
    (MINIMAL + "timeouts: {response_header: .nan}\n", "timeouts.response_header", "positive"),
    (MINIMAL + "timeouts: {connect: .inf}\n", "timeouts.connect", "positive"),
    (MINIMAL + "pool: {max_per_host: 0}\n", "pool.max_per_host", "at least 1"),
    (MINIMAL + "rate_limit: {burst: 3}\n", "rate_limit.rate", "required"),
    (MINIMAL + "rate_limit: {rate: 0}\n", "rate_limit.rate", "positive"),
    # environment
    (MINIMAL + 'proxy_url: "http://${PROXY_HOST}:3128"\n', "proxy_url", "PROXY_HOST"),
    (MINIMAL + 'listen: "tcp:${}"\n', "listen", "not a valid variable name"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), ERROR_CASES)
def test_mistakes_are_one_line_errors_naming_the_key(
    text: str, key: str, fragment: str
) -> None:
    """Each mistake is a one-line ConfigError starting with its key path.

    Args:
        text: A config with one mistake.
        key: The expected start of the error's key path.
        fragment: Text the message must contain.
    """
    err = config_error(text)

    assert err.key.startswith(key), err
    assert str(err).startswith(key)
    assert fragment in err.message, err


def test_unknown_key_message_lists_known_keys() -> None:
    """An unknown key without a close match still lists what is allowed."""
    err = config_error(MINIMAL + "rate_limit: {rate: 1, zzzzzz: 2}\n")

    assert err.key == "rate_limit.zzzzzz"
    assert "did you mean" not in err.message
    assert "rate, burst" in err.message


# -- defaults and values ---------------------------------------------------


def test_defaults() -> None:
    """Omitted sections get the seed's timeouts and a roomy pool."""
    config = parse(MINIMAL)

    assert config.timeouts.response_header == 900
    assert config.pool.max_per_host >= 32
    assert config.proxy_url is None
    assert config.rate_limit is None
    assert dict(config.model_routes) == {}
    assert config.demo_upstream is None


def test_partial_sections_keep_other_defaults() -> None:
    """Setting one field of a section leaves its other fields at default."""
    config = parse(MINIMAL + "timeouts: {connect: 3}\npool: {idle_timeout: 20}\n")

    assert config.timeouts == TimeoutsConfig(response_header=900.0, connect=3.0)
    assert config.pool.idle_timeout == 20.0
    assert config.pool.max_per_host >= 32


def test_rate_limit_burst_defaults_from_rate() -> None:
    """Without ``burst`` the bucket holds at least one second's worth."""
    assert parse(MINIMAL + "rate_limit: {rate: 5}\n").rate_limit == RateLimitConfig(
        rate=5.0, burst=5
    )
    assert parse(MINIMAL + "rate_limit: {rate: 0.5}\n").rate_limit == RateLimitConfig(
        rate=0.5, burst=1
    )


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("http://up.example/", "http://up.example"),
        ("http://up.example/v1/", "http://up.example/v1"),
        ("http://up.example/v1//", "http://up.example/v1"),
        ("  https://up.example:8443/api  ", "https://up.example:8443/api"),
        ("http://[::1]:9001/", "http://[::1]:9001"),
    ],
)
def test_base_urls_lose_trailing_slashes(url: str, stored: str) -> None:
    """Base URLs are stored so that ``base + "/path"`` has no ``//``.

    Args:
        url: The base URL as written.
        stored: The base URL as the config keeps it.
    """
    config = parse(
        f'target_map:\n  "/v1/": "{url}"\nmodel_routes:\n  m: {{urls: ["{url}"]}}\n'
    )

    assert config.target_map["/v1/"].urls == (stored,)
    assert config.model_routes["m"].urls == (stored,)
    assert "//" not in (stored + "/v1/chat").split("://", 1)[1]


def test_single_url_string_in_urls_is_accepted() -> None:
    """``urls: http://x`` is read as a list of one URL."""
    config = parse(MINIMAL + "model_routes:\n  m: {urls: 'http://x/'}\n")

    assert config.model_routes["m"].urls == ("http://x",)


# -- proxy credentials -----------------------------------------------------


def test_proxy_url_credentials_are_accepted_but_not_shown() -> None:
    """A proxy password is kept for use but never appears in the repr."""
    config = parse(MINIMAL + 'proxy_url: "http://user:s3cretpw@proxy:3128"\n')

    assert config.proxy_url == "http://user:s3cretpw@proxy:3128"
    assert "s3cretpw" not in repr(config)
    assert "s3cretpw" not in str(config)
    assert "user:***@proxy:3128" in repr(config)


def test_proxy_password_from_environment_is_not_shown() -> None:
    """A password taken from ``${NAME}`` is redacted in the repr too."""
    config = parse(
        MINIMAL + 'proxy_url: "http://user:${PROXY_PASSWORD}@proxy:3128"\n',
        environ={"PROXY_PASSWORD": "fromenv123"},
    )

    assert config.proxy_url == "http://user:fromenv123@proxy:3128"
    assert "fromenv123" not in repr(config)


@pytest.mark.parametrize(
    "proxy_url",
    [
        "ftp://user:s3cretpw@proxy:3128",
        "http://user:s3cretpw@proxy:99999",
        "http://user:s3cretpw@proxy:3128/path",
        "http://user:s3cretpw@proxy:3128?q=1",
        "http://user:s3cretpw@:3128",
    ],
)
def test_proxy_url_errors_do_not_show_the_password(proxy_url: str) -> None:
    """An invalid proxy URL is refused without echoing its password.

    Args:
        proxy_url: A wrong proxy URL with a password.
    """
    err = config_error(MINIMAL + f'proxy_url: "{proxy_url}"\n')

    assert err.key == "proxy_url"
    assert "s3cretpw" not in str(err)


# -- problems found in review, now fixed -----------------------------------


@pytest.mark.parametrize(
    "proxy_url", ["http://[::1", "http://user:pw@[::1:3128"], ids=["bare", "with-credentials"]
)
def test_malformed_ipv6_proxy_url_is_a_config_error(proxy_url: str) -> None:
    """A proxy URL with an unclosed ``[`` is a ConfigError on proxy_url.

    Args:
        proxy_url: A proxy URL that urlsplit cannot parse.
    """
    err = config_error(MINIMAL + f'proxy_url: "{proxy_url}"\n')

    assert err.key == "proxy_url"


@pytest.mark.parametrize(
    "text",
    [
        b'port: 8000\ntarget_map:\n  "/v1/": "http://a\xff"\n',
        'port: 8000\ntarget_map:\n  "/v1/": "http://a\x07"\n',
    ],
    ids=["invalid-utf8", "control-char"],
)
def test_unreadable_characters_are_one_line_errors_with_line(text: str | bytes) -> None:
    """Invalid UTF-8 or a control character is a one-line error with its line.

    Args:
        text: A config whose third line holds a bad character.
    """
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, environ={})

    assert "\n" not in str(info.value)
    assert "line 3" in info.value.message


@pytest.mark.parametrize("delimiter", ["#", "?", "/", "@"])
def test_proxy_password_with_url_delimiters_is_never_shown(delimiter: str) -> None:
    """A password holding a URL delimiter is accepted and never echoed.

    Neither ``repr(config)`` nor an error about another part of the same URL
    shows it.

    Args:
        delimiter: A character that would break naive URL parsing.
    """
    url = f"http://user:s3cr{delimiter}tpw@proxy:3128"
    config = parse(MINIMAL + f'proxy_url: "{url}"\n')
    assert config.proxy_url == url
    assert "tpw" not in repr(config)

    err = config_error(MINIMAL + f'proxy_url: "http://user:s3cr{delimiter}tpw@proxy:99999"\n')
    assert err.key == "proxy_url"
    assert "tpw" not in str(err)


def test_url_port_out_of_range_message_matches_port_key() -> None:
    """``http://h:99999`` gets the same wording as an out-of-range ``port``."""
    err = config_error('target_map:\n  "/v1/": "http://h:99999"\n')

    assert err.message.startswith("port out of range (1-65535)")
    assert "not an http(s) URL" not in err.message


def test_proxy_url_without_scheme_says_so() -> None:
    """A schemeless proxy URL is reported as not being an http(s) URL."""
    err = config_error(MINIMAL + 'proxy_url: "user:pw@proxy:3128"\n')

    assert err.key == "proxy_url"
    assert "http" in err.message
    assert "no path" not in err.message
    assert "pw" not in err.message


def test_duplicate_target_map_key_is_an_error() -> None:
    """The same path given twice in target_map is refused."""
    err = config_error(
        'target_map:\n  "/v1/": "http://a"\n  "/v1/": "http://b"\n'
    )

    assert err.key.startswith("target_map")
    assert "duplicate" in err.message


@pytest.mark.parametrize("key", ['"sk-a\\nX-Injected: 1"', '"sk-a\\rb"', '""'])
def test_api_key_with_a_line_break_is_refused(key: str) -> None:
    """An upstream ``api_key`` is sent as a header value: one holding a line
    break (which would split the upstream request) or nothing is refused,
    naming the key, and the key itself is not echoed."""
    err = config_error(
        f'target_map:\n  "/v1/":\n    urls: ["http://up.example"]\n    api_key: {key}\n'
    )
    assert err.key.endswith("api_key")
    assert "sk-a" not in str(err)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("rediss://:hunter2-pw@h", "not supported"),
        ("redis://:hunter2-pw@h:99999", "port"),
        ("http://:hunter2-pw@h", "not a redis:// URL"),
    ],
)
def test_a_bad_store_url_is_refused_without_its_password(url: str, problem: str) -> None:
    """``rate_limit.store`` is checked at load by the config's own parser."""
    err = config_error(MINIMAL + f'rate_limit: {{rate: 1, store: "{url}"}}\n')
    assert err.key == "rate_limit.store"
    assert problem in err.message
    assert "hunter2" not in str(err)


def test_the_store_url_is_split_by_the_config() -> None:
    """:func:`parse_redis_url` is the config's: host, port, db, user, password."""
    assert parse_redis_url("redis://u:p%40ss@[::1]:7000/2") == ("::1", 7000, 2, "u", "p@ss")


def test_key_digest_reads_both_forms() -> None:
    """A plain key stands for its SHA-256; ``sha256:`` entries for theirs."""
    digest = hashlib.sha256(b"sk-plain").digest()
    assert key_digest(" sk-plain ") == digest
    assert key_digest("SHA256:" + digest.hex().upper()) == digest
    assert key_digest("sha256:" + digest.hex()[:-2]) is None
    assert key_digest("   ") is None


def test_every_mistake_is_found_in_one_reading_with_its_place() -> None:
    """Mistakes in two routes, a key entry and a section come back together,
    in file order, each with its key path, line and column; a table whose
    only entry is wrong is not also called missing."""
    text = (
        "target_map:\n"                             # 1
        '  "/v1/": "ftp://nope"\n'                  # 2
        "model_routes:\n"                           # 3
        '  "m": {urls: ["http://a"], retries: -1}\n'  # 4
        "auth:\n"                                   # 5
        "  keys:\n"                                 # 6
        "    - {key: k, name: 'bad name'}\n"        # 7
        "timeouts: {connect: 0}\n"                  # 8
    )
    with pytest.raises(ConfigErrors) as raised:
        parse_config_text(text, environ={})
    found = [(e.key, e.line, e.column) for e in raised.value.errors]
    assert found == [
        ('target_map["/v1/"]', 2, 3),
        ("model_routes.m.retries", 4, 29),
        ("auth.keys[0].name", 7, 16),
        ("timeouts.connect", 8, 12),
    ]
    assert raised.value.key == 'target_map["/v1/"]', "the first mistake's key"
    assert str(raised.value).startswith('target_map["/v1/"]: not an http(s) URL')
    assert str(raised.value).endswith("; timeouts.connect: must be a positive number, got 0")


def test_the_check_dump_names_only_keys_the_config_takes() -> None:
    """--check's dump is a config itself: read back, it gives the same
    routes (weighted URLs as ``{url, weight}``, no ``weights`` key)."""
    text = (
        'target_map:\n  "/v1/": {urls: [{url: "http://a", weight: 3}, "http://b"],'
        " strategy: weighted}\n"
        'model_routes: {"m": {urls: ["http://c"], retries: 0}}\n'
        'prices: {"m*": {input: 1, output: 2}}\n'
    )
    config = parse_config_text(text, environ={})
    dumped = dump_config(config)
    assert "weights" not in dumped
    again = parse_config_text(dumped, environ={})
    assert again.target_map == config.target_map
    assert again.model_routes == config.model_routes
    assert again.prices == config.prices
    assert (again.metrics, again.metrics_max_models) == (True, 100)


@pytest.mark.parametrize("text, expected", [
    ("metrics: false", (False, 100)),
    ("metrics: true", (True, 100)),
    ("metrics: {max_models: 20}", (True, 20)),
    ("metrics: {enabled: false, max_models: 20}", (False, 20)),
])
def test_metrics_is_a_switch_or_a_mapping(text: str, expected: tuple[bool, int]) -> None:
    """``metrics`` turns them on or off, or bounds the model names labelled."""
    config = parse_config_text(f'target_map: {{"/": "http://a"}}\n{text}\n', environ={})
    assert (config.metrics, config.metrics_max_models) == expected
    with pytest.raises(ConfigError) as raised:
        parse_config_text('target_map: {"/": "http://a"}\nmetrics: {max_models: 0}\n',
                          environ={})
    assert raised.value.key == "metrics.max_models"
