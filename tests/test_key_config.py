"""Client keys as policies in the config: hashes, models, rate limits,
budgets in tokens or dollars, prices, stream_usage and ``--check``'s
warnings.

Every mistake is one ConfigError naming the key path (or the keys file and
line), and none quotes a key, a key's hash or a keys file line's text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from llmproxy.config import (
    DEFAULT_RESERVE,
    BudgetConfig,
    ClientKey,
    ConfigError,
    KeyRateConfig,
    PriceConfig,
    config_warnings,
    dump_config,
    find_price,
    parse_config_text,
    parse_key_line,
)

MINIMAL = 'target_map: {"/": "http://a"}\n'
SECRET = "sk-live-5ecret-key"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()


def parsed(text: str) -> object:
    """Parse a config given after the minimal one.

    Args:
        text: YAML added to the minimal config.

    Returns:
        The config.
    """
    return parse_config_text(MINIMAL + text, environ={})


def refused(text: str) -> ConfigError:
    """Parse a config that must be refused; return the one-line error.

    Args:
        text: YAML added to the minimal config.

    Returns:
        The error.
    """
    with pytest.raises(ConfigError) as info:
        parsed(text)
    assert "\n" not in str(info.value)
    return info.value


def keys(*entries: str) -> str:
    """An ``auth`` section listing ``entries`` (YAML flow items).

    Args:
        *entries: The entries.

    Returns:
        The section's YAML.
    """
    return "auth:\n  keys:\n" + "".join(f"    - {entry}\n" for entry in entries)


def test_a_key_entry_carries_its_whole_policy() -> None:
    """key_sha256, models, rate_limit and a budget in dollars are read."""
    config = parsed(keys(
        f"{{key_sha256: {DIGEST}, name: team-a, models: [gpt-4o*, text-embedding-*], "
        "rate_limit: {rate: 0.5, burst: 3}, budget: {usd: 25, per: month, reserve: 1000}}",
        "{key: k2, name: team-b, rate_limit: {rate: 7.9}, models: 'a, b*'}",
    ))
    first, second = config.auth.keys
    assert first == ClientKey(
        key=f"sha256:{DIGEST}", name="team-a",
        budget=BudgetConfig(per="month", usd=25.0, reserve=1000),
        models=("gpt-4o*", "text-embedding-*"), rate_limit=KeyRateConfig(rate=0.5, burst=3),
    )
    assert first.origin == "auth.keys[0]" and first.budget.unit == "usd"
    assert second.rate_limit == KeyRateConfig(rate=7.9, burst=7)
    assert second.models == ("a", "b*")
    assert second.budget is None


@pytest.mark.parametrize(
    "budget, expected",
    [
        ('"2000/day"', BudgetConfig(per="day", tokens=2000)),
        ('"$25/month"', BudgetConfig(per="month", usd=25.0)),
        ('"$0.5/hour"', BudgetConfig(per="hour", usd=0.5)),
        ("{tokens: 5, per: minute}", BudgetConfig(per="minute", tokens=5)),
        ("{usd: 2.5, per: day, reserve: 10}", BudgetConfig(per="day", usd=2.5, reserve=10)),
    ],
)
def test_budgets_in_tokens_or_dollars(budget: str, expected: BudgetConfig) -> None:
    """Both written forms give the same budgets; reserve defaults to 4096.

    Args:
        budget: The budget as written.
        expected: What it means.
    """
    config = parsed(keys(f"{{key: k, name: t, budget: {budget}}}"))
    assert config.auth.keys[0].budget == expected
    assert BudgetConfig(per="day", tokens=1).reserve == DEFAULT_RESERVE


@pytest.mark.parametrize(
    "entry, key, problem",
    [
        ("{key: k, name: t, budget: {per: day}}", "auth.keys[0].budget", "tokens or usd"),
        ("{key: k, name: t, budget: {tokens: 1, usd: 1, per: day}}",
         "auth.keys[0].budget.usd", "not both"),
        ("{key: k, name: t, budget: {usd: 0, per: day}}", "auth.keys[0].budget.usd",
         "positive number"),
        ("{key: k, name: t, budget: {usd: 10000000000, per: day}}", "auth.keys[0].budget.usd",
         "at most"),
        ("{key: k, name: t, budget: {usd: 1, per: week}}", "auth.keys[0].budget.per",
         "expected one of"),
        ("{key: k, name: t, budget: {usd: 1, per: day, reserve: 0}}",
         "auth.keys[0].budget.reserve", "at least 1"),
        ('{key: k, name: t, budget: "$x/day"}', "auth.keys[0].budget", "$USD/PER"),
        ("{key: k, models: []}", "auth.keys[0].models", "at least one"),
        ('{key: k, models: ["gpt 4"]}', "auth.keys[0].models[0]", "without spaces"),
        ("{key: k, models: {a: 1}}", "auth.keys[0].models", "expected a list"),
        ("{key: k, rate_limit: {burst: 2}}", "auth.keys[0].rate_limit.rate", "required"),
        ("{key: k, rate_limit: {rate: 0}}", "auth.keys[0].rate_limit.rate", "positive"),
        ("{key: k, rate_limit: {rate: 1, brust: 2}}", "auth.keys[0].rate_limit.brust",
         "did you mean 'burst'"),
        ("{name: t}", "auth.keys[0].key", "key_sha256"),
        (f"{{key: {SECRET}, key_sha256: {DIGEST}}}", "auth.keys[0].key_sha256", "not both"),
        ("{key_sha256: abc}", "auth.keys[0].key_sha256", "64 hex digits"),
    ],
)
def test_policy_mistakes_name_their_key_path(entry: str, key: str, problem: str) -> None:
    """Each mistake in a key's policy is refused naming the field.

    Args:
        entry: The ``auth.keys`` entry.
        key: The key path the error names.
        problem: What the message says.
    """
    error = refused(keys(entry))
    assert error.key == key
    assert problem in error.message
    assert SECRET not in str(error) and DIGEST not in str(error)


@pytest.mark.parametrize("value", [DIGEST[:-1] + "z", 12345, f"sha256:{DIGEST}x"])
def test_a_bad_key_sha256_is_never_shown(value: object) -> None:
    """key_sha256 is a secret path: its value is never quoted.

    Args:
        value: A malformed key_sha256.
    """
    error = refused(keys(f"{{key_sha256: {value}, name: t}}"))
    assert error.key == "auth.keys[0].key_sha256"
    assert DIGEST[:20] not in str(error) and "12345" not in str(error)


def test_key_sha256_may_carry_its_prefix_and_any_case() -> None:
    """``sha256:<HEX>`` is the same as ``<hex>``."""
    config = parsed(keys(f"{{key_sha256: 'sha256:{DIGEST.upper()}'}}", "other"))
    assert config.auth.keys[0].key.lower() == f"sha256:{DIGEST}"


def keys_file(tmp_path: Path, line: str) -> ConfigError | object:
    """Load a config whose keys file's second line is ``line``.

    Args:
        tmp_path: Where the keys file goes.
        line: The line.

    Returns:
        The config, or the ConfigError it raised.
    """
    path = tmp_path / "keys"
    path.write_text(f"# keys\n{line}\n")
    try:
        return parsed(f'auth: {{keys_file: "{path}"}}\n')
    except ConfigError as e:
        return e


def test_keys_file_lines_carry_the_whole_policy(tmp_path: Path) -> None:
    """name, budget in dollars, reserve, models and rate on one line."""
    config = keys_file(
        tmp_path,
        f"sha256:{DIGEST} name=team-e budget=$25/month reserve=300 models=gpt-4o*,emb-? "
        "rate=2/10",
    )
    entry = config.auth.file_keys[0]
    assert entry.budget == BudgetConfig(per="month", usd=25.0, reserve=300)
    assert entry.models == ("gpt-4o*", "emb-?")
    assert entry.rate_limit == KeyRateConfig(rate=2.0, burst=10)
    assert entry.origin == f"keys file {str(tmp_path / 'keys')!r}, line 2"
    other = keys_file(tmp_path, "k name=x budget=100/day rate=0.5").auth.file_keys[0]
    assert other.budget == BudgetConfig(per="day", tokens=100)
    assert other.rate_limit == KeyRateConfig(rate=0.5, burst=1)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ("name=t budget=$0/day", "budget.usd: must be more than 0"),
        ("name=t budget=$lots-5ecret/day", "budget: expected TOKENS/PER"),
        ("name=t budget=5/day reserve=none-5ecret", "reserve: expected a whole number"),
        ("name=t reserve=5", "reserve=N goes with a budget="),
        ("models=a,,b-5ecret", "models: expected model names"),
        ("rate=fast-5ecret", "rate: expected RATE or RATE/BURST"),
        ("rate=1/0", "rate: the burst must be at least 1"),
        ("rate=1 rate=2", "after the key, expected name=NAME"),
        ("limit=5ecret", "after the key, expected name=NAME"),
    ],
)
def test_keys_file_policy_mistakes_never_show_the_line(
    tmp_path: Path, fields: str, problem: str
) -> None:
    """A bad field names the file and line, and nothing written on it.

    Args:
        tmp_path: Where the keys file goes.
        fields: What follows the key.
        problem: What the message says.
    """
    error = keys_file(tmp_path, f"{SECRET} {fields}")
    assert isinstance(error, ConfigError) and error.key == "auth.keys_file"
    assert f"line 2: {problem}" in error.message
    assert "5ecret" not in str(error)


def test_parse_key_line_is_what_the_keys_file_reads() -> None:
    """One line, parsed on its own; problems are worded without its text."""
    entry = parse_key_line(f"sha256:{DIGEST} name=a models=m*", "here")
    assert entry.name == "a" and entry.models == ("m*",) and entry.origin == "here"
    with pytest.raises(ValueError) as info:
        parse_key_line(f"{SECRET} name=a budget=9/day reserve=-5ecret")
    assert "5ecret" not in str(info.value)


def test_prices_and_stream_usage() -> None:
    """prices keep their order; stream_usage at the top and per route."""
    config = parsed(
        'model_routes:\n  m: {urls: ["http://m"], stream_usage: always}\n  n: "http://n"\n'
        "stream_usage: never\n"
        'prices:\n  "gpt-4o": {input: 2.5, output: 10, cached_input: 1.25}\n'
        '  "gpt-*": {input: 1, output: 0}\n'
    )
    assert list(config.prices) == ["gpt-4o", "gpt-*"]
    assert config.prices["gpt-4o"] == PriceConfig(input=2.5, output=10.0, cached_input=1.25)
    assert config.prices["gpt-*"].cached_input is None
    assert config.stream_usage == "never"
    assert config.model_routes["m"].stream_usage == "always"
    assert config.model_routes["n"].stream_usage is None
    assert parsed("").stream_usage == "budget" and dict(parsed("").prices) == {}


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("stream_usage: sometimes\n", "stream_usage", "expected one of budget, always, never"),
        ('target_map: {"/x": {urls: ["http://a"], stream_usage: 1}}\n',
         'target_map["/x"].stream_usage', "expected a string"),
        ("prices: {m: {input: 1}}\n", "prices.m.output", "required"),
        ("prices: {m: {input: -1, output: 1}}\n", "prices.m.input", "0 or more"),
        ("prices: {m: {input: .inf, output: 1}}\n", "prices.m.input", "0 or more"),
        ("prices: {m: {input: 1, output: 1, cached: 1}}\n", "prices.m.cached",
         "did you mean 'cached_input'"),
        ('prices: {"a b": {input: 1, output: 1}}\n', 'prices["a b"]', "without spaces"),
        ("prices: [m]\n", "prices", "expected a mapping"),
    ],
)
def test_price_and_stream_usage_mistakes(text: str, key: str, problem: str) -> None:
    """Mistakes in prices and stream_usage name their key path.

    Args:
        text: The YAML added.
        key: The start of the key path the error names.
        problem: What the message says.
    """
    if text.startswith("target_map"):
        with pytest.raises(ConfigError) as info:
            parse_config_text(text, environ={})
        error = info.value
    else:
        error = refused(text)
    assert error.key.startswith(key)
    assert problem in error.message


def test_an_exact_price_wins_over_globs_and_the_first_glob_over_later_ones() -> None:
    """find_price: the exact name, else the first matching glob (case-sensitive)."""
    table = {
        "gpt-4o*": PriceConfig(1, 1),
        "gpt-*": PriceConfig(2, 2),
        "gpt-4o-mini": PriceConfig(3, 3),
    }
    assert find_price(table, "gpt-4o-mini") == ("gpt-4o-mini", table["gpt-4o-mini"])
    assert find_price(table, "gpt-4o-2024") == ("gpt-4o*", table["gpt-4o*"])
    assert find_price(table, "gpt-3.5") == ("gpt-*", table["gpt-*"])
    assert find_price(table, "GPT-4o") is None
    assert find_price(table, None) is None


def test_check_warns_about_globs_matching_no_model_and_unpriced_models(tmp_path: Path) -> None:
    """Warnings name the key path or keys file line; valid configs say nothing."""
    path = tmp_path / "keys"
    path.write_text(f"{SECRET} name=f models=claude-*\n")
    config = parsed(
        'model_routes: {"gpt-4o": "http://m", "llama-3": "http://l"}\n'
        'model_aliases: {"gpt4": "gpt-4o"}\n'
        'prices: {"gpt-*": {input: 1, output: 1}}\n'
        "auth:\n  keys:\n"
        "    - {key: k1, name: a, models: [gpt4, gpt-5*, llama-*]}\n"
        "    - {key: k2, name: b, budget: $5/day}\n"
        "    - {key: k3, name: c, models: [gpt-*], budget: $5/day}\n"
        f'  keys_file: "{path}"\n'
    )
    warnings = config_warnings(config)
    assert warnings == [
        "auth.keys[0].models: 'gpt-5*' matches no model of model_routes or model_aliases",
        "auth.keys[1].budget: a budget in usd, but no price for 'llama-3' in 'prices': "
        "those requests are refused (no_price)",
        f"auth.keys_file: keys file {str(path)!r}, line 1: models: 'claude-*' matches no "
        "model of model_routes or model_aliases",
    ]
    assert all(SECRET not in w for w in warnings)
    no_prices = parsed(keys("{key: k, name: b, budget: $5/day}"))
    assert config_warnings(no_prices) == [
        "auth.keys[0].budget: a budget in usd, but 'prices' lists no model: every request "
        "naming a model is refused (no_price)"
    ]
    assert config_warnings(parsed(keys("{key: k, models: [anything*]}"))) == []


def test_the_dump_shows_policies_never_keys_or_hashes() -> None:
    """--check's dump: the policy's fields, the key and its hash as ***."""
    config = parsed(
        keys(f"{{key_sha256: {DIGEST}, name: a, models: [m*], rate_limit: {{rate: 2}}, "
             "budget: $5/day}", SECRET)
        + 'prices: {m: {input: 1, output: 2}}\n'
    )
    text = dump_config(config)
    assert SECRET not in text and DIGEST not in text
    dumped = yaml.safe_load(text)
    assert dumped["auth"]["keys"] == [
        {"key": "***", "name": "a", "budget": {"usd": 5.0, "per": "day", "reserve": 4096},
         "models": ["m*"], "rate_limit": {"rate": 2.0, "burst": 2}},
        "***",
    ]
    assert dumped["prices"] == {"m": {"input": 1.0, "output": 2.0, "cached_input": None}}
    assert dumped["stream_usage"] == "budget"
