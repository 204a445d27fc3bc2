"""The config against hostile or broken input: CA files, secrets, YAML bombs.

Three promises, each checked through :func:`parse_config_text`,
:func:`load_config` and the real ``twistd llmproxy --check``:

- ``tls.ca_file`` is parsed when the config loads, certificate by
  certificate, so a file OpenSSL could not load never reaches run time;
- no message ever quotes a value under a secret key (a route's ``api_key``,
  a client key, ``proxy_url``, ``rate_limit.store``) or a keys-file line;
- a YAML document is bounded (size, aliases, what aliases expand to,
  nesting) before anything walks or builds it.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs import make_ca
from llmproxy.config import Config, ConfigError, load_config, parse_config_text
from test_ops import check

#: The smallest valid config: one path mapped to one base URL.
MINIMAL = 'target_map:\n  "/v1/": "http://up.example"\n'


def refused(text: str, environ: Mapping[str, str] | None = None) -> ConfigError:
    """Parse a config that must be refused, and return the error.

    Args:
        text: The YAML document.
        environ: The variables ``${NAME}`` may use (none by default).

    Returns:
        The ConfigError raised, checked to be one line.
    """
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, environ={} if environ is None else environ)
    assert "\n" not in str(info.value)
    return info.value


def assert_check_refuses(tmp_path: Path, text: str, key: str) -> str:
    """Run the real ``--check`` on a config it must refuse.

    Args:
        tmp_path: Where the config file is written.
        text: The config.
        key: The key path the one-line error must name.

    Returns:
        Everything the command printed (stdout and stderr).
    """
    result = check(tmp_path, text)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line, result.stderr
    assert line.startswith(f"llmproxy: config error: {key}: "), line
    return result.stdout + result.stderr


# -- tls.ca_file -------------------------------------------------------------


def ca_config(path: Path, *pems: bytes) -> str:
    """Write a CA file and return a config naming it.

    Args:
        path: The CA file to write.
        *pems: Its contents, concatenated.

    Returns:
        A config whose ``tls.ca_file`` is the file.
    """
    path.write_bytes(b"".join(pems))
    return MINIMAL + f'tls: {{ca_file: "{path}"}}\n'


def expired_ca_pem() -> bytes:
    """A self-signed CA certificate whose validity ended yesterday.

    Returns:
        The certificate, PEM-encoded.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_bundle_with_comments_loads(tmp_path: Path) -> None:
    """Three certificates with text around them (as in distribution bundles),
    CRLF line ends in one, and an expired CA all load."""
    first, second, third = (make_ca(f"CA {i}").cert_pem for i in range(3))
    text = ca_config(
        tmp_path / "ca.pem",
        b"# Issuer: CA 0\n", first, b"\nsome words\n", second.replace(b"\n", b"\r\n"),
        third, expired_ca_pem(),
    )

    config = parse_config_text(text, environ={})

    assert config.tls.ca_file == str(tmp_path / "ca.pem")


def test_a_begin_marker_alone_is_refused(tmp_path: Path) -> None:
    """The issue's file: only ``-----BEGIN CERTIFICATE-----``."""
    text = ca_config(tmp_path / "ca.pem", b"-----BEGIN CERTIFICATE-----\n")

    err = refused(text)

    assert err.key == "tls.ca_file"
    assert err.message == (
        f"{str(tmp_path / 'ca.pem')!r}: certificate 1 of 1 (line 1) is truncated: "
        "no '-----END CERTIFICATE-----' line"
    )


def test_a_certificate_cut_before_the_next_is_truncated(tmp_path: Path) -> None:
    """A certificate whose END line is missing is truncated, even though the
    next certificate's END line follows."""
    first, second = (make_ca(f"CA {i}").cert_pem for i in range(2))
    cut = b"".join(first.splitlines(keepends=True)[:4])
    text = ca_config(tmp_path / "ca.pem", cut, second)

    err = refused(text)

    assert "certificate 1 of 2 (line 1) is truncated" in err.message


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda pem: pem.replace(b"M", b"!", 1), "is not valid base64"),
        (lambda pem: b"".join(pem.splitlines(keepends=True)[i] for i in (0, 1, 2, -1)),
         "is not a valid X.509 certificate ("),
        (lambda pem: b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", "is empty"),
        (lambda pem: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
         "is not a valid X.509 certificate ("),
    ],
    ids=["garbled", "cut-short", "empty", "not-x509"],
)
def test_a_damaged_certificate_is_named(tmp_path: Path, damage: object, problem: str) -> None:
    """The second of three certificates, damaged: the message says which one
    (its number and line) and what is wrong.

    Args:
        tmp_path: A fresh directory.
        damage: Turns a good PEM certificate into a bad one.
        problem: What the message must say about it.
    """
    first, second, third = (make_ca(f"CA {i}").cert_pem for i in range(3))
    text = ca_config(tmp_path / "ca.pem", first, damage(second), third)  # type: ignore[operator]

    err = refused(text)

    assert err.key == "tls.ca_file"
    line = first.count(b"\n") + 1
    assert err.message.startswith(
        f"{str(tmp_path / 'ca.pem')!r}: certificate 2 of 3 (line {line}) {problem}"
    ), err.message


@pytest.mark.parametrize("with_certificate", [False, True], ids=["alone", "after-a-cert"])
def test_a_private_key_is_refused(tmp_path: Path, with_certificate: bool) -> None:
    """A private key in a CA file is refused, alone or after a certificate.

    Args:
        tmp_path: A fresh directory.
        with_certificate: Whether a good certificate comes first.
    """
    ca = make_ca()
    pems = (ca.cert_pem, ca.key_pem) if with_certificate else (ca.key_pem,)
    text = ca_config(tmp_path / "ca.pem", *pems)

    err = refused(text)

    assert err.key == "tls.ca_file"
    number = "2 of 2" if with_certificate else "1 of 1"
    assert f"PEM block {number} " in err.message
    assert "is 'PRIVATE KEY', not a certificate" in err.message


@pytest.mark.parametrize("contents", [b"", b"just some text\n"], ids=["empty", "text"])
def test_a_file_without_pem_is_refused(tmp_path: Path, contents: bytes) -> None:
    """No PEM block at all: the file holds no certificate.

    Args:
        tmp_path: A fresh directory.
        contents: The whole file.
    """
    err = refused(ca_config(tmp_path / "ca.pem", contents))

    assert err.key == "tls.ca_file"
    assert err.message == f"{str(tmp_path / 'ca.pem')!r} holds no PEM certificate"


def test_an_endless_ca_file_is_refused() -> None:
    """A CA file is read up to 16 MiB: /dev/zero is refused, not read forever."""
    err = refused(MINIMAL + 'tls: {ca_file: "/dev/zero"}\n')

    assert err.key == "tls.ca_file"
    assert "larger than 16 MiB" in err.message


@pytest.mark.parametrize(
    "contents, problem",
    [
        (b"-----BEGIN CERTIFICATE-----\n", "certificate 1 of 1 (line 1) is truncated"),
        (None, "certificate 2 of 3 (line "),
        (make_ca().key_pem, "PEM block 1 of 1 (line 1) is 'PRIVATE KEY'"),
    ],
    ids=["begin-only", "garbled", "private-key"],
)
def test_check_refuses_a_bad_ca_file(
    tmp_path: Path, contents: bytes | None, problem: str
) -> None:
    """``twistd llmproxy --check`` exits 1 with one line for a bad CA file.

    Args:
        tmp_path: A fresh directory.
        contents: The CA file (None: three certificates, the second garbled).
        problem: What the line must say.
    """
    if contents is None:
        first, second, third = (make_ca(f"CA {i}").cert_pem for i in range(3))
        contents = first + second.replace(b"M", b"!", 1) + third
    text = ca_config(tmp_path / "ca.pem", contents)

    output = assert_check_refuses(tmp_path, text, "tls.ca_file")

    assert problem in output
    if problem.startswith("certificate 2"):
        assert ") is not valid base64" in output


# -- secrets are never shown -------------------------------------------------

#: Where a secret can be written: (YAML with ``{secret}`` in place of the
#: value, the key path an error about it names).
SECRET_PLACES = [
    (MINIMAL + "model_routes:\n  gpt-4: {urls: [http://a], api_key: {secret}}\n",
     "model_routes.gpt-4.api_key"),
    ('target_map:\n  "/v1/": {urls: [http://a], api_key: {secret}}\n',
     'target_map["/v1/"].api_key'),
    (MINIMAL + "auth: {keys: [{secret}]}\n", "auth.keys[0]"),
    (MINIMAL + "auth: {keys: [{key: {secret}, name: team-a}]}\n", "auth.keys[0].key"),
    (MINIMAL + "proxy_url: {secret}\n", "proxy_url"),
    (MINIMAL + "rate_limit: {rate: 1, store: {secret}}\n", "rate_limit.store"),
]
SECRET_IDS = ["route-api_key", "target_map-api_key", "client-key", "client-key-mapping",
              "proxy_url", "store"]

#: Secrets YAML reads as numbers, and every form in which a message could
#: show them.
NUMBER_SECRETS = [
    ("918273645546372819", ("918273645546372819",)),
    ("0x5EC12E7C0FFEE", ("5EC12E7C0FFEE", "5ec12e7c0ffee", str(0x5EC12E7C0FFEE))),
    ("1_234_567_890_123", ("1_234_567_890_123", "1234567890123")),
    ("190:20:30", ("190:20:30", str((190 * 60 + 20) * 60 + 30))),
]


def place(template: str, secret: str) -> str:
    """Put a secret into one of the :data:`SECRET_PLACES` templates.

    Args:
        template: A config with ``{secret}`` in it.
        secret: The YAML text of the value.

    Returns:
        The config.
    """
    return template.replace("{secret}", secret)


@pytest.mark.parametrize("template, key", SECRET_PLACES, ids=SECRET_IDS)
@pytest.mark.parametrize("secret, shown", NUMBER_SECRETS, ids=["int", "hex", "underscores",
                                                                "sexagesimal"])
def test_a_number_under_a_secret_key_is_not_shown(
    template: str, key: str, secret: str, shown: tuple[str, ...]
) -> None:
    """A secret YAML reads as a number is refused without its value.

    Args:
        template: Where the secret is written.
        key: The key path the error names.
        secret: The YAML text of the secret.
        shown: Every form of it that must not appear.
    """
    err = refused(place(template, secret))

    assert err.key == key
    assert "got an integer (value hidden: it is a secret)" in err.message
    for text in shown:
        assert text not in str(err)


@pytest.mark.parametrize("template, key", SECRET_PLACES, ids=SECRET_IDS)
def test_a_secret_is_not_shown_by_load_config(tmp_path: Path, template: str, key: str) -> None:
    """The same through :func:`load_config`, from a file on disk.

    Args:
        tmp_path: A fresh directory.
        template: Where the secret is written.
        key: The key path the error names.
    """
    path = tmp_path / "config.yml"
    path.write_text(place(template, "918273645546372819"))

    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})

    assert info.value.key == key
    assert "918273645546372819" not in str(info.value)


@pytest.mark.parametrize("template, key", SECRET_PLACES, ids=SECRET_IDS)
def test_check_does_not_print_a_secret(tmp_path: Path, template: str, key: str) -> None:
    """``--check`` refuses a number under each secret key without printing it.

    Args:
        tmp_path: A fresh directory.
        template: Where the secret is written.
        key: The key path the error names.
    """
    output = assert_check_refuses(tmp_path, place(template, "0x5EC12E7C0FFEE"), key)

    assert "value hidden: it is a secret" in output
    for text in ("5EC12E7C0FFEE", "5ec12e7c0ffee", str(0x5EC12E7C0FFEE)):
        assert text not in output


@pytest.mark.parametrize("template, key", SECRET_PLACES, ids=SECRET_IDS)
def test_a_bad_variable_name_in_a_secret_is_not_shown(template: str, key: str) -> None:
    """``${...}`` expansion: an invalid variable name in a secret is not quoted.

    Args:
        template: Where the secret is written.
        key: The key path the error names.
    """
    err = refused(place(template, '"sk-${live 5ecret}"'))

    assert err.key == key
    assert err.message == "not a valid variable name in ${...}: (value hidden: it is a secret)"


@pytest.mark.parametrize(
    "template, message",
    [
        (SECRET_PLACES[0][0], "expected a string, got an integer (value hidden: it is a secret)"),
        (SECRET_PLACES[2][0], "expected a key (a string) or a mapping with 'key', "
                              "got an integer (value hidden: it is a secret)"),
    ],
    ids=["api_key", "client-key"],
)
def test_a_number_for_a_secret_says_what_was_expected(template: str, message: str) -> None:
    """The whole message for a number given as an ``api_key`` or client key.

    Args:
        template: Where the secret is written.
        message: The message expected.
    """
    assert refused(place(template, "918273645546372819")).message == message


def test_a_bad_variable_name_elsewhere_is_shown() -> None:
    """Only secrets are hidden: a bad ``${...}`` in ``listen`` is quoted."""
    err = refused(MINIMAL + 'listen: "tcp:${no good}"\n')

    assert err.message == "not a valid variable name in ${...}: '${no good}'"


def test_values_under_other_keys_are_still_shown() -> None:
    """A wrong value under a key that is not a secret is quoted as before."""
    err = refused(MINIMAL + "model_routes:\n  gpt-4: {urls: [http://a], retries: many}\n")

    assert err.key == "model_routes.gpt-4.retries"
    assert err.message == "expected an integer >= 0, got a string 'many'"


def test_a_secret_from_the_environment_with_a_line_break_is_not_shown() -> None:
    """An ``api_key`` whose variable holds a line break is refused, unquoted."""
    err = refused(
        MINIMAL + "model_routes:\n  gpt-4: {urls: [http://a], api_key: '${KEY}'}\n",
        environ={"KEY": "sk-live-5ecret\r\nX-Injected: 1"},
    )

    assert err.key == "model_routes.gpt-4.api_key"
    assert "5ecret" not in str(err) and "Injected" not in str(err)


@pytest.mark.parametrize(
    "auth, key, problem",
    [
        ("auth:\n  keys:\n    - sk-live-5ecret: team-a\n", "auth.keys[0]", "an unknown key"),
        ("auth:\n  keys: [a]\n  sk-live-5ecret: team-a\n", "auth", "an unknown key"),
        ("auth:\n  keys:\n    - {key: a, sk-live-5ecret: 1, sk-live-5ecret: 2}\n",
         "auth.keys[0]", "given twice (lines 5 and 5)"),
        ("auth:\n  keys:\n    - {5918273645546372819: team-a}\n", "auth.keys[0]",
         "keys must be strings, got an integer (value hidden: it is a secret)"),
        ("auth:\n  keys:\n    - {sk-live-5ecret: '${UNSET}'}\n", "auth.keys[0]",
         "environment variable UNSET is not set"),
        ("auth:\n  keys: sk-live-5ecret\n", "auth.keys",
         "expected a list, got a string (value hidden: it is a secret)"),
        ("auth: sk-live-5ecret\n", "auth",
         "expected a mapping, got a string (value hidden: it is a secret)"),
    ],
    ids=["entry-as-mapping-key", "auth-key", "duplicate", "number-key", "unset-below",
         "keys-not-a-list", "auth-not-a-mapping"],
)
def test_a_key_written_where_a_name_goes_is_not_shown(auth: str, key: str, problem: str) -> None:
    """A client key written as a mapping key (``- sk-...: team``) or in place
    of a section is refused without naming it, even in the key path.

    Args:
        auth: The ``auth`` section.
        key: The key path the error names.
        problem: What the message says.
    """
    err = refused(MINIMAL + auth)

    assert err.key == key
    assert problem in err.message
    assert "5ecret" not in str(err) and "918273645546372819" not in str(err)


def test_a_misspelt_client_key_field_is_named() -> None:
    """A key that looks like a field name is named, with a suggestion."""
    err = refused(MINIMAL + "auth: {keys: [{key: a, nmae: team-a}]}\n")

    assert err.key == "auth.keys[0].nmae"
    assert "did you mean 'name'?" in err.message


def test_a_password_in_a_base_url_is_not_shown() -> None:
    """A base URL's ``user:password@`` is hidden in an error about its port."""
    err = refused('target_map:\n  "/v1/": "http://user:5ecret-pw@up.example:99999"\n')

    assert err.message == "port out of range (1-65535) in 'http://***@up.example:99999'"


#: Keys file lines with text after the key that must never be shown.
BAD_KEY_LINES = [
    ("sk-live-5ecret def-5ecret", "after the key, expected name=NAME"),
    ("sk-live-5ecret name=x extra-5ecret", "after the key, expected name=NAME"),
    ("sk-live-5ecret\tname=team budget=lots-5ecret", "budget: expected TOKENS/PER"),
    ("sk-live-5ecret name=bad/5ecret", "name: a key name is"),
]


def keys_file_config(tmp_path: Path, line: str) -> str:
    """Write a keys file whose third line is ``line``; return a config using it.

    Args:
        tmp_path: Where the keys file is written.
        line: The keys file's third line.

    Returns:
        A config naming the keys file.
    """
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\nsk-good-key name=good\n{line}\n")
    return MINIMAL + f'auth: {{keys_file: "{keys}"}}\n'


@pytest.mark.parametrize("line, problem", BAD_KEY_LINES)
def test_a_keys_file_line_is_never_quoted(tmp_path: Path, line: str, problem: str) -> None:
    """A bad keys file line is named by number, and nothing on it is shown.

    Args:
        tmp_path: A fresh directory.
        line: The bad line.
        problem: What the message says.
    """
    err = refused(keys_file_config(tmp_path, line))

    assert err.key == "auth.keys_file"
    assert f"{str(tmp_path / 'keys')!r}, line 3: {problem}" in err.message
    assert "5ecret" not in str(err) and "sk-live" not in str(err)


@pytest.mark.parametrize("line, problem", BAD_KEY_LINES[:2])
def test_check_does_not_print_a_keys_file_line(tmp_path: Path, line: str, problem: str) -> None:
    """``--check`` on a bad keys file line prints its number, not its text.

    Args:
        tmp_path: A fresh directory.
        line: The bad line.
        problem: What the message says.
    """
    output = assert_check_refuses(tmp_path, keys_file_config(tmp_path, line), "auth.keys_file")

    assert "line 3: " + problem in output
    assert "5ecret" not in output and "sk-live" not in output


# -- YAML bounds -------------------------------------------------------------


def laugh_bomb(levels: int) -> str:
    """A "billion laughs" config: each level lists the previous one ten times.

    Args:
        levels: How many levels (the last expands to 10**(levels - 1) laughs).

    Returns:
        The YAML text, with the bomb under ``no_proxy``.
    """
    lines = ["no_proxy:", '  - &l0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return MINIMAL + "\n".join(lines) + "\n"


class Overtime(Exception):
    """Raised by :func:`deadline` when the time is up."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`Overtime` after ``seconds``.

    A refusal that regressed to walking an exponential document would
    otherwise hang the test run instead of failing it.

    Args:
        seconds: Wall-clock time the block may take.

    Yields:
        Nothing; the block runs under a SIGALRM timer.
    """

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Overtime(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_laugh_bomb_is_refused_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10-level laugh bomb is refused without building the document.

    Args:
        monkeypatch: Replaces the loader's construct_document with a spy.
    """
    built: list[object] = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    construct = loader.construct_document
    monkeypatch.setattr(
        loader, "construct_document", lambda self, node: built.append(node) or construct(self, node)
    )
    parse_config_text(MINIMAL, environ={})
    assert len(built) == 1, "the spy sees documents being built"

    started = time.perf_counter()
    with deadline(5):
        err = refused(laugh_bomb(10))
    elapsed = time.perf_counter() - started

    assert err.key == "<config>"
    assert err.message == "aliases expand the YAML document by more than 10,000 nodes"
    assert len(built) == 1
    assert elapsed < 0.5, "the refusal costs what the text does, not what it expands to"


def test_check_refuses_a_laugh_bomb_naming_the_file(tmp_path: Path) -> None:
    """``--check`` refuses a laugh bomb with one line naming the file."""
    output = assert_check_refuses(tmp_path, laugh_bomb(10), str(tmp_path / "config.yml"))

    assert "aliases expand the YAML document by more than 10,000 nodes" in output


def routes_sharing_one(aliases: int, urls: int) -> str:
    """A config whose model routes all alias the first one.

    The first route is a mapping of ``urls`` URLs: ``urls + 3`` nodes, each
    alias adding as many.

    Args:
        aliases: How many further routes alias it.
        urls: How many URLs it has.

    Returns:
        The YAML text.
    """
    listed = ", ".join(f"http://u{i}.example" for i in range(urls))
    lines = [f"  m0: &route {{urls: [{listed}]}}"]
    lines += [f"  m{i}: *route" for i in range(1, aliases + 1)]
    return MINIMAL + "model_routes:\n" + "\n".join(lines) + "\n"


def test_aliases_may_add_ten_thousand_nodes_and_no_more() -> None:
    """100 aliases of a 100-node route add 10,000 nodes: accepted; one URL
    more each (10,100): refused."""
    config = parse_config_text(routes_sharing_one(100, 97), environ={})
    assert len(config.model_routes) == 101
    assert config.model_routes["m100"] == config.model_routes["m0"]

    err = refused(routes_sharing_one(100, 98))
    assert err.message == "aliases expand the YAML document by more than 10,000 nodes"


def test_at_most_a_thousand_aliases() -> None:
    """1,000 aliases load; 1,001 are refused."""
    config = parse_config_text(routes_sharing_one(1000, 1), environ={})
    assert len(config.model_routes) == 1001

    err = refused(routes_sharing_one(1001, 1))
    assert err.message == "the YAML document has more than 1,000 aliases"


def test_anchors_and_merges_still_load() -> None:
    """A route used twice, and a merge key overriding one field, load."""
    config: Config = parse_config_text(
        'target_map:\n'
        '  "/a/": &shared {urls: ["http://a.example"], via: direct}\n'
        '  "/b/": *shared\n'
        '  "/c/": {<<: *shared, via: auto}\n',
        environ={},
    )

    assert config.target_map["/b/"] == config.target_map["/a/"]
    assert config.target_map["/c/"].urls == ("http://a.example",)
    assert config.target_map["/c/"].via == "auto"


def test_a_recursive_alias_is_refused() -> None:
    """An alias inside the node it names is a ConfigError, not a RecursionError."""
    with deadline(5):
        err = refused(MINIMAL + "no_proxy: &loop [a, *loop]\n")

    assert err.message == (
        "an alias refers to the node holding it (anchored at line 3): "
        "a config cannot be recursive"
    )


@pytest.mark.parametrize("depth, accepted", [(60, True), (70, False)])
def test_nesting_is_bounded(depth: int, accepted: bool) -> None:
    """Nesting up to 64 levels is read; deeper is refused, never a RecursionError.

    Args:
        depth: How many lists are nested under ``no_proxy``.
        accepted: Whether the document passes the bound.
    """
    text = MINIMAL + "no_proxy: " + "[" * depth + "]" * depth + "\n"
    if accepted:
        # Past the bound, the value is refused for what it is.
        assert "expected a string" in refused(text).message
    else:
        assert refused(text).message == "the YAML document is nested more than 64 levels deep"


def test_a_document_over_one_mebibyte_is_refused() -> None:
    """1 MiB is read; one byte more is refused, as text or as bytes."""
    padding = "#" * (1024 * 1024 - len(MINIMAL) - 1) + "\n"
    assert parse_config_text(MINIMAL + padding, environ={}).target_map

    for text in (MINIMAL + padding + "#", (MINIMAL + padding + "#").encode()):
        with pytest.raises(ConfigError) as info:
            parse_config_text(text, environ={}, source="big.yml")
        assert str(info.value) == "big.yml: larger than 1 MiB: a config file is never that big"


def test_a_multibyte_document_is_measured_in_bytes() -> None:
    """Text is measured in UTF-8 bytes: 600,000 two-byte characters are too many."""
    err = refused(MINIMAL + "# " + "é" * 600_000 + "\n")

    assert "larger than 1 MiB" in err.message


def test_load_config_reads_at_most_one_mebibyte() -> None:
    """An endless file (/dev/zero) is refused after 1 MiB, not read forever."""
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero", environ={})

    assert str(info.value) == "/dev/zero: larger than 1 MiB: a config file is never that big"
