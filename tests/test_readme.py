"""The README's commands and examples, run as a reader would run them.

The quick start's daemon command, its curl line and the ``--check``
command run in the order given, in a fresh directory holding the repository's
``etc/`` (ports swapped for free ones); and the README's config, and
``etc/config.yml``, get the requests of the SDK examples with every
upstream swapped for a local fake, which must see the provider's own path
(no ``/v1/v1``).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from llmproxy.config import parse_config_text
from test_tap import ROOT, TWISTD, WAIT, free_port, spawn_twistd, terminate

README = (ROOT / "README.md").read_text(encoding="utf-8")

#: An http(s) URL in a config: scheme, host, optional port, optional path.
_URL = re.compile(r"https?://([A-Za-z0-9.-]+)(?::(\d+))?(/[^\"'\s,\]}]*)?")


def section(title: str) -> str:
    """The README's ``## title`` section."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def code_lines(text: str) -> list[str]:
    """The indented code lines of a Markdown section, unindented."""
    return [line[4:] for line in text.splitlines() if line.startswith("    ")]


def sdk_base_urls() -> dict[str, str]:
    """The ``base_url`` each SDK example passes, by SDK class."""
    found = re.findall(r'(\w+)\(base_url="([^"]+)"', section("Using it from the SDKs"))
    return dict(found)


@pytest_twisted.ensureDeferred
async def test_the_quick_start_commands_run_in_the_order_given(
    reactor: Any, tmp_path: Path
) -> None:
    """The daemon command serves the demo without leaving a pid file in
    the clone, the curl line streams an answer from it, and ``--check``
    runs beside it; the demo's ports are swapped for free ones."""
    port, demo_port, admin_port = free_port(), free_port(), free_port()
    ports = {"8000": str(port), "9001": str(demo_port), "9100": str(admin_port)}
    swap = re.compile("|".join(ports))
    shutil.copytree(ROOT / "etc", tmp_path / "etc")
    demo = tmp_path / "etc" / "demo.yml"
    demo.write_text(swap.sub(lambda m: ports[m.group(0)], demo.read_text()))

    install_and_run, watch = code_lines(section("Quick start"))[:2]
    daemon = shlex.split(install_and_run.split(" && ")[-1])
    assert daemon[0] == ".venv/bin/twistd"
    process = spawn_twistd(reactor, demo, tmp_path, argv=daemon[1:])
    try:
        await process.wait_for(b"starting on %d" % port).addTimeout(WAIT, reactor)
        curl = shlex.split(swap.sub(lambda m: ports[m.group(0)], watch))
        assert curl[0] == "curl"
        out, err, code = await getProcessOutputAndValue(
            shutil.which("curl") or "curl", curl[1:], env={}, path=str(tmp_path)
        ).addTimeout(WAIT, reactor)
        assert code == 0, err
        assert out.rstrip().endswith(b"data: [DONE]"), out
        assert b'"content"' in out

        check = re.search(r"`(twistd [^`]*--check)`", section("A config"))
        assert check, "the README names its --check command"
        argv = shlex.split(check.group(1).replace("FILE", "etc/demo.yml"))
        out, err, code = await getProcessOutputAndValue(
            TWISTD[0], [*TWISTD[1:], *argv[1:]],
            env={"PYTHONPATH": str(ROOT)}, path=str(tmp_path),
        ).addTimeout(WAIT, reactor)
        assert code == 0, (out + err).decode()
        assert b"target_map" in out
        # A twistd.pid left here would make the next twistd started from
        # the clone fail with "Another twistd server is running".
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        code = await terminate(process, reactor)
    assert code in (0, "signal 15"), process.output.decode()


async def served_by_fakes(upstreams: Any, text: str) -> tuple[str, dict[str, Any]]:
    """``text`` with each upstream URL's scheme, host and port swapped for
    a fake upstream's (one fake per host, the path kept); and the fakes by
    host."""
    fakes: dict[str, Any] = {}
    for host, _, _ in _URL.findall(text):
        if host not in fakes:
            fakes[host] = await upstreams.start()

    def local(match: re.Match[str]) -> str:
        return fakes[match.group(1)][1] + (match.group(3) or "")

    return _URL.sub(local, text), {host: fake[0] for host, fake in fakes.items()}


def _sdk_requests(
    base_urls: dict[str, str], calls: list[tuple[str, str, str]], answered: bool
) -> None:
    """Make each (SDK, kind, model) call through the SDKs (in a thread).

    With ``answered`` false, an error status is fine (the fake knows no
    provider's path but OpenAI's and Anthropic's).
    """
    import anthropic
    import openai

    for call in calls:
        try:
            _sdk_request(base_urls, *call)
        except (openai.APIStatusError, anthropic.APIStatusError):
            if answered:
                raise


def _sdk_request(base_urls: dict[str, str], sdk: str, kind: str, model: str) -> None:
    """One call through an SDK."""
    import anthropic
    import openai

    if sdk == "OpenAI":
        with openai.OpenAI(
            base_url=base_urls[sdk], api_key="sk-test", max_retries=0, timeout=10,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        ) as client:
            if kind == "chat":
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}]
                )
            else:
                client.embeddings.create(model=model, input="Hi")
    else:
        with anthropic.Anthropic(
            base_url=base_urls[sdk], api_key="sk-test", max_retries=0, timeout=10,
            http_client=anthropic.DefaultHttpxClient(trust_env=False),
        ) as client:
            client.messages.create(
                model=model, max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
            )


async def paths_seen(
    reactor: Any, upstreams: Any, proxies: Any, config: str,
    base_urls: dict[str, str], calls: list[tuple[str, str, str]], answered: bool = True,
) -> dict[str, list[bytes]]:
    """Serve ``config`` with its upstreams swapped for fakes, make the SDK
    calls with ``base_urls`` pointed at it; the paths each host's fake saw."""
    local, fakes = await served_by_fakes(upstreams, config)
    environ = {name: f"test-{name}" for name in re.findall(r"\$\{(\w+)\}", local)}
    proxy = await proxies.start(parse_config_text(local, environ=environ))
    here = proxy.removeprefix("http://")
    urls = {sdk: url.replace("127.0.0.1:8000", here) for sdk, url in base_urls.items()}
    await deferToThread(_sdk_requests, urls, calls, answered).addTimeout(60, reactor)
    return {host: [r.uri for r in fake.requests] for host, fake in fakes.items()}


@pytest_twisted.ensureDeferred
async def test_the_readme_config_and_sdk_examples_line_up(
    reactor: Any, upstreams: Any, proxies: Any
) -> None:
    """The README's SDK ``base_url``s against the README's config reach each
    provider at its own path (the outbound proxy left out: the fakes are
    local)."""
    lines = code_lines(section("A config"))
    config = "\n".join(line for line in lines if not line.startswith("proxy_url:"))
    seen = await paths_seen(
        reactor, upstreams, proxies, config, sdk_base_urls(),
        [("OpenAI", "chat", "gpt-4o"), ("OpenAI", "chat", "deepseek-chat"),
         ("OpenAI", "chat", "llama-3-70b"), ("OpenAI", "chat", "llama-3-70b"),
         ("Anthropic", "messages", "claude-sonnet-4")],
    )
    assert seen == {
        "api.openai.com": [b"/v1/chat/completions", b"/v1/messages"],
        "api.deepseek.com": [b"/v1/chat/completions"],
        "vllm-1.internal": [b"/v1/chat/completions"],
        "vllm-2.internal": [b"/v1/chat/completions"],
    }


@pytest_twisted.ensureDeferred
async def test_the_example_config_lines_up_with_each_providers_clients(
    reactor: Any, upstreams: Any, proxies: Any
) -> None:
    """``etc/config.yml``: OpenAI SDK calls (base URL ``.../v1``) reach
    OpenAI and DeepSeek at ``/v1/...``; Ark and GLM clients (base URL the
    root) reach ``/api/v3/...`` and ``/api/paas/v4/...``."""
    config = (ROOT / "etc" / "config.yml").read_text()
    config = re.sub(r"(?m)^log:\n(  .*\n)+", "", config)  # no log file here
    root = sdk_base_urls()["Anthropic"]
    seen = await paths_seen(
        reactor, upstreams, proxies, config,
        {"OpenAI": sdk_base_urls()["OpenAI"], "Anthropic": root},
        [("OpenAI", "chat", "gpt-4o"), ("OpenAI", "chat", "deepseek-chat"),
         ("OpenAI", "embeddings", "text-embedding-3-small")],
    )
    glm = await paths_seen(
        reactor, upstreams, proxies, config, {"OpenAI": root},
        [("OpenAI", "chat", "doubao-pro"), ("OpenAI", "embeddings", "embedding-2")],
        answered=False,
    )
    assert seen["api.openai.com"] == [b"/v1/chat/completions", b"/v1/embeddings"]
    assert seen["api.deepseek.com"] == [b"/v1/chat/completions"]
    assert glm["ark.cn-beijing.volces.com"] == [b"/api/v3/chat/completions"]
    assert glm["open.bigmodel.cn"] == [b"/api/paas/v4/embeddings"]
