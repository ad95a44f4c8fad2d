"""`-q` and `--log-level` for the Python subcommands (analyze, speculate, fetch), with the meaning every
C++ subcommand gives them: `-q` = warnings and errors only = `--log-level warn`; an explicit
`--log-level` wins over `-q`. The `moetrace` executable hands a level given before the subcommand's
name (`moetrace -q analyze STORE`) through the environment variable MOETRACE_LOG_LEVEL; an option
after the name wins over it."""

from __future__ import annotations

import argparse
import os

LEVELS = ("debug", "info", "warn", "error", "off")
ENV = "MOETRACE_LOG_LEVEL"


def add_log_options(ap: argparse.ArgumentParser) -> None:
    """Adds -q/--quiet and --log-level to a subcommand's parser."""
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="warnings and errors only: no progress output (= --log-level warn)")
    ap.add_argument("--log-level", choices=LEVELS, default=None,
                    help="debug, info, warn, error or off (default info)")


def level_of(args: argparse.Namespace) -> str:
    """The level in force: --log-level, else -q (warn), else $MOETRACE_LOG_LEVEL, else info."""
    if getattr(args, "log_level", None):
        return args.log_level
    if getattr(args, "quiet", False):
        return "warn"
    env = os.environ.get(ENV, "").strip().lower()
    return env if env in LEVELS else "info"


def is_quiet(args: argparse.Namespace) -> bool:
    """True when progress and informational lines are to be left out."""
    return LEVELS.index(level_of(args)) > LEVELS.index("info")
