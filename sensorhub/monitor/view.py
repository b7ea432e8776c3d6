"""Rendering of the monitor state with rich: one screen that answers three questions.

Is data flowing, is anything lost, where is the delay: the top line says it in
words, the panels below show why. In 80 columns the panels are stacked
without borders and in order of urgency (what is cropped at the bottom of a
24-line terminal is the least urgent); from 120 columns they get borders and
two columns. Every function here is pure: state in, renderable out.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["SORTS", "render", "sort_sources", "sparkline"]

#: Source orderings the ``s`` key cycles through.
SORTS = ("name", "rate", "errors", "seen")

_BARS = "▁▂▃▄▅▆▇█"
_WIDE = 120


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters scaled to their maximum."""
    vals = list(values)[-width:] if width > 0 else []
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return _BARS[0] * len(vals)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in vals)


def sort_sources(sources: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sources in the order ``key`` (one of :data:`SORTS`) asks; problems first where it matters."""
    if key == "rate":
        return sorted(sources, key=lambda s: (-s["rows_per_s"], str(s["name"])))
    if key == "errors":
        return sorted(sources, key=lambda s: (-(s["dead_letters"] + s["redis_errors"]), str(s["name"])))
    if key == "seen":
        return sorted(sources, key=lambda s: (-(s["last_frame_age_s"] or 0.0), str(s["name"])))
    return sorted(sources, key=lambda s: (str(s["name"]), str(s["process"])))


def _num(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    if v >= 100 or v == int(v):
        return f"{v:,.0f}"
    return f"{v:.1f}"


def _age(v: float | None) -> str:
    if v is None:
        return "never"
    if v < 60:
        return f"{v:.1f}s"
    if v < 3600:
        return f"{v / 60:.0f}m"
    return f"{v / 3600:.1f}h"


def _ms(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    if v >= 10:
        return f"{v:.0f}"
    return f"{v:.2f}"


_LIGHT = {"ok": "green", "stale": "yellow", "down": "red", "redis-err": "red"}


def _header(st: dict[str, Any], sort: str, focus: str | None) -> RenderableType:
    v = st["verdict"]
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("sensorhub ", style="bold")
    t.append(datetime.fromtimestamp(st["time"], UTC).strftime("%H:%M:%SZ"))
    for name, peer in (("redis", st["redis"]), ("clickhouse", st["clickhouse"])):
        t.append(f"  {name} ")
        t.append("● up" if peer["ok"] else "● DOWN", style="green" if peer["ok"] else "bold red")
    t.append(f"  [q]uit [s]ort:{sort} [d]ead" + ("*" if focus == "dead" else ""), style="dim")
    line = Text()
    line.append("flowing: ")
    line.append(v["flowing"], style="bold green" if v["flowing"] == "yes" else "bold yellow")
    line.append("  lost: ")
    line.append(v["lost"], style="bold green" if v["lost"] == "none" else "bold red")
    line.append("  delay: ")
    alert = st["pipeline"]["lag_alert"]
    line.append(v["delay"], style="bold white on red" if alert else "bold")
    a = st.get("alerts") or {}
    if a.get("processes") or a.get("open"):
        crit = (a.get("open_by_severity") or {}).get("critical", 0)
        line.append("  alerts: ")
        line.append(f"{a['open']} open", style="bold white on red" if crit else ("bold yellow" if a["open"] else "green"))
    return Group(t, line)


def _alert_lines(st: dict[str, Any]) -> list[RenderableType]:
    """The latest open alerts, one line each; a disk that fills up first."""
    out: list[RenderableType] = []
    disk_alert = (st.get("disk") or {}).get("alert")
    if disk_alert:
        out.append(Text(f"  DISK {disk_alert}", style="bold white on red", no_wrap=True, overflow="ellipsis"))
    for e in (st.get("alerts") or {}).get("latest") or []:
        t = Text("  ", no_wrap=True, overflow="ellipsis")
        t.append(f"ALERT {e['severity']}", style="bold red" if e["severity"] == "critical" else "yellow")
        since = datetime.fromtimestamp(float(e.get("opened") or 0), UTC).strftime("%H:%M:%SZ")
        value = "?" if e.get("value") is None else f"{e['value']:.6g}"
        t.append(f" {e['rule']} {e['device']} {e['metric']} {value} (limit {e.get('threshold')}) since {since}")
        out.append(t)
    return out


def _sources(st: dict[str, Any], sort: str, wide: bool, max_rows: int) -> RenderableType:
    t = Table(box=box.SIMPLE_HEAD if wide else None, expand=True, pad_edge=False, show_edge=False,
              title=None if wide else "SOURCES", title_justify="left", title_style="bold")
    t.add_column(" ", width=1, no_wrap=True)
    t.add_column("source", no_wrap=True, ratio=3)
    t.add_column("status", no_wrap=True)
    t.add_column("rows/s", justify="right", no_wrap=True)
    t.add_column("frm/s", justify="right", no_wrap=True)
    t.add_column("dead", justify="right", no_wrap=True)
    t.add_column("err", justify="right", no_wrap=True)
    t.add_column("seen", justify="right", no_wrap=True)
    if wide:
        t.add_column("reconn", justify="right", no_wrap=True)
        t.add_column("gaps", justify="right", no_wrap=True)
        t.add_column("cpu%", justify="right", no_wrap=True)
        t.add_column("rss", justify="right", no_wrap=True)
    rows = sort_sources(st["sources"], sort)
    for s in rows[:max_rows]:
        colour = _LIGHT.get(s["status"], "red")
        status = f"stale {_age(s['age_s'])}" if s["stale"] else s["status"]
        cells: list[RenderableType] = [
            Text("●", style=colour),
            str(s["name"]),
            Text(status, style=colour if s["status"] != "ok" else ""),
            _num(s["rows_per_s"]),
            _num(s["frames_per_s"]),
            Text(str(s["dead_letters"]), style="yellow" if s["dead_letters"] else ""),
            Text(str(s["redis_errors"]), style="red" if s["redis_errors"] else ""),
            _age(s["last_frame_age_s"]),
        ]
        if wide:
            cells += [str(s["reconnects"]), str(s["gaps"]), f"{s['cpu_percent']:.0f}", f"{s['rss_bytes'] / 2**20:.0f}M"]
        t.add_row(*cells)
    if not rows:
        t.add_row("", Text("no ingest process publishes metrics", style="yellow"), *[""] * (len(t.columns) - 2))
    elif len(rows) > max_rows:
        t.add_row("", Text(f"... {len(rows) - max_rows} more", style="dim"), *[""] * (len(t.columns) - 2))
    return Panel(t, title="sources", title_align="left") if wide else t


def _pipeline(st: dict[str, Any], wide: bool) -> RenderableType:
    p = st["pipeline"]
    lines: list[RenderableType] = []
    head = Text(no_wrap=True, overflow="ellipsis")
    if not wide:
        head.append("PIPELINE ", style="bold")
    head.append(f"backlog {_num(p['backlog_entries'])} entries  lag ")
    head.append(f"{p['lag_s']:.1f} s", style="bold red" if p["lag_alert"] else "green")
    if p["lag_alert"]:
        head.append("  ")
        head.append(" LAG ALERT ", style="bold white on red")
    head.append(f"  in {_num(p['ingest_rows_per_s'])}/s  stored {_num(p['writer_rows_per_s'])}/s")
    lines.append(head)
    for w in st["writers"]:
        t = Text("  ", no_wrap=True, overflow="ellipsis")
        t.append("●", style="yellow" if w["stale"] else ("red" if w["lag_alert"] else "green"))
        state = f"stale {_age(w['age_s'])}" if w["stale"] else w["state"]
        t.append(f" {w['name']} {state} {_num(w['rows_per_s'])} rows/s  CH ")
        ok = w["clickhouse_ok"]
        t.append("ok" if ok else ("DOWN" if ok is False else "?"), style="green" if ok else "bold red")
        if w["lag_alert"]:
            t.append("  ")
            t.append(f"LAG ALERT {w['lag_s']:.1f} s", style="bold white on red")
        t.append(f"  batch {_num(w['last_batch_rows'])}  insert p99 {_ms(w['insert_p99_ms'])} ms"
                 f"  retries {w['retries']}")
        lines.append(t)
    if not st["writers"]:
        lines.append(Text("  no writer publishes metrics", style="bold red"))
    lines += _alert_lines(st)
    if wide:
        # only streams holding something: 17 empty partitions say nothing at 3 a.m.
        busy = [(s, g) for s in st["streams"] for g in s["groups"] if s["length"] or g["pending"] or g["lag_s"]]
        if busy:
            tab = Table(box=None, pad_edge=False, show_edge=False, expand=False)
            for col in ("stream", "len", "pending", "lag", "lag s"):
                tab.add_column(col, justify="left" if col == "stream" else "right", no_wrap=True)
            for s, g in busy[:8]:
                lag = "?" if g["lag_entries"] is None else _num(g["lag_entries"])
                tab.add_row(s["stream"], _num(s["length"]), _num(g["pending"]), lag,
                          Text(f"{g['lag_s']:.1f}", style="bold red" if g["lag_s"] > st["lag_alert_s"] else ""))
            lines.append(tab)
        lines.append(Text(f"  {len(st['streams'])} streams, {len(busy)} with entries", style="dim"))
        return Panel(Group(*lines), title="pipeline", title_align="left")
    return Group(*lines)


_MINUTES_SHOWN, _MINUTES_SHOWN_WIDE = 3, 6


def _per_minute(minutes: list[dict[str, Any]], n: int) -> Text:
    """The last ``n`` minutes' p99 (ms, oldest first), the current minute last and bold."""
    vals = [m["p99_ms"] for m in minutes[-n:]]
    if not vals:
        return Text("–", style="dim")
    out = Text(" ".join(f"{v:.0f}" for v in vals[:-1]) + (" " if len(vals) > 1 else ""), style="dim")
    out.append(f"{vals[-1]:.0f}", style="bold")
    return out


def _latency(st: dict[str, Any], wide: bool, width: int) -> RenderableType:
    t = Table(box=box.SIMPLE_HEAD if wide else None, expand=True, pad_edge=False, show_edge=False,
              title=None if wide else "LATENCY (ms)", title_justify="left", title_style="bold")
    t.add_column("hop", no_wrap=True)
    for c in ("p50", "p95", "p99", "max"):
        t.add_column(c, justify="right", no_wrap=True)
    t.add_column("p99/min", justify="right", no_wrap=True)
    t.add_column("p99 history", no_wrap=True, ratio=1)
    spark_w = max(8, width - 60 - (_MINUTES_SHOWN_WIDE if wide else _MINUTES_SHOWN) * 4)
    from sensorhub.monitor.state import ALL_HOPS

    lat = st["latency"]
    order = [h for h in ALL_HOPS if h in lat] + sorted(h for h in lat if h not in ALL_HOPS)
    for hop in order:
        v = lat[hop]
        t.add_row(hop, _ms(v["p50_ms"]), _ms(v["p95_ms"]), _ms(v["p99_ms"]), _ms(v["max_ms"]),
                  _per_minute(v.get("p99_minutes", []), _MINUTES_SHOWN_WIDE if wide else _MINUTES_SHOWN),
                  Text(sparkline(v.get("p99_history", []), spark_w), style="cyan"))
    if not order:
        t.add_row(Text("no latency recorded yet", style="dim"), "", "", "", "", "", "")
    return Panel(t, title="latency (ms)", title_align="left") if wide else t


def _dead(st: dict[str, Any], wide: bool, n: int, width: int) -> RenderableType:
    d = st["dead_letters"]
    head = Text()
    if not wide:
        head.append("DEAD LETTERS ", style="bold")
    head.no_wrap, head.overflow = True, "ellipsis"
    head.append(f"today {d['count_today']}", style="yellow" if d["count_today"] else "green")
    head.append(f"  in ClickHouse {d['stored_today'] if d['stored_today'] is not None else '?'}"
                f"  in stream {d['stream_len']}")
    lines: list[RenderableType] = [head]
    for x in d["latest"][:n]:
        when = datetime.fromtimestamp(x["time"], UTC).strftime("%H:%M:%S")
        lines.append(Text(f"  {when} {x['source']} {x['topic']}: {x['error']}", no_wrap=True, overflow="ellipsis"))
    body = Group(*lines)
    return Panel(body, title="dead letters", title_align="left") if wide else body


def _totals(st: dict[str, Any], wide: bool) -> RenderableType:
    t = st["totals"]
    x = Text()
    if not wide:
        x.append("TODAY ", style="bold")
    # the audit counts messages as received, and rows (readings, trades) from decoding on
    x.append(f"received {_num(t['received'])} msgs  rows: to Redis {_num(t['xadded'])}"
             f"  inserted {_num(t['inserted'])}  stored ")
    x.append(_num(t["stored"]) if t["stored"] is not None else "?", style="" if t["stored"] is not None else "bold red")
    x.append(f"  pending {_num(t['pending'])}  reconciled ")
    rec = t["reconciled"]
    x.append("yes" if rec else ("NO" if rec is False else "?"),
             style="green" if rec else ("bold red" if rec is False else "dim"))
    if t["missing"]:
        x.append(f"  MISSING {t['missing']}", style="bold white on red")
    d = st.get("disk") or {}
    if d.get("free_bytes") is not None:
        x.append("\nDISK " if not wide else "\ndisk ", style="bold")
        x.append(f"{_bytes(d['bytes_on_disk'])} stored"
                 + (f" ({d['bytes_per_row']:.1f} B/row)" if d.get("bytes_per_row") else "")
                 + f"  free {_bytes(d['free_bytes'])} of {_bytes(d['total_bytes'])}"
                 + (f"  {_bytes(d['bytes_per_day'])}/day" if d.get("bytes_per_day") else ""))
        days = d.get("days_until_full")
        x.append(f"  full in {days:g} days" if days is not None else "  full in -",
                 style="bold white on red" if d.get("alert") else "green")
    return Panel(x, title=f"totals {t['day']}", title_align="left") if wide else x


def _bytes(v: float | None) -> str:
    if v is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(v) < 1000 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} TB"


def render(
    st: dict[str, Any],
    *,
    width: int = 80,
    height: int = 24,
    sort: str = "name",
    focus: str | None = None,
) -> RenderableType:
    """The whole screen for a terminal of ``width`` x ``height``."""
    wide = width >= _WIDE and height >= 30
    if wide:
        n_lat = len(st["latency"]) or 1
        src_rows = max(3, height - 2 - 4 - max(7 + len(st["writers"]) + 3, n_lat + 4 + 6))
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(Group(_pipeline(st, True), _totals(st, True)), _latency(st, True, width // 2))
        parts_w: list[RenderableType] = [_header(st, sort, focus)]
        if focus == "dead":
            parts_w.append(_dead(st, True, 8, width))
        parts_w += [_sources(st, sort, True, src_rows), grid]
        if focus != "dead":
            parts_w.append(_dead(st, True, max(3, height // 6), width))
        return Group(*parts_w)
    # stacked, most urgent first; the bottom is cropped on small terminals
    n_lat = len(st["latency"]) or 1
    fixed = 2 + 2 + (1 + len(st["writers"])) + 1 + 2 + n_lat
    src_rows = max(2, height - fixed - 2)
    parts: list[RenderableType] = [_header(st, sort, focus)]
    if focus == "dead":
        parts.append(_dead(st, False, 8, width))
    parts += [
        _pipeline(st, False),
        _sources(st, sort, False, src_rows),
        _totals(st, False),
        _latency(st, False, width),
    ]
    if focus != "dead":
        parts.append(_dead(st, False, 3, width))
    return Group(*parts)

