"""``sensorhub schema``: print the DDL, apply it to the configured ClickHouse, or migrate an older database."""

from __future__ import annotations

import argparse

from sensorhub.config import load_settings
from sensorhub.sinks.clickhouse import connect
from sensorhub.sinks.migrations import migrate
from sensorhub.sinks.schema import SCHEMA_VERSION, Retention, apply_schema, ddl, statements_text


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.clickhouse or args.database or args.cluster:
        ch0 = load_settings(args.config).clickhouse
        if args.clickhouse:
            ch0 = ch0.at(args.clickhouse)
        base = ch0.model_dump()
        if args.database:
            base["url"] = ch0.server_url  # --database wins over a database in the URL
            base["database"] = args.database
        if args.cluster:
            base["cluster"] = args.cluster
        overrides["clickhouse"] = base
    settings = load_settings(args.config, **overrides)
    ch = settings.clickhouse
    retention = Retention.of(ch)
    if args.action == "print":
        print(f"-- sensorhub schema version {SCHEMA_VERSION}")
        print(statements_text(ddl(ch.database, ch.cluster, retention)))
        return 0
    client = connect(ch)
    if args.action == "migrate":
        stmts = migrate(client, ch.database, ch.cluster, retention)
        done = f"{len(stmts)} statements" if stmts else "nothing to do"
        print(f"database {ch.database} on {ch.url} is at schema version {SCHEMA_VERSION} ({done})")
        return 0
    stmts = apply_schema(client, ch.database, ch.cluster, retention)
    print(f"schema version {SCHEMA_VERSION} applied to {ch.url} database {ch.database} ({len(stmts)} statements)")
    return 0
