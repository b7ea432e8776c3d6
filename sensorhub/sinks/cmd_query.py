"""``sensorhub query SQL``: run one statement against the configured ClickHouse, a running
stack, or straight against a stopped embedded ClickHouse's data directory."""

from __future__ import annotations

import argparse
import sys

from sensorhub.config import load_settings
from sensorhub.errors import SinkError

HELP = "run a SQL statement and print the result (ClickHouse URL, --stack DIR, or --data DIR)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help="one statement, e.g. \"SELECT count() FROM sensorhub.readings\"")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--clickhouse", metavar="URL", help="a ClickHouse HTTP endpoint (default: clickhouse.url)")
    where.add_argument("--stack", metavar="DIR", help="the ClickHouse of a running `sensorhub stack`")
    where.add_argument("--data", metavar="DIR", help="open an embedded ClickHouse data directory directly (server stopped)")
    p.add_argument("--format", default="PrettyCompactMonoBlock", help="ClickHouse output format")


def run(args: argparse.Namespace) -> int:
    if args.data:
        from pathlib import Path

        if not Path(args.data).is_dir():
            raise SinkError(f"{args.data}: no such data directory")
        import importlib
        from typing import Any

        session: Any = importlib.import_module("chdb.session")
        s = session.Session(args.data)
        try:
            out = s.query(args.sql, args.format).bytes()
        except RuntimeError as exc:
            print(str(exc).strip(), file=sys.stderr)
            return 1
        sys.stdout.write(out.decode(errors="replace"))
        return 0
    url = args.clickhouse
    if args.stack:
        from pathlib import Path

        from sensorhub.service.stack import stack_status

        url = stack_status(Path(args.stack))["clickhouse_url"]
    settings = load_settings(args.config)
    from sensorhub.sinks.clickhouse import connect

    cfg = settings.clickhouse.model_copy(update={"url": url}) if url else settings.clickhouse
    client = connect(cfg)
    result = client.raw_query(args.sql, fmt=args.format)
    sys.stdout.write(result.decode(errors="replace"))
    return 0
