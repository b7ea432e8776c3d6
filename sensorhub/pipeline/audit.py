"""Audit: exact per-source, per-minute counts, and their reconciliation with ClickHouse.

Ingest increments ``received``, ``decoded``, ``dead_lettered``, ``duplicates``
and ``xadded`` in the same Redis transaction that writes the readings; the
writer increments ``inserted`` / ``dead_inserted`` / ``writer_dead_lettered``
(readings it dead-lettered itself: device time outside the window, or
refused by ClickHouse) in the same script that acknowledges the entries.
Both are therefore exact across crashes. The writer copies these hashes into
``ingest_audit`` (one row per source and minute, process ``redis``);
``sensorhub audit`` compares them with what ``readings`` and
``dead_letters`` hold per source and minute of receive time: every reading
written to Redis is stored or dead-lettered by the writer, and readings
``sensorhub dlq replay`` stored later are counted as replayed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sensorhub.pipeline.keys import StreamLayout

__all__ = ["audit_rows", "export_audit", "reconcile", "reconcile_recent"]

FIELDS = ("received", "decoded", "dead_lettered", "xadded", "inserted")


def audit_rows(redis: Any, layout: StreamLayout) -> list[dict[str, Any]]:
    """The audit counters held in Redis, one dict per source and minute.

    A source and minute is counted in every partition its frames went to
    (``<prefix>:audit:{<p>}:<source>:<minute>``), and under the name of earlier
    releases (``<prefix>:audit:<source>:<minute>``): the sum of them all. On a
    cluster every master is scanned.
    """
    sums: dict[tuple[str, int], dict[str, int]] = {}
    for key in redis.scan_iter(layout.audit_pattern, count=500):
        parsed = layout.parse_audit_key(key.decode() if isinstance(key, bytes) else str(key))
        if parsed is None:
            continue
        row = sums.setdefault(parsed, {})
        for f, v in redis.hgetall(key).items():
            name = f.decode() if isinstance(f, bytes) else str(f)
            row[name] = row.get(name, 0) + int(v)
    rows = [{"source": src, "minute": minute, **h} for (src, minute), h in sums.items()]
    rows.sort(key=lambda r: (r["source"], r["minute"]))
    return rows


def export_audit(redis: Any, ch: Any, layout: StreamLayout, db: str) -> int:
    rows = audit_rows(redis, layout)
    if not rows:
        return 0
    now = datetime.now(UTC)
    data = [
        [
            r["source"],
            "redis",
            datetime.fromtimestamp(r["minute"] * 60, UTC),
            r.get("received", 0),
            r.get("decoded", 0),
            r.get("dead_lettered", 0),
            r.get("xadded", 0),
            r.get("inserted", 0),
            now,
        ]
        for r in rows
    ]
    ch.insert(
        f"{db}.ingest_audit",
        data,
        column_names=["source", "process", "minute", "received", "decoded", "dead_lettered", "xadded", "inserted", "written"],
    )
    return len(data)


def reconcile(redis: Any, ch: Any, layout: StreamLayout, db: str, since_minute: int = 0) -> list[dict[str, Any]]:
    """Per source and minute: written to Redis, counted inserted, and stored in ClickHouse."""
    audit = {(r["source"], r["minute"]): r for r in audit_rows(redis, layout) if r["minute"] >= since_minute}
    stored: dict[tuple[str, int], int] = {}
    if audit:
        lo = min(m for _, m in audit) * 60
        q = ch.query(
            f"SELECT source, toUInt32(intDiv(toUnixTimestamp64Micro(recv), 60000000)) AS minute, count() "
            f"FROM {db}.readings WHERE recv >= fromUnixTimestamp64Micro(toInt64({lo}) * 1000000) "
            f"GROUP BY source, minute"
        )
        stored = {(s, int(m)): int(c) for s, m, c in q.result_rows}
        q = ch.query(
            f"SELECT source, toUInt32(intDiv(toUnixTimestamp64Micro(recv), 60000000)) AS minute, count() "
            f"FROM {db}.dead_letters WHERE recv >= fromUnixTimestamp64Micro(toInt64({lo}) * 1000000) "
            f"GROUP BY source, minute"
        )
        dead = {(s, int(m)): int(c) for s, m, c in q.result_rows}
        # readings stored by `sensorhub dlq replay`, at the source and minute of their dead letter
        q = ch.query(
            f"SELECT d.src, toUInt32(intDiv(toUnixTimestamp64Micro(d.received), 60000000)) AS minute, "
            f"sum(r.n) FROM (SELECT entry_id, any(readings) AS n FROM {db}.dead_letter_replays "
            f"GROUP BY entry_id) AS r INNER JOIN (SELECT entry_id, any(source) AS src, any(recv) AS received "
            f"FROM {db}.dead_letters WHERE recv >= fromUnixTimestamp64Micro(toInt64({lo}) * 1000000) "
            f"GROUP BY entry_id) AS d ON r.entry_id = d.entry_id GROUP BY d.src, minute"
        )
        replayed = {(s, int(m)): int(c) for s, m, c in q.result_rows}
    else:
        dead, replayed = {}, {}
    out = []
    for key in sorted(audit):
        a = audit[key]
        xadded = a.get("xadded", 0)
        st = stored.get(key, 0)
        rejected = a.get("writer_dead_lettered", 0)
        rp = replayed.get(key, 0)
        out.append(
            {
                "source": key[0],
                "minute": datetime.fromtimestamp(key[1] * 60, UTC).strftime("%Y-%m-%d %H:%M"),
                "received": a.get("received", 0),
                "duplicates": a.get("duplicates", 0),
                "dead_lettered": a.get("dead_lettered", 0),
                "dead_stored": dead.get(key, 0),
                "xadded": xadded,
                "inserted": a.get("inserted", 0),
                "writer_dead_lettered": rejected,
                "stored": st,
                "replayed": rp,
                "pending": xadded - a.get("inserted", 0) - rejected,
                "ok": st - rp + rejected == xadded and dead.get(key, 0) == a.get("dead_lettered", 0) + rejected,
            }
        )
    return out


def reconcile_recent(redis: Any, ch: Any, layout: StreamLayout, db: str, minutes: int = 60) -> tuple[bool, str]:
    since = int(time.time() // 60) - minutes
    rows = reconcile(redis, ch, layout, db, since)
    bad = [r for r in rows if not r["ok"] and r["pending"] == 0]
    if bad:
        return False, f"{len(bad)} source-minutes differ, first: {bad[0]}"
    return True, f"{len(rows)} source-minutes reconciled"
