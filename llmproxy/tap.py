"""``twistd llmproxy``: options and the service tree.

``makeService`` loads the config and builds a :class:`~llmproxy.daemon.Daemon`
(a MultiService): the JSON log file, the demo upstream when
``demo_upstream`` is set, the public listener, workers 2..N when ``workers``
is above 1, the admin listener (metrics, health) and a service that closes
the upstream connection pools on stop. The daemon's lifecycle (signals,
open-file limit, GC settings) lives in :mod:`llmproxy.daemon`, the extra
worker processes in :mod:`llmproxy.workers`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import attrs
import yaml
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from llmproxy import logs
from llmproxy.config import ClientKey, Config, ConfigError, load_config, redact_url
from llmproxy.daemon import AdoptedListener, Daemon, Listener, one_line_exit
from llmproxy.logs import file_log_service
from llmproxy.web import build_admin_resource, build_resource, build_site
from llmproxy.workers import WORKER_FD, Workers, share_metrics, worker_log_file

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "etc/config.yml"

_log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd llmproxy``."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The YAML config file."],
    ]
    optFlags = [
        [
            "check",
            None,
            "Validate the config, print it with defaults filled in and secrets "
            "redacted, and exit (0: valid, 1: not) without listening.",
        ],
    ]

    def postOptions(self) -> None:
        """Load and validate the config file.

        A bad config exits with one line naming the key; twistd's own
        UsageError handling would print the whole usage text around it.
        """
        try:
            self.loaded: Config = load_config(self["config"])
            if self["check"]:
                build_resource(self.loaded, _NoReactor())  # keys files, endpoints...
        except ConfigError as e:
            raise one_line_exit(f"config error: {e}") from None
        if self["check"]:
            sys.stdout.write(f"# {self['config']}: valid\n")
            sys.stdout.write(dump_config(self.loaded))
            sys.stdout.flush()
            raise SystemExit(0)
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("nodaemon") and not parent.get("logger"):
            # In the foreground (systemd, journald), log readable lines to
            # stdout at log.level instead of twistd's unfiltered default.
            if parent.get("logfile") in (None, "-"):
                logs.twistd_console_level = self.loaded.log.level
                logs.twistd_console_access = self.loaded.log.console_access
                parent["logger"] = "llmproxy.logs.twistd_console_observer"


class _NoReactor:
    """Enough of a reactor to build the resource for --check (never runs)."""

    nameResolver = None

    def seconds(self) -> float:
        """Return 0: --check never runs, so the time never matters."""
        return 0.0

    def callLater(self, *args: Any, **kwargs: Any) -> None:
        """Refuse: building the resource for --check must schedule nothing."""
        raise RuntimeError("--check never schedules anything")


def dump_config(config: Config) -> str:
    """The effective config as YAML, secrets redacted.

    Args:
        config: A validated configuration.

    Returns:
        YAML text: every key with its value or default; the proxy password,
        route api_keys and client keys shown as ``***``.
    """
    return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False)


def _plain(value: Any, key: str = "") -> Any:
    """Turn config objects into YAML-able data, hiding secrets."""
    if isinstance(value, ClientKey):
        if value.name is None and value.budget is None:
            return "***"
        return {"key": "***", "name": value.name, "budget": _plain(value.budget)}
    if attrs.has(type(value)):
        return {
            field.name: _plain(getattr(value, field.name), field.name)
            for field in attrs.fields(type(value))
            if field.name != "source"
        }
    if isinstance(value, Mapping):
        return {k: _plain(v, k) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v, "" if key == "keys" else key) for v in value]
    if key == "api_key" and value is not None:
        return "***"
    if key in ("proxy_url", "store") and value is not None:
        return redact_url(value).strip("'")
    return value


def _warn_unshared_limits(config: Config, root: Any) -> None:
    """With several workers and no shared store, limits are per process."""
    limits = root.proxy.guard.limits
    if limits is not None and not limits.shared:
        _log.warn(
            "workers: {workers} without rate_limit.store: each worker keeps its own "
            "rate limits and budgets, so a client gets up to {workers} times its "
            "limit; set rate_limit.store to share them (see README, Several instances)",
            workers=config.workers,
        )


class _CloseService(Service):
    """Runs a close callable when the daemon stops."""

    def __init__(self, close: Any) -> None:
        """Remember what to call.

        Args:
            close: Called on stop; may return a Deferred.
        """
        self._close = close

    def stopService(self) -> Any:
        """Run the close callable.

        Returns:
            Whatever it returns (a Deferred to wait for, or None).
        """
        super().stopService()
        return self._close()


def makeService(options: Options) -> MultiService:
    """Build the daemon's services from parsed options.

    Args:
        options: Parsed :class:`Options` (the config is loaded already).

    Returns:
        The MultiService that twistd runs (it handles SIGTERM and SIGHUP).
    """
    from twisted.internet import reactor

    config = getattr(options, "loaded", None) or load_config(options["config"])
    daemon = build_service(config, reactor, path=options["config"])
    daemon.handle_signals = True
    return daemon


def build_service(
    config: Config, reactor: Any, path: str | None = None, worker: int = 1
) -> Daemon:
    """Build the daemon's services for a config.

    Args:
        config: The validated configuration.
        reactor: The reactor to run on.
        path: The config file (for reloads and further workers).
        worker: This process's worker number; workers after the first adopt
            the first one's listening socket, write their own log file and
            run no admin listener or demo upstream.

    Returns:
        A MultiService with the shared metrics directory (workers above 1),
        the log file (if configured), the demo upstream (if configured), the
        public listener, the admin listener and the pool closer.
    """
    workers = getattr(config, "workers", 1)
    # Before the instruments exist: they choose where their values live.
    shared = share_metrics(config, reactor) if worker == 1 and path is not None else None
    try:
        root = build_resource(config, reactor)
    except ConfigError as e:
        raise one_line_exit(f"config error: {e}") from None
    if workers > 1:
        root.proxy.worker = worker
    top = Daemon(config, reactor, root, path)
    if shared is not None:
        # The first child: stopped last, once the workers have ended.
        shared.setName("metrics-dir")
        shared.setServiceParent(top)
    if config.log.file:
        logs = file_log_service(
            worker_log_file(config.log.file, worker),
            max_bytes=config.log.max_bytes,
            backups=config.log.backups,
            compress=config.log.compress,
            level=config.log.level,
            reactor=reactor,
        )
        logs.setName("log-file")
        logs.setServiceParent(top)
    if config.demo_upstream is not None and worker == 1:
        from llmproxy.testing.upstream import FakeUpstreamService

        demo = FakeUpstreamService(reactor, config.demo_upstream)
        demo.setName("demo-upstream")
        demo.setServiceParent(top)
    root.ready = False

    def listening() -> None:
        root.ready = True

    site = build_site(config, reactor, root)
    if worker == 1:
        listener: Listener = Listener(reactor, config.listen, site, "listen", listening)
    else:
        listener = AdoptedListener(reactor, WORKER_FD, site, listening)
    listener.setName("web")
    listener.setServiceParent(top)
    if worker == 1 and workers > 1:
        if path is None:
            raise one_line_exit("workers > 1 needs the config file's path")
        _warn_unshared_limits(config, root)
        spawner = Workers(reactor, listener, workers, path,
                          shared.path if shared is not None else None)
        spawner.setName("workers")
        spawner.setServiceParent(top)
    if config.admin_listen is not None and worker == 1:
        admin_site = build_site(config, reactor, build_admin_resource(root))
        admin = Listener(reactor, config.admin_listen, admin_site, "admin_listen")
        admin.setName("admin")
        admin.setServiceParent(top)
    closer = _CloseService(root.close)
    closer.setName("upstream-pool")
    closer.setServiceParent(top)
    return top


if __name__ == "__main__":  # pragma: no cover
    if "--worker" in sys.argv:
        # Workers now start as ``python -m llmproxy.workers``; this spelling
        # still works.
        from llmproxy.workers import worker_main

        worker_main(sys.argv[1:])
    else:
        sys.exit("run me with: twistd -n llmproxy --config FILE")
