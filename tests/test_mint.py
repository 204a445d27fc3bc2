"""``llmproxy-mint-key``: a new key, printed once, and config lines that hold
only its hash and authenticate it."""

from __future__ import annotations

import configparser
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmproxy.config import BudgetConfig, KeyRateConfig, parse_config_text
from llmproxy.limits import KeyStore
from llmproxy.mint import KEY_PREFIX, main, mint_key

ROOT = Path(__file__).resolve().parent.parent


def run_mint(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m llmproxy.mint`` with ``args``, as a user would.

    Args:
        *args: The command line's options.

    Returns:
        The finished process (bounded to 60 s).
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "llmproxy.mint", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


def printed(stdout: str) -> tuple[str, str, str]:
    """The key, the keys file line and the YAML entry ``llmproxy-mint-key`` printed.

    Args:
        stdout: Its output.

    Returns:
        ``(key, keys file line, auth.keys entry)``.
    """
    lines = stdout.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    return key, lines[lines.index("keys file line:") + 1], lines[lines.index("auth.keys entry:") + 1]


def test_a_minted_key_authenticates_through_the_printed_lines(tmp_path: Path) -> None:
    """The keys file line and the YAML entry accept the key, with its policy."""
    done = run_mint("--name", "team-e", "--budget", "$25/month", "--models", "gpt-4o*,emb-*",
                    "--rate", "2/10", "--reserve", "500")
    assert done.returncode == 0, done.stderr
    key, line, entry = printed(done.stdout)
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43
    assert done.stdout.count(key) == 1, "the key is printed once"
    assert line.startswith("sha256:") and key not in line and key not in entry
    keys_file = tmp_path / "keys"
    keys_file.write_text(line + "\n")
    config = parse_config_text(
        f'target_map: {{"/": "http://a"}}\nauth:\n  keys_file: "{keys_file}"\n', environ={}
    )
    info = KeyStore.from_config(config.auth).lookup(key)
    assert info is not None and info.name == "team-e"
    assert info.budget == BudgetConfig(per="month", usd=25.0, reserve=500)
    assert info.models == ("gpt-4o*", "emb-*")
    assert info.rate_limit == KeyRateConfig(rate=2.0, burst=10)
    assert done.stdout.splitlines()[1] == f"its id in logs: {info.id}"
    # The YAML entry, pasted under auth.keys, accepts the same key with the same policy.
    yaml_config = parse_config_text(
        f'target_map: {{"/": "http://a"}}\nauth:\n  keys:\n  {entry}\n', environ={}
    )
    assert KeyStore.from_config(yaml_config.auth).lookup(key) == info
    assert KeyStore.from_config(yaml_config.auth).lookup(key + "x") is None


def test_without_options_the_entry_is_the_hash_alone() -> None:
    """No policy: a bare ``sha256:`` line and ``{key_sha256: ...}``."""
    out = io.StringIO()
    assert main([], out=out) == 0
    key, line, entry = printed(out.getvalue())
    assert line.split() == [line] and line.startswith("sha256:")
    assert yaml.safe_load(entry) == [{"key_sha256": line.removeprefix("sha256:")}]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--budget", "$25/month"], "a key with a budget needs a name"),
        (["--name", "t", "--budget", "25/week"], "--budget.per: expected one of"),
        (["--name", "t", "--budget", "lots"], "--budget: expected TOKENS/PER"),
        (["--rate", "fast"], "--rate: expected RATE or RATE/BURST"),
        (["--models", "gpt 4"], "--models: expected a value without spaces"),
        (["--name", "bad/name"], "--name: a key name is"),
        (["--reserve", "10"], "reserve=N goes with a budget="),
    ],
)
def test_options_are_checked_as_the_config_checks_them(args: list[str], problem: str) -> None:
    """A bad option is refused (exit 2) and nothing is minted.

    Args:
        args: The options.
        problem: What the message says.
    """
    out, err = io.StringIO(), io.StringIO()
    assert main(args, out=out, err=err) == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith("llmproxy-mint-key: ") and problem in err.getvalue()


def test_keys_are_random_and_recognisable() -> None:
    """Every key is new, with the prefix and URL-safe characters."""
    minted = {mint_key() for _ in range(100)}
    assert len(minted) == 100
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert all(k.startswith(KEY_PREFIX) and set(k) <= allowed for k in minted)


def test_the_console_script_is_declared() -> None:
    """setup.cfg installs ``llmproxy-mint-key`` pointing at llmproxy.mint:main."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"].split("\n")
    assert "llmproxy-mint-key = llmproxy.mint:main" in [s.strip() for s in scripts]
