"""``twistd llmproxy``: the command-line options and the service to run.

:class:`Options` loads and validates the config (``--check`` prints it and
exits); :func:`makeService` hands it to :func:`llmproxy.workers.main_process`,
which builds the daemon (:mod:`llmproxy.app` does the wiring).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from llmproxy import logs
from llmproxy.config import Config, ConfigError, config_warnings, dump_config, load_config
from llmproxy.daemon import config_error_exit
from llmproxy.app import warn_about
from llmproxy.workers import main_process

__all__ = ["Options", "makeService"]

DEFAULT_CONFIG = "etc/config.yml"


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

        A bad config exits with one line for each mistake, naming its key
        and its line and column; twistd's own UsageError handling would
        print the whole usage text around it. ``--check`` also prints what
        the config probably gets wrong (warnings: the exit status stays 0).
        """
        try:
            self.loaded: Config = load_config(self["config"])
        except ConfigError as e:
            raise config_error_exit(e) from None
        if self["check"]:
            warnings = config_warnings(self.loaded)
            for warning in warnings:
                sys.stderr.write(f"llmproxy: config warning: {warning}\n")
            sys.stderr.flush()
            sys.stdout.write(f"# {self['config']}: valid"
                             + (f", {len(warnings)} warning(s)" if warnings else "") + "\n")
            sys.stdout.write(dump_config(self.loaded))
            sys.stdout.flush()
            raise SystemExit(0)
        parent: Any = getattr(self, "parent", None)
        if parent is not None and parent.get("nodaemon") and not parent.get("logger"):
            # In the foreground (systemd, journald), log readable lines to
            # stdout at log.level instead of twistd's unfiltered default.
            if parent.get("logfile") in (None, "-"):
                logs.twistd_console_level = self.loaded.log.level
                logs.twistd_console_access = self.loaded.log.console_access
                parent["logger"] = "llmproxy.logs.twistd_console_observer"


def makeService(options: Options) -> Any:
    """Build the daemon's services from parsed options.

    Args:
        options: Parsed :class:`Options` (the config is loaded already).

    Returns:
        The MultiService that twistd runs (it handles SIGTERM and SIGHUP).
    """
    from twisted.internet import reactor

    config = getattr(options, "loaded", None) or load_config(options["config"])
    warn_about(config)
    try:
        daemon = main_process(config, reactor, options["config"])
    except ConfigError as e:
        raise config_error_exit(e) from None
    daemon.handle_signals = True
    return daemon
