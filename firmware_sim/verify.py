"""Compare a run's ground truth with what ClickHouse holds.

The comparison happens inside ClickHouse: the truth's readings are uploaded
into a scratch table (``Memory`` engine, dropped afterwards) and joined with
``readings`` grouped by its natural key, so millions of rows cost one upload
and two queries.

Numbers (all counted in readings):

- ``published``: readings the simulator counts as published (PUBACKed at QoS 1).
- ``stored``: ``count()`` of the run's rows in ``readings`` (no FINAL), where the
  run's rows are those of its devices within its time span.
- ``distinct``: ``uniqExact((device, metric, ts, seq))`` over the same rows.
- ``lost``: published readings with no stored row.
- ``duplicated``: ``stored - distinct``.
- ``extra``: distinct stored keys the truth does not hold (``distinct - (published - lost)``),
  e.g. a message whose PUBACK never came back although the broker took it.
- ``mismatched``: published readings whose stored value differs (NaN equals NaN).
- latency: ``inserted - ts`` of each published reading's first stored copy
  (the simulator stamps ts at send time; skewed clocks are left out).

Readings of formats that carry no per-reading sequence (line protocol,
Sparkplug) are matched on ``(device, metric, ts)``; the simulator keeps that
unique per device. When the truth holds only counts and checksums (runs past
its ``full_limit``), ``lost`` comes from per-device distinct counts and
``mismatched`` is reported per device (``mismatched_devices``).
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from firmware_sim.truth import CANONICAL_NAN_BITS, read_truth

__all__ = ["connect", "stored_count", "verify"]

_NAN_BITS_SQL = str(CANONICAL_NAN_BITS)


def connect(url: str, database: str = "sensorhub", **kw: Any) -> Any:
    """A clickhouse-connect client for ``url`` (``http://[USER:PASSWORD@]host:port[/db]``).

    The user and password: ``user``/``password`` given here, else the URL's, else
    ``CLICKHOUSE_USER``/``CLICKHOUSE_PASSWORD``, else ``default`` without a password.
    """
    import clickhouse_connect

    parts = urllib.parse.urlsplit(url)
    user = kw.pop("user", None)
    password = kw.pop("password", None)
    if parts.username is not None or parts.password is not None:
        user = user or urllib.parse.unquote(parts.username or "") or None
        password = password if password is not None else urllib.parse.unquote(parts.password or "")
        # the credentials leave the URL, so that no client prints them with it
        netloc = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return clickhouse_connect.get_client(
        dsn=url,
        database=database,
        user=user or os.environ.get("CLICKHOUSE_USER", "default"),
        password=password if password is not None else os.environ.get("CLICKHOUSE_PASSWORD", ""),
        **kw,
    )


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a plain identifier: {name!r}")
    return f"`{name}`"


def _run_filter(summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """WHERE clause selecting the run's rows: its devices within its time span."""
    return (
        "device IN {devs:Array(String)} AND ts >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC') "
        "AND ts <= fromUnixTimestamp64Micro({hi:Int64}, 'UTC')",
        {
            "devs": list(summary["devices"]),
            "lo": int(summary["ts_min_us"]),
            "hi": int(summary["ts_max_us"]),
        },
    )


# Rows per slice of a verification query: exact distinct counts and GROUP BYs
# hold a hash table of every key they see, so a long run is verified in slices
# of devices (the key starts with the device, so the slices add up exactly) and
# the server's memory stays bounded whatever the length of the run.
SLICE_ROWS = 4_000_000


def _slices(client: Any, db: str, where: str, params: dict[str, Any]) -> list[str]:
    """Conditions that split the run's rows into disjoint sets of devices of at most about SLICE_ROWS."""
    total = int(client.query(f"SELECT count() FROM {db}.readings WHERE {where}", parameters=params).result_rows[0][0])
    k = max(1, -(-total // SLICE_ROWS))
    if k == 1:
        return ["1"]
    return [f"cityHash64(device) % {k} = {i}" for i in range(k)]


def stored_count(client: Any, summary: dict[str, Any], database: str = "sensorhub") -> tuple[int, int]:
    """``(count(), distinct keys)`` of the run's rows in ``readings``, in bounded slices."""
    where, params = _run_filter(summary)
    db = _ident(database)
    count = distinct = 0
    for cond in _slices(client, db, where, params):
        row = client.query(
            f"SELECT count(), uniqExact((device, metric, ts, seq)) FROM {db}.readings WHERE {where} AND {cond}",
            parameters=params,
        ).result_rows[0]
        count += int(row[0])
        distinct += int(row[1])
    return count, distinct


def _percentiles(values: list[float]) -> dict[str, float | None]:
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    if not values:
        return dict.fromkeys(keys)
    return dict(zip(keys, (round(float(v), 3) for v in values), strict=True))


def verify(
    client: Any,
    truth_path: str | Path,
    *,
    database: str = "sensorhub",
    dead_letters: bool = True,
) -> dict[str, Any]:
    """Compare the truth file with the ``readings`` table; return the numbers as a dict."""
    summary, chunks = read_truth(truth_path)
    db = _ident(database)
    published = int(summary["published"])
    result: dict[str, Any] = {"published": published}
    if published == 0:
        result.update(stored=0, distinct=0, lost=0, duplicated=0, mismatched=0, **_percentiles([]))
        return result
    stored, distinct = stored_count(client, summary, database)
    result.update(stored=stored, distinct=distinct, duplicated=stored - distinct)
    where, params = _run_filter(summary)
    if summary["full"]:
        result.update(_verify_full(client, summary, chunks, db, where, params))
    else:
        result.update(_verify_counts(client, summary, db, where, params))
    if result.get("lost") is not None:
        result["extra"] = distinct - (published - int(result["lost"]))
    if dead_letters and summary.get("dead_letters"):
        result["dead_letters_expected"] = sum(summary["dead_letters"].values())
        result["dead_letters_stored"] = _dead_letters(client, summary, db)
    return result


def _verify_full(
    client: Any, summary: dict[str, Any], chunks: Any, db: str, where: str, params: dict[str, Any]
) -> dict[str, Any]:
    table = f"sim_truth_{uuid.uuid4().hex[:12]}"
    qt = f"{db}.{_ident(table)}"
    client.command(
        f"CREATE TABLE {qt} (device String, metric String, ts_us Int64, seq Int64, "
        "value Float64, flags UInt8) ENGINE = Memory"
    )
    try:
        devices = np.array(summary["devices"], dtype=object)
        metrics = np.array(summary["metrics"], dtype=object)
        for ch in chunks:
            client.insert(
                qt,
                [
                    devices[ch.device].tolist(),
                    metrics[ch.metric].tolist(),
                    ch.ts_us.tolist(),
                    ch.seq.tolist(),
                    ch.value.tolist(),
                    ch.flags.tolist(),
                ],
                column_names=["device", "metric", "ts_us", "seq", "value", "flags"],
                column_oriented=True,
            )
        found = 0
        mismatched = 0
        lat: list[float] = []
        lat_rows = []
        for with_seq in (True, False):
            key = "device, metric, ts_us, seq" if with_seq else "device, metric, ts_us"
            cond = "t.seq >= 0" if with_seq else "t.seq < 0"
            on = " AND ".join(f"t.{k} = s.{k}" for k in key.split(", "))
            sel_seq = "toInt64(seq) AS seq, " if with_seq else ""
            q = f"""
                SELECT
                    countIf(s.c > 0),
                    countIf(s.c > 0 AND NOT (
                        (isNaN(t.value) AND s.nans = s.c)
                        OR (NOT isNaN(t.value) AND s.nans = 0 AND s.vmin = t.value AND s.vmax = t.value))),
                    quantilesExactIf(0.5, 0.95, 0.99)((s.ins_us - t.ts_us) / 1000.0, s.c > 0 AND t.flags = 0),
                    maxIf((s.ins_us - t.ts_us) / 1000.0, s.c > 0 AND t.flags = 0),
                    countIf(s.c > 0 AND t.flags = 0)
                FROM {qt} AS t
                LEFT JOIN (
                    SELECT device, metric, toUnixTimestamp64Micro(ts) AS ts_us, {sel_seq}
                           count() AS c, min(value) AS vmin, max(value) AS vmax,
                           countIf(isNaN(value)) AS nans,
                           toUnixTimestamp64Micro(min(inserted)) AS ins_us
                    FROM {db}.readings WHERE {where}
                    GROUP BY {key}
                ) AS s ON {on}
                WHERE {cond}
            """
            row = client.query(q, parameters=params).result_rows[0]
            found += int(row[0])
            mismatched += int(row[1])
            if row[4]:
                lat_rows.append((int(row[4]), list(row[2]), float(row[3])))
        if lat_rows:
            # Two groups (with and without seq): take the larger group's quantiles,
            # and the true maximum of both.
            lat_rows.sort(key=lambda r: r[0], reverse=True)
            lat = [*lat_rows[0][1], max(r[2] for r in lat_rows)]
        return {
            "lost": int(summary["published"]) - found,
            "mismatched": mismatched,
            **_percentiles(lat),
        }
    finally:
        client.command(f"DROP TABLE IF EXISTS {qt}")


def _verify_counts(
    client: Any, summary: dict[str, Any], db: str, where: str, params: dict[str, Any]
) -> dict[str, Any]:
    have: dict[str, tuple[int, int]] = {}
    for cond in _slices(client, db, where, params):
        rows = client.query(
            f"""
            SELECT device, count(), sum(if(isNaN(v), toUInt64({_NAN_BITS_SQL}), reinterpretAsUInt64(v)))
            FROM (SELECT device, metric, ts, seq, any(value) AS v FROM {db}.readings WHERE {where} AND {cond}
                  GROUP BY device, metric, ts, seq)
            GROUP BY device
            """,
            parameters=params,
        ).result_rows
        have.update({r[0]: (int(r[1]), int(r[2])) for r in rows})
    lost = 0
    mismatched_devices = 0
    for name, cnt, chk in zip(summary["devices"], summary["counts"], summary["checksums"], strict=True):
        got_cnt, got_chk = have.get(name, (0, 0))
        lost += max(0, int(cnt) - got_cnt)
        if got_cnt == int(cnt) and got_chk != int(chk):
            mismatched_devices += 1
    lat = client.query(
        f"""SELECT quantiles(0.5, 0.95, 0.99)(d), max(d) FROM (
              SELECT (toUnixTimestamp64Micro(inserted) - toUnixTimestamp64Micro(ts)) / 1000.0 AS d
              FROM {db}.readings WHERE {where})""",
        parameters=params,
    ).result_rows[0]
    return {
        "lost": lost,
        "mismatched": None,
        "mismatched_devices": mismatched_devices,
        **_percentiles([*lat[0], lat[1]]),
    }


def _dead_letters(client: Any, summary: dict[str, Any], db: str) -> int | None:
    """Rows in ``dead_letters`` received during the run (None when there is no such table)."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        row = client.query(
            f"SELECT count() FROM {db}.dead_letters WHERE recv >= fromUnixTimestamp64Micro({{lo:Int64}}, 'UTC')",
            parameters={"lo": int(summary["meta"].get("start_unix_us", summary["ts_min_us"]))},
        ).result_rows[0]
    except ClickHouseError:
        return None
    return int(row[0])
