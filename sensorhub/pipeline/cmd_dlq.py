"""``sensorhub dlq list|replay``: look at dead letters, and decode them again after a fix."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from sensorhub.config import load_settings
from sensorhub.pipeline.dlq import replay_dead_letters
from sensorhub.sinks.clickhouse import connect


def run(args: argparse.Namespace) -> int:
    s = load_settings(args.config)
    if args.clickhouse:
        s = s.model_copy(update={"clickhouse": s.clickhouse.at(args.clickhouse)})
    ch = connect(s.clickhouse)
    db = s.clickhouse.database
    if args.action == "replay":
        report = replay_dead_letters(s, ch, source=args.source, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(asdict(report)))
        else:
            print(
                f"{report.considered} dead letters not replayed before; {report.replayed} decode now "
                f"({report.readings} readings{', not stored: dry run' if args.dry_run else ' stored'}); "
                f"{report.still_failing} still fail"
            )
            for reason, n in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
                print(f"  {n:6d}  {reason}")
        return 0
    where = "WHERE source = {src:String}" if args.source else ""
    rows = ch.query(
        f"SELECT recv, source, topic, error, length(payload), entry_id IN (SELECT entry_id FROM {db}.dead_letter_replays) "
        f"FROM {db}.dead_letters {where} ORDER BY recv DESC LIMIT {int(args.limit)}",
        parameters={"src": args.source} if args.source else None,
    ).result_rows
    if args.json:
        print(json.dumps([[str(c) for c in r] for r in rows]))
        return 0
    t = Table(title="dead letters (newest first)")
    for c in ("received", "source", "topic", "error", "bytes", "replayed"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r[0]), r[1], r[2], r[3][:80], str(r[4]), "yes" if r[5] else "")
    Console().print(t)
    return 0
