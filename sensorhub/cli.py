"""``sensorhub`` command line: one subcommand per module, imported only when used.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

from sensorhub.errors import ConfigError, SensorhubError

# name -> module; keep sorted. A command is listed only once it works.
COMMANDS: dict[str, str] = {
    "audit": "sensorhub.pipeline.cmd_audit",
    "chdb-server": "sensorhub.chdb_server.cli",
    "config": "sensorhub.cmd_config",
    "decode": "sensorhub.decoders.cmd_decode",
    "dlq": "sensorhub.pipeline.cmd_dlq",
    "ingest": "sensorhub.pipeline.cmd_ingest",
    "metrics-exporter": "sensorhub.metrics.prometheus",
    "monitor": "sensorhub.monitor.cmd_monitor",
    "writer": "sensorhub.pipeline.cmd_writer",
    "replay": "sensorhub.replay.cmd_replay",
    "query": "sensorhub.sinks.cmd_query",
    "schema": "sensorhub.sinks.cmd_schema",
    "stack": "sensorhub.service.stack",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensorhub", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration file")
    parser.add_argument(
        "--log-level", default=os.environ.get("SENSORHUB_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(COMMANDS):
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc: int = args._run(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG: systemd will not help by restarting
    except SensorhubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
