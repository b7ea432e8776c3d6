"""``sensorhub query SQL``: run one statement against the configured ClickHouse, a running
stack, or straight against a stopped embedded ClickHouse's data directory.

Statements run in the configured database (``clickhouse.database``, or the one a
``--clickhouse`` URL or the stack names), so ``SELECT count() FROM readings`` works.
"""

from __future__ import annotations

import argparse
import sys

from sensorhub.config import load_settings
from sensorhub.errors import SinkError
from sensorhub.sinks.clickhouse import reason


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    database = args.database or settings.clickhouse.database
    if args.data:
        from pathlib import Path

        if not Path(args.data).is_dir():
            raise SinkError(f"{args.data}: no such data directory")
        import importlib
        from typing import Any

        session: Any = importlib.import_module("chdb.session")
        s = session.Session(args.data)
        try:
            s.query(f"USE {_ident(database)}")
            out = s.query(args.sql, args.format).bytes()
        except RuntimeError as exc:
            raise SinkError(f"the query failed in database {database} of {args.data}: {reason(exc)}") from None
        sys.stdout.write(out.decode(errors="replace"))
        return 0
    cfg = settings.clickhouse
    if args.stack:
        from pathlib import Path

        from sensorhub.service.stack import stack_status

        st = stack_status(Path(args.stack))
        if not st["running"]:
            raise SinkError(f"the stack in {args.stack} is not running (start it: sensorhub stack up --dir {args.stack})")
        cfg = cfg.at(st["clickhouse_url"])
    elif args.clickhouse:
        cfg = cfg.at(args.clickhouse)
    if args.database is None:
        database = cfg.database
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from sensorhub.sinks.clickhouse import connect

    client = connect(cfg, database=database)
    try:
        result = client.raw_query(args.sql, fmt=args.format)
    except ClickHouseError as exc:
        raise SinkError(f"the query failed in database {database}: {reason(exc)}") from None
    finally:
        client.close()
    sys.stdout.write(result.decode(errors="replace"))
    return 0


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise SinkError(f"not a database name: {name!r}")
    return name
