"""The tables of docs/performance.md and docs/reliability.md, rendered from committed benchmark results.

A generated section of a doc sits between two marker comments that name the
table and the result it is rendered from::

    <!-- bench:decoders benchmarks/results/decoders.json -->
    ...
    <!-- /bench -->

When the result is in the repository, the section is its table, under a line
that names the file. When it is not, the section keeps what was written by
hand, under a line that says so: nothing is rendered from numbers that cannot
be checked. A result is a JSON file a benchmark wrote, a directory of them
(the fault scenarios write one file each), or a glob of files in one
directory (``benchmarks/results/soak-40k-*.json``: one row per run). ``tests/test_docs_tables.py``
renders every section in memory and fails when a doc differs.

    python benchmarks/docs_tables.py           # rewrite the sections (make bench-docs)
    python benchmarks/docs_tables.py --check   # list the sections that differ, exit 1 if any

To add a table: write a renderer (the loaded result in, Markdown lines out),
register it in :data:`RENDERERS`, and put the markers in the doc.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/performance.md", "docs/reliability.md", "docs/security.md", "docs/alerts.md")

SECTION = re.compile(
    r"(?P<open><!-- bench:(?P<name>[a-z0-9-]+) (?P<source>\S+) -->\n)(?P<body>.*?)(?P<close><!-- /bench -->)",
    re.S,
)
GENERATED = "*Rendered by `make bench-docs` from [`{source}`]({link}).*"
NOT_REPRODUCED = "*Not reproduced from a committed result: `{source}` is not in the repository.*"
_NOTE = re.compile(r"^\*(Rendered by `make bench-docs` from|Not reproduced from a committed result:) .*\*$")


# ---------------------------------------------------------------- formatting


def _sig3(v: float) -> str:
    """Three significant digits: 7.00, 40.3, 885."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(v))))
    return f"{v:.{digits}f}"


def rate(v: float | None) -> str:
    """A per-second figure with an SI prefix: ``7.00 M``, ``590 k``, ``87.0``."""
    if v is None:
        return "–"
    if abs(v) >= 1e6:
        return f"{_sig3(v / 1e6)} M"
    if abs(v) >= 1e3:
        return f"{_sig3(v / 1e3)} k"
    return _sig3(v)


def ms(v: float | None) -> str:
    """A latency given in milliseconds: ``0.7 ms``, ``25.4 ms``, ``206 ms``, ``22.5 s``."""
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v / 1000:.1f} s"
    if v >= 100:
        return f"{v:.0f} ms"
    return f"{v:.1f} ms"


def count(v: int | None) -> str:
    return "–" if v is None else f"{v:,}"


def fixed(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table; ``align`` has one letter a column: ``l`` left, ``r`` right."""
    sep = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(sep) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


# ---------------------------------------------------------------- end to end (benchmarks/pipeline.py)


def _case_label(r: dict[str, Any]) -> str:
    target, per = r["target_rate"], r["per_message"]
    label = f"{target / 1000:g}k × {per}"
    achieved = r.get("achieved_rate")
    if achieved is not None and achieved < 0.97 * target:
        label += f" (offered {achieved / 1000:.1f} k/s)"
    return label


def pipeline(doc: dict[str, Any]) -> list[str]:
    rows = []
    for r in doc["results"]:
        cpu = r.get("cpu_cores", {})
        rows.append([
            _case_label(r), r.get("mqtt_client", ""), count(r["published"]), count(r["lost"]),
            count(r["duplicated"]), ms(r.get("p50_ms")), ms(r.get("p95_ms")), ms(r.get("p99_ms")),
            ms(r.get("max_ms")),
            " / ".join(fixed(cpu.get(k)) for k in ("mosquitto", "chdb-server", "ingest", "writer")),
        ])
    return table(
        ["readings/s × per message", "MQTT client", "published", "lost", "dup", "p50", "p95", "p99", "max",
         "CPU cores: broker / chdb / ingest / writer"],
        "llrrrrrrrl", rows,
    )


#: hop -> what it spans, in data-path order (sensorhub/metrics/hops.py)
HOP_LABELS = {
    "recv_to_xadd": "MQTT receive → in Redis (ingest)",
    "decode_to_xadd": "block closed → XADD acknowledged",
    "xadd_to_read": "in Redis → read by the writer",
    "insert": "one INSERT (per INSERT, not per reading)",
    "read_to_insert": "read → INSERT done",
    "recv_to_insert": "MQTT receive → row in ClickHouse",
    "device_to_insert": "device time → row in ClickHouse",
}


def pipeline_hops(doc: dict[str, Any], case: str = "40000x10") -> list[str]:
    """The hop percentiles of one case (40k readings/s in frames of 10, native client, when it ran)."""
    runs = [r for r in doc["results"] if r.get("case") == case] or doc["results"][:1]
    if not runs:
        return ["No case in this result."]
    r = next((x for x in runs if x.get("mqtt_client") == "native"), runs[0])
    hops = r.get("hops", {})
    rows = []
    for hop, label in HOP_LABELS.items():
        for key in sorted(k for k in hops if k.split(":", 1)[-1] == hop):
            rows.append([f"{label} (`{key}`)", ms(hops[key].get("p50_ms")), ms(hops[key].get("p99_ms"))])
    return [f"Case `{r['case']}`, MQTT client `{r.get('mqtt_client', '')}`:", "",
            *table(["hop", "p50", "p99"], "lrr", rows)]


def pipeline_drivers(doc: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{r['case']} {r.get('mqtt_client', '')}", count(r["published"]),
            f"{r['achieved_rate'] / 1000:.1f}k/s" if r.get("achieved_rate") is not None else "–",
            f"{count(r['lost'])} / {count(r['duplicated'])}", ms(r.get("p50_ms")), ms(r.get("p99_ms")),
            f"{fixed(r.get('ingest_cpu_us_per_msg'), 1)} µs",
        ]
        for r in doc["results"]
    ]
    return table(
        ["case and driver", "published", "achieved rate", "lost / dup", "p50", "p99", "ingest CPU per message"],
        "lrrrrrr", rows,
    )


# ---------------------------------------------------------------- decoders (benchmarks/decoders.py, sparkplug_host.py)

#: case -> the target it is held to (docs/performance.md)
DECODER_TARGETS = {
    "frame f64 x1": "≥ 1 M frames/s",
    "frame f64 x100": "≥ 5 M",
    "json shape1 x1": "≥ 1.5 M",
    "json shape2 x10": "≥ 1.5 M",
    "ilp x1": "≥ 2 M",
    "ilp x10": "≥ 2 M",
    "sparkplug DDATA x10": "≥ 1 M",
}


def decoders(doc: dict[str, Any]) -> list[str]:
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in doc["results"]:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    rows = []
    for case, impls in by_case.items():
        cy, py = impls.get("cython"), impls.get("python")
        if cy is None and py is None:
            continue  # reference parsers only
        cells = []
        for r in (cy, py):
            cell = rate(r["readings_per_s"]) if r else "–"
            if r and r["readings_per_payload"] == 1 and r["format"] == "frame":
                cell += f" ({rate(r['payloads_per_s'])} frames/s)"
            cells.append(cell)
        rows.append([case, *cells, DECODER_TARGETS.get(case, "")])
    return [
        f"Best of {doc['rounds']} rounds of {doc['round_s']:g} s on one pinned core; the run took {doc['elapsed_s']:g} s.",
        "",
        *table(["case", "Cython readings/s", "twin readings/s", "target"], "lrrl", rows),
    ]


def decoder_parsers(doc: dict[str, Any]) -> list[str]:
    """The third-party JSON parsers alone on the JSON cases' payloads (readings/s)."""
    refs = [r for r in doc["results"] if r["impl"].startswith("reference ")]
    cases = list(dict.fromkeys(r["case"] for r in refs))
    parsers = list(dict.fromkeys(r["impl"] for r in refs))
    got = {(r["impl"], r["case"]): r["readings_per_s"] for r in refs}
    rows = [[p.removeprefix("reference "), *(rate(got.get((p, c))) for c in cases)] for p in parsers]
    return table(["parser (readings/s)", *cases], "l" + "r" * len(cases), rows)


def sparkplug_host(doc: dict[str, Any]) -> list[str]:
    rows = [[r["impl"], rate(r["messages_per_s"]), rate(r["readings_per_s"])] for r in doc["results"]]
    return [f"Case: {doc['case']}.", "", *table(["implementation", "messages/s", "readings/s"], "lrr", rows)]


# ---------------------------------------------------------------- embedded ClickHouse (benchmarks/chdb_server.py)

CHDB_PATHS = {
    "client_insert": "clickhouse-connect `insert` of Python columns, through the server",
    "client_raw_native": "clickhouse-connect `raw_insert` of Native, through the server",
    "direct_send_insert": "chdb in-process, `send_insert` of the same Native",
    "direct_file": "chdb in-process, `file()` table function",
}


def chdb_server(doc: dict[str, Any]) -> list[str]:
    rows = [[CHDB_PATHS.get(p, p), rate(v)] for p, v in doc["median"].items()]
    caption = (
        f"{doc['batches_per_run']} batches of {doc['rows_per_batch']:,} rows per run, {len(doc['runs'])} runs, "
        f"medians; load {doc['machine']['loadavg_1m']} after the run ({doc['when']})."
    )
    return [caption, "", *table(["path", "rows/s"], "lr", rows)]


# ---------------------------------------------------------------- simulator (benchmarks/simulator.py)


def _ms_per_1k(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.1f} ms"


def simulator(doc: dict[str, Any]) -> list[str]:
    rows = []
    for r in doc["results"]:
        if "error" in r:
            rows.append([r["case"], "failed", "", "", "", ""])
        elif "messages_per_s" in r and "client" not in r:
            rows.append([
                r["case"], rate(r["messages_per_s"]), rate(r["readings_per_s"]),
                f"{_ms_per_1k(r['sim_cpu_s_per_1k_messages'])} ({fixed(r['sim_cpu_cores'])} core)",
                _ms_per_1k(r["broker_cpu_s_per_1k_messages"]),
                f"{r['rate_error_pct']:+.2f} %" if "rate_error_pct" in r else "",
            ])
    return [
        f"{doc['seconds_per_case']:g} s per case; load {doc['machine']['load_avg_1m_at_end']} at the end.",
        "",
        *table(["case", "messages/s", "readings/s", "simulator CPU per 1k messages", "broker CPU per 1k messages",
                "rate error"], "lrrrrr", rows),
    ]


def simulator_rate(doc: dict[str, Any]) -> list[str]:
    rows = [
        [r["case"], count(r["target_readings"]), count(r["published"]), f"{r['rate_error_pct']:+.2f} %",
         f"{r['per_second_error_pct_max']:.2f} %"]
        for r in doc["results"]
        if "per_second" in r
    ]
    return table(["case", "target readings", "published", "error, whole run", "worst full second"], "lrrrr", rows)


def simulator_clients(doc: dict[str, Any]) -> list[str]:
    rows = [
        [r["client"], count(r["messages"]), count(r["acked"]), rate(r["messages_per_s"]),
         f"{r['cpu_us_per_message']:.1f} µs" if r.get("cpu_us_per_message") is not None else "–",
         _ms_per_1k(r.get("broker_cpu_s_per_1k_messages")), "yes" if r["complete"] else "no (time bound)"]
        for r in doc["results"]
        if "client" in r and "error" not in r
    ]
    rows += [[r["client"], "failed", "", "", "", "", ""] for r in doc["results"] if "client" in r and "error" in r]
    return table(
        ["client", "messages", "acknowledged", "messages/s", "publisher CPU per message",
         "broker CPU per 1k messages", "all acknowledged"],
        "lrrrrrl", rows,
    )


# ---------------------------------------------------------------- exchange feeds (benchmarks/exchanges.py)


def exchanges(doc: dict[str, Any]) -> list[str]:
    rows = [
        [venue, rate(v["parse"]["frames_per_s"]), rate(v["parse"]["trades_per_s"]),
         f"{v['parse']['bytes_per_frame']:,} B", f"{v['feed']['peak_rss_mb']:.1f} MB"]
        for venue, v in doc["venues"].items()
    ]
    s = doc["summary"]
    return [
        *table(["venue", "frames/s", "trades/s", "frame size", "peak RSS"], "lrrrr", rows),
        "",
        f"Mean {rate(s['mean_frames_per_s'])} frames/s per core; largest feed process {s['max_peak_rss_mb']:.1f} MB.",
    ]


# ---------------------------------------------------------------- fault scenarios (tests/fault, one file each)


def _recovery_clickhouse(n: dict[str, Any]) -> str:
    text = f"outage {n['outage_s']:.1f} s"
    if "drain_s" in n:
        ratio = n["drain_rows_per_s"] / n["live_rows_per_s"] if n.get("live_rows_per_s") else math.nan
        text += (
            f"; drained {n['backlog_entries_at_recovery']:,} entries in {n['drain_s']:.1f} s, "
            f"{rate(n['drain_rows_per_s'])} rows/s ({ratio:.1f}× live)"
        )
    return text


#: scenario file name -> (what happened, the recovery its notes tell)
SCENARIOS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "ingest_kill": ("ingest kill -9, twice", lambda n: f"back READY in {n['ingest_back_s']:.1f} s"),
    "writer_kill": ("writer killed between INSERT and XACK, then kill -9 at a random point",
                    lambda n: "intent replayed on restart"),
    "writer_claim": ("writer stopped, second writer claims its entries and intent",
                     lambda n: f"{n['writer2_claimed']} entries claimed"),
    "clickhouse_outage": ("ClickHouse stopped, then killed; restarted", _recovery_clickhouse),
    "redis_kill": ("Redis kill -9, restarted from its AOF", lambda n: f"Redis back in {n['redis_back_s']:.1f} s"),
    "redis_full": ("Redis full (writer stopped)",
                   lambda n: f"XADD refused {n['xadd_refusals_seen']} times, drained after the writer resumed"),
    "mosquitto_restart": ("mosquitto restarted (SIGTERM)", lambda n: "sessions resumed"),
    "slow_clickhouse": ("slow ClickHouse (stopped 4 s of every 4.5 s)", lambda n: f"{n['lag_alerts']} lag alerts"),
    "broken_clock": ("a device with a broken clock", lambda n: "{stored} stored, {dead_lettered} dead-lettered".format(
        **n["broken_clock"])),
    "overload_3x": ("3× overload for 60 s", lambda n: ""),
    "clickhouse_disk_full": ("ClickHouse's data disk (a 256 MiB tmpfs) filled by another file, then freed",
                             lambda n: f"full {n['full_s']:.1f} s, {n['backlog_entries_while_full']:,} entries "
                                       f"backlog; {len(n['parts_set_aside'])} parts set aside"),
}


def faults(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name in [*(s for s in SCENARIOS if s in results), *sorted(set(results) - set(SCENARIOS))]:
        r = results[name]
        label, recovery = SCENARIOS.get(name, (name, lambda n: ""))
        try:
            recovered = recovery(r.get("notes", {}))
        except KeyError:  # a run that did not get as far as noting it
            recovered = ""
        rss = r.get("peak_rss_mb", {})
        rows.append([
            label, count(r["published"]), count(r["lost"]), count(r["duplicated"]), recovered,
            f"{r['publisher']['achieved_rate'] / 1000:.1f}k/s", ms(r.get("p99_ms")),
            " / ".join(fixed(rss.get(k), 0) for k in ("ingest", "writer", "chdb-server")) + " MB",
        ])
    return table(
        ["scenario", "published", "lost", "duplicated", "recovery", "publish rate", "p99 publish→row",
         "peak RSS ingest / writer / chdb-server"],
        "lrrrlrrl", rows,
    )


# ---------------------------------------------------------------- storage (benchmarks/storage.py)


def _bpr(v: float) -> str:
    return f"{v:.2f}"


def storage(doc: dict[str, Any]) -> list[str]:
    """Bytes per reading after merges, per candidate schema of ``readings`` and signal shape."""
    rows = []
    for signal, res in doc["readings"].items():
        for cand, r in res["candidates"].items():
            c = r["columns"]
            rest = sum(c.get(k, 0.0) for k in ("device", "metric", "source", "quality")) + r["other"]
            rows.append([
                signal, f"`{cand}`", f"**{_bpr(r['bytes_per_row'])}**",
                *(_bpr(c[k]) for k in ("value", "ts", "seq", "recv", "inserted")), _bpr(rest),
                fixed(r["insert_cpu_ms_per_insert"], 1), fixed(r["merge_cpu_s"], 1),
            ])
    return [
        f"{doc['readings_per_signal']:,} readings per signal, INSERTs of {doc['rows_per_insert']:,} rows, "
        f"{doc['engine']}; the run took {doc['elapsed_s']:g} s.",
        "",
        *table(
            ["signal", "candidate", "bytes/reading", "value", "ts", "seq", "recv", "inserted",
             "device, metric, source, quality, index", "insert CPU ms/INSERT", "merge CPU s"],
            "llrrrrrrrrr", rows,
        ),
    ]


def storage_trades(doc: dict[str, Any]) -> list[str]:
    """Bytes per trade after merges, per candidate schema of ``trades``."""
    rows = []
    for cand, r in doc["trades"]["candidates"].items():
        c = r["columns"]
        rest = sum(c.get(k, 0.0) for k in ("venue", "symbol", "side")) + r["other"]
        rows.append([
            f"`{cand}`", f"**{_bpr(r['bytes_per_row'])}**",
            *(_bpr(c[k]) for k in ("trade_id", "price", "amount", "ts", "recv", "inserted")), _bpr(rest),
            fixed(r["insert_cpu_ms_per_insert"], 1), fixed(r["merge_cpu_s"], 2),
        ])
    return [
        f"{doc['trades_rows']:,} synthetic trades, INSERTs of {doc['rows_per_insert']:,} rows.",
        "",
        *table(
            ["candidate", "bytes/trade", "trade_id", "price", "amount", "ts", "recv", "inserted",
             "venue, symbol, side, index", "insert CPU ms/INSERT", "merge CPU s"],
            "lrrrrrrrrrr", rows,
        ),
    ]


def _codec_key(codec: str) -> str:
    """A codec chain as both the benchmark and the schema write it: ``Delta(8), ZSTD(1)`` is ``Delta,ZSTD(1)``."""
    return re.sub(r"\b(Delta|DoubleDelta|Gorilla)\(\d+\)", r"\1", codec).replace(" ", "")


def _measured(candidates: dict[str, Any], column: str, codec: str, order_by: str) -> tuple[str, float] | None:
    """The first candidate sorted like the schema that gave ``column`` the codec ``codec``, and its bytes."""
    for name, r in candidates.items():
        if _codec_key(r["order_by"]) == _codec_key(order_by) and _codec_key(r["codecs"][column]) == _codec_key(codec):
            return name, r["columns"][column]
    return None


def storage_schema(doc: dict[str, Any]) -> list[str]:
    """What the schema's own codecs store (sensorhub/sinks/schema.py), column by column, from the
    candidates of the result that gave a column the same codec and sort order: columns compress
    independently. A column other than ``value`` not measured on one signal takes the other's
    figure (``*``): the simulator makes it the same for both."""
    from sensorhub.sinks.schema import READINGS, TRADES

    signals = list(doc["readings"])
    rows, totals, starred = [], dict.fromkeys(signals, 0.0), False
    for column, _ in READINGS.columns:
        codec = READINGS.codec(column) or "LZ4"
        cells, where = [], ""
        for signal in signals:
            got = _measured(doc["readings"][signal]["candidates"], column, codec, READINGS.order_by)
            mark = ""
            if got is None and column != "value":
                got = next(filter(None, (_measured(doc["readings"][o]["candidates"], column, codec, READINGS.order_by)
                                         for o in signals if o != signal)), None)
                mark = "*" if got else ""
            if got is None:
                cells.append("–")
                totals[signal] = math.nan
                continue
            starred = starred or bool(mark)
            where = where or got[0]
            totals[signal] += got[1]
            cells.append(_bpr(got[1]) + mark)
        rows.append([f"`{column}`", codec, *cells, f"`{where}`"])
    others = {s: next(iter(doc["readings"][s]["candidates"].values()))["other"] for s in signals}
    rows.append(["index, marks, checksums", "", *(_bpr(others[s]) for s in signals), ""])
    rows.append(["**all columns**", "", *(f"**{_bpr(totals[s] + others[s])}**" for s in signals), ""])
    out = table(["readings column", "codec", *(f"{s} bytes/reading" for s in signals), "measured in"],
                "ll" + "r" * len(signals) + "l", rows)
    if starred:
        out += ["", "\\* measured on the other signal's rows: the column is the same in both."]
    trows, ttotal = [], 0.0
    trades = doc["trades"]["candidates"]
    for column, _ in TRADES.columns:
        codec = TRADES.codec(column) or "LZ4"
        got = _measured(trades, column, codec, TRADES.order_by)
        ttotal += got[1] if got else math.nan
        trows.append([f"`{column}`", codec, _bpr(got[1]) if got else "–", f"`{got[0]}`" if got else ""])
    tother = next(iter(trades.values()))["other"]
    trows.append(["index, marks, checksums", "", _bpr(tother), ""])
    trows.append(["**all columns**", "", f"**{_bpr(ttotal + tother)}**", ""])
    return [*out, "", *table(["trades column", "codec", "bytes/trade", "measured in"], "llrl", trows)]


def mqtt_tls(doc: dict[str, Any]) -> list[str]:
    rows = []
    for mode in ("plain", "tls"):
        rounds = [r for r in doc["results"] if r["mode"] == mode]
        sm = doc["summary"][mode]
        rows.append([mode, " / ".join(fixed(r["cpu_us_per_message"], 2) for r in rounds),
                     f"**{fixed(sm['median_cpu_us_per_message'], 2)}**", rate(sm["median_messages_per_s"]),
                     fixed(sm["median_broker_cpu_us_per_message"], 2)])
    sm = doc["summary"]
    return [
        *table(["native driver", "CPU µs/message, each round", "median", "messages/s", "broker CPU µs/message"],
               "lrrrr", rows),
        "",
        f"TLS / plain: **{fixed(sm['ratio_tls_to_plain'], 3)}** (target at most {fixed(sm['target_max_ratio'], 2)}); "
        f"{doc['tls']['version']}, {doc['tls']['cipher']}; {doc['case']}.",
    ]


def cluster(doc: dict[str, Any]) -> list[str]:
    rows = []
    for r in doc["results"]:
        cpu = r["cpu_s"]
        rows.append([r["setup"], str(r["round"]), count(r["published"]), count(r["lost"]), count(r["duplicated"]),
                     rate(r["achieved_rate"]), ms(r["p50_ms"]), ms(r["p99_ms"]), ms(r["max_ms"]),
                     fixed(cpu.get("chdb-server", math.nan), 0),
                     fixed(sum(v for k, v in cpu.items() if k.startswith("redis")), 1)])
    sm = doc["summary"]
    return [
        *table(["setup", "round", "published", "lost", "doubled", "achieved", "p50", "p99", "max",
                "chdb-server CPU s", "Redis CPU s"], "lrrrrrrrrrr", rows),
        "",
        f"{doc['rate']:,} readings/s in frames of {doc['per_message']}, {doc['seconds']:.0f} s a round, rounds "
        f"alternating; `cluster` is `{doc['setups']['cluster']}`. Median p99: single "
        f"{ms(sm['single']['median_p99_ms'])}, cluster {ms(sm['cluster']['median_p99_ms'])} "
        f"({fixed(sm['p99_ratio_cluster_to_single'], 1)}x).",
    ]


_ALERT_HOPS = (
    ("recv_to_sent", "MQTT receive → WebSocket send", "every message to every client (the 50 ms target)"),
    ("recv_to_client", "MQTT receive → client receive", "every message, as the clients saw it"),
    ("recv_to_last_sent", "MQTT receive → last client's send", "per event, the slowest of the clients"),
    ("recv_to_evaluated", "MQTT receive → evaluator emit", "per event"),
    ("evaluated_to_sent", "evaluator emit → WebSocket send", "the gateway's share"),
)


def alerts(doc: dict[str, Any]) -> list[str]:
    rows = []
    for r in doc["results"]:
        for key, hop, what in _ALERT_HOPS:
            h = r[key]
            rows.append([str(r.get("run", 1)), hop, what, count(h["count"]), fixed(h["p50_ms"], 1),
                         fixed(h["p90_ms"], 1), fixed(h["p99_ms"], 2), fixed(h["max_ms"], 1)])
    sm = doc.get("summary", {})
    out = table(["run", "from → to", "what", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms"], "lllrrrrr", rows)
    if sm:
        out += ["", f"Median over {sm['runs']} runs of the p99 from MQTT receive to WebSocket send: "
                    f"**{fixed(sm['median_recv_to_sent_p99_ms'], 2)} ms** (target {fixed(sm['target_p99_ms'], 0)} ms); "
                    f"median p50 {fixed(sm['median_recv_to_sent_p50_ms'], 1)} ms. Load average at the end "
                    f"{doc['machine']['load_avg_1m_at_end']}."]
    return out


def disk_race(doc: dict[str, Any]) -> list[str]:
    """benchmarks/disk_race.py: rows of acknowledged INSERTs lost, per variant."""
    names = {"check": "sensorhub (parts of an INSERT checked on a low disk)",
             "no-check": "without the check (`--verify-inserts-below 0`)"}
    rows = []
    for variant, sm in doc["summary"].items():
        runs = [r for r in doc["results"] if r["variant"] == variant]
        rows.append([names.get(variant, variant), f"{sm['runs_with_loss']} of {sm['runs']}",
                     f"{count(sm['acked_rows_lost'])} of {count(sm['acked_rows'])}",
                     count(sm["acked_rollup_rows_lost"]), count(sm["broken_insert_parts_caught"]),
                     count(sum(r["disk_fills"] for r in runs))])
    st = doc["settings"]
    header = ["variant", "runs with a loss", "rows of acknowledged INSERTs lost", "of them in the minute rollup",
              "broken parts caught", "times the disk was filled"]
    return [*table(header, "lrrrrr", rows), "",
            f"{st['inserts']} INSERTs of {count(st['rows'])} readings a run, a {st['disk_mb']} MiB tmpfs filled to "
            f"{st['leave_mb']} MiB free, then to the last byte for {st['hold_s']} s every {st['hold_s'] + st['gap_s']:.2f} s "
            "by another writer; counted after a restart of the server."]


def drain(doc: dict[str, Any]) -> list[str]:
    """benchmarks/drain.py: the backlog of a ClickHouse outage drained, per writer variant (medians of the runs)."""
    names = {"as shipped": "as shipped (reads the next batch while behind; backoff cap 1 s)",
             "wait-for-insert": "waits for each INSERT; backoff cap 10 s"}
    live = doc["settings"]["rate"]
    rows = []
    for variant, sm in doc["summary"].items():
        runs = [r for r in doc["results"] if r["variant"] == variant]
        each = ", ".join(f"{r['notes']['drain_rows_per_s'] / live:.1f}×" for r in runs
                         if r["notes"].get("drain_rows_per_s"))
        rows.append([
            names.get(variant, variant), f"{sm['passed']} of {sm['runs']}", f"{sm['lost']} / {sm['duplicated']}",
            count(round(sm["median_backlog_entries"] or 0)),
            f"{fixed(sm['median_writer_resumed_s'])} s / {fixed(sm['max_writer_resumed_s'])} s",
            f"{rate(sm['median_drain_rows_per_s'])} ({fixed(sm['median_drain_x_live'], 1)}×; runs {each})",
            f"{fixed(sm['median_drain_from_resume_x_live'], 1)}×",
            f"{sm['median_ref_python_s']:.3f} s",
        ])
    header = ["writer", "scenarios passed", "lost / dup", "backlog at recovery (entries)",
              "recovery → first INSERT, median / max", "drain, rows/s (× live)", "from the first INSERT",
              "reference: Python loop"]
    st = doc["settings"]
    return [*table(header, "lrrrrrrr", rows), "",
            f"Medians of {max(sm['runs'] for sm in doc['summary'].values())} runs a variant, alternating, at "
            f"{rate(live)} readings/s for {st['seconds']} s (commit {doc['commit']}); the drain counts rows inserted "
            "from the recovery until the writer's lag is under 1 s, live readings included."]


# ---------------------------------------------------------------- soak (benchmarks/soak.py)


def _mins(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def _flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"writer": {"overlap": False}}`` → ``{"writer.overlap": False}``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def soak(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per run: the load, what was stored, device time → row, CPU, and the box's reference."""
    rows = []
    for stem, d in runs.items():
        r, cpu = d["result"], d.get("cpu_cores_mean", {})
        # every minute of device time but the first and the last (partly before and after the load)
        worst = max((m["p99_ms"] for m in d.get("per_minute", [])[1:-1]), default=None)
        rb, ra = d["reference_before"], d["reference_after"]
        setting = "; ".join([
            *(f"`{k} = {json.dumps(v)}`" for k, v in _flat(tomllib.loads(d.get("config", ""))).items()),
            *(f"`{stmt}`" for stmt in d.get("after_up", [])),
        ]) or "as shipped"
        rows.append([
            f"`{stem}.json`" + (f" ({d['commit']})" if d.get("commit") else ""), setting, f"{d['rate'] / 1000:g}k × {d['per_message']}, {_mins(d['seconds'])}",
            count(r["stored"]), f"{count(r['lost'])} / {count(r['duplicated'])}",
            ms(r["p50_ms"]), ms(r["p95_ms"]), ms(r["p99_ms"]), ms(r["max_ms"]), ms(worst),
            " / ".join(fixed(cpu.get(k), 2) for k in ("chdb-server", "writer", "ingest")),
            f"{fixed(rb['ref_python_s'], 3)} s; {ms(rb['ref_chdb'].get('p99_ms'))} / {ms(ra['ref_chdb'].get('p99_ms'))}",
        ])
    return table(
        ["run", "settings", "load", "stored", "lost / dup", "p50", "p95", "p99", "max", "worst minute p99",
         "cores: chdb-server / writer / ingest", "reference: Python loop; chdb insert p99 before / after"],
        "lllrrrrrrrrl", rows,
    )


RENDERERS: dict[str, Callable[[Any], list[str]]] = {
    "soak": soak,
    "alerts": alerts,
    "cluster": cluster,
    "mqtt-tls": mqtt_tls,
    "pipeline": pipeline,
    "pipeline-hops": pipeline_hops,
    "pipeline-drivers": pipeline_drivers,
    "decoders": decoders,
    "decoder-parsers": decoder_parsers,
    "sparkplug-host": sparkplug_host,
    "chdb-server": chdb_server,
    "simulator": simulator,
    "simulator-rate": simulator_rate,
    "simulator-clients": simulator_clients,
    "exchanges": exchanges,
    "faults": faults,
    "disk-race": disk_race,
    "drain": drain,
    "storage": storage,
    "storage-trades": storage_trades,
    "storage-schema": storage_schema,
}


# ---------------------------------------------------------------- sections


def _globbed(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name)) if "*" in path.name else []


def load(path: Path) -> Any:
    """A result file's JSON; for a directory, or a glob of files, ``{file stem: JSON}``."""
    if path.is_dir():
        return {p.stem: json.loads(p.read_text()) for p in sorted(path.glob("*.json"))}
    if "*" in path.name:
        return {p.stem: json.loads(p.read_text()) for p in _globbed(path)}
    return json.loads(path.read_text())


def section_body(name: str, source: str, old_body: str, root: Path) -> str:
    """What a section holds: the rendered table, or the old text under the not-reproduced line."""
    if name not in RENDERERS:
        raise KeyError(f"no renderer {name!r} (known: {', '.join(RENDERERS)})")
    path = root / source
    if path.is_file() or (path.is_dir() and any(path.glob("*.json"))) or _globbed(path):
        link = "../" + (source.rsplit("/", 1)[0] if "*" in path.name else source)  # the docs are one folder down
        note = GENERATED.format(source=source, link=link)
        content = RENDERERS[name](load(path))
    else:
        note = NOT_REPRODUCED.format(source=source)
        content = old_body.strip("\n").splitlines()
        if content and _NOTE.match(content[0]):
            content = "\n".join(content[1:]).strip("\n").splitlines()
    return "\n".join([note, "", *content, ""] if content else [note, ""]) + "\n"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated section rendered anew."""

    def one(m: re.Match[str]) -> str:
        return m["open"] + section_body(m["name"], m["source"], m["body"], root) + m["close"]

    return SECTION.sub(one, text)


def sections(text: str) -> list[tuple[str, str]]:
    """``(name, source)`` of every generated section of ``text``."""
    return [(m["name"], m["source"]) for m in SECTION.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a doc is out of date")
    args = ap.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        new = render(text)
        if new == text:
            continue
        stale.append(doc)
        if not args.check:
            path.write_text(new)
    verb = "out of date" if args.check else "rewrote"
    for doc in stale:
        print(f"{verb}: {doc}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
