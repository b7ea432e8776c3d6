"""``sensorhub audit [--reconcile]``: per source and minute, written vs stored."""

from __future__ import annotations

import argparse
import json

import redis
from rich.console import Console
from rich.table import Table

from sensorhub.config import load_settings
from sensorhub.errors import ConfigError, StreamError
from sensorhub.pipeline.audit import reconcile
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.redisconn import redis_client
from sensorhub.sinks.clickhouse import connect


def run(args: argparse.Namespace) -> int:
    s = load_settings(args.config)
    url = args.redis or s.redis.url
    try:
        r = redis_client(s.redis, url, socket_timeout=s.redis.socket_timeout_s,
                                 socket_connect_timeout=s.redis.socket_timeout_s)
    except ValueError:
        raise ConfigError("--redis" if args.redis else "redis.url", "a redis:// or rediss:// URL", url) from None
    ch_cfg = s.clickhouse.at(args.clickhouse) if args.clickhouse else s.clickhouse
    ch = connect(ch_cfg)
    try:
        rows = reconcile(r, ch, StreamLayout(s.redis.prefix, s.redis.partitions), ch_cfg.database)
    except redis.RedisError as exc:
        raise StreamError.from_redis(exc, url) from exc
    gaps = [x for x in rows if not x["ok"]]
    if args.json:
        print(json.dumps({"rows": rows, "gaps": gaps}, indent=1))
    else:
        t = Table(title="sensorhub audit")
        # writer_dead_lettered: written to Redis, then dead-lettered by the writer (device time, refused rows)
        cols = ("source", "minute", "received", "duplicates", "dead_lettered", "xadded", "inserted",
                "writer_dead_lettered", "stored", "ok")
        for col in cols:
            t.add_column(col, justify="right" if col not in ("source", "minute") else "left")
        for x in rows:
            t.add_row(*[str(x[c]) if c != "ok" else ("[green]yes" if x["ok"] else "[red]NO") for c in cols])
        Console().print(t)
        for g in gaps:
            why = (
                f"{g['pending']} readings not yet inserted" if g["pending"]
                else f"stored {g['stored'] - g['replayed']} + dead-lettered by the writer "
                f"{g['writer_dead_lettered']} != written {g['xadded']}"
            )
            print(f"gap: {g['source']} {g['minute']}: {why}")
    return 1 if (args.reconcile and gaps) else 0
