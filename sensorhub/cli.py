"""``sensorhub`` command line: one subcommand per module, imported only when used.

:mod:`sensorhub.commands` declares every command's help and arguments, so
that the parser is built without importing any command; ``main`` then imports
the chosen command's module alone and calls its ``run(args) -> int`` (the
exit status).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from sensorhub.commands import COMMANDS
from sensorhub.errors import ConfigError, SensorhubError, StreamError

log = logging.getLogger("sensorhub")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; imports none of their implementations."""
    parser = argparse.ArgumentParser(prog="sensorhub", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration file")
    parser.add_argument(
        "--log-level", default=os.environ.get("SENSORHUB_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(COMMANDS):
        cmd = COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
    return parser


def implementation(command: str) -> Callable[[argparse.Namespace], int]:
    """The ``run`` of ``command``, importing its module (and only its module) now."""
    run: Callable[[argparse.Namespace], int] = importlib.import_module(COMMANDS[command].module).run
    return run


def _one_line(text: str, limit: int = 0) -> str:
    """The first non-empty line of ``text`` (the rest is detail for --log-level DEBUG)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line[:limit] + "..." if limit and len(line) > limit else line


def _unexpected(exc: BaseException) -> str:
    """One line for an exception no command turned into a :class:`SensorhubError`."""
    mod = type(exc).__module__.split(".", 1)[0]
    if mod == "redis":
        return str(StreamError.from_redis(exc))
    if mod == "clickhouse_connect":
        detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("Code:")), str(exc))
        return f"ClickHouse: {_one_line(detail, 300)} (check clickhouse.url or --clickhouse)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return (f"unexpected {type(exc).__name__}: {_one_line(str(exc), 300)} "
            "(rerun with --log-level DEBUG for the traceback)")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure is one line on stderr (``configuration error: ...`` with exit
    status 78, ``error: ...`` with 1), never a traceback; ``--log-level DEBUG`` logs the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = str(args.log_level).upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        # their retry warnings repeat, over several lines, what the error line says
        # (clickhouse-connect sets the level of "urllib3" itself when imported)
        for name in ("urllib3.connectionpool", "clickhouse_connect"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        rc = implementation(args.command)(args)
    except ConfigError as exc:
        log.debug("configuration error", exc_info=True)
        hint = ""
        if not str(getattr(exc, "key", "")).startswith("--"):
            hint = " (fix it in the configuration file or the environment"
            hint += ")" if args.command == "config" else ", then check with `sensorhub config check`)"
        print(f"configuration error: {_one_line(str(exc))}{hint}", file=sys.stderr)
        return exc.exit_status  # 78, EX_CONFIG: systemd will not help by restarting
    except SensorhubError as exc:
        log.debug("failed", exc_info=True)
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: a clear line, not a traceback
        log.debug("unexpected failure", exc_info=True)
        print(f"error: {_unexpected(exc)}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
