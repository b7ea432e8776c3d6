"""The monitor shows bytes on disk, bytes a day at the current rate and days until full, with an alert."""

from __future__ import annotations

from typing import Any

from sensorhub.monitor.view import render
from sensorhub.sinks.schema import apply_schema
from tests.monitor.test_state import _collector, _insert_readings, _text


def test_disk_figures_come_from_the_parts_and_the_disk(
    fleet: dict[str, Any], redis_client: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    apply_schema(ch_client, ch_database)
    _insert_readings(ch_client, ch_database, 5000)
    st = _collector(redis_client, chdb_server.url, ch_database).collect()
    d = st["disk"]
    parts = ch_client.query(
        "SELECT sum(bytes_on_disk), sum(rows) FROM system.parts WHERE active AND database = {db:String}",
        parameters={"db": ch_database},
    ).result_rows[0]
    free, total = ch_client.query("SELECT free_space, total_space FROM system.disks WHERE name = 'default'").result_rows[0]
    assert d["bytes_on_disk"] == int(parts[0]) > 0
    assert d["bytes_per_row"] == round(int(parts[0]) / int(parts[1]), 2)
    assert 0 < d["free_bytes"] <= d["total_bytes"] and abs(d["free_bytes"] - free) < total * 0.01
    # the fleet's writer stores rows now: a day is that rate times a row's bytes on disk
    rate = st["pipeline"]["writer_rows_per_s"]
    assert rate > 0
    assert d["bytes_per_day"] == int(int(parts[0]) / int(parts[1]) * rate * 86400)
    # full where the tables refuse INSERTs: 2 % of the disk still free
    assert d["days_until_full"] == round((d["free_bytes"] - 0.02 * d["total_bytes"]) / d["bytes_per_day"], 1)
    assert d["alert"] is None  # a few KB a day fill no disk in a week

    # an operator who wants a year of headroom is told
    st = _collector(redis_client, chdb_server.url, ch_database, disk_alert_days=1e9).collect()
    assert st["disk"]["alert"] and "full in" in st["disk"]["alert"]
    screen = _text(render(st, width=100, height=40), 100)
    assert "DISK full in" in screen
    st = _collector(redis_client, chdb_server.url, ch_database, disk_alert_free_pct=100).collect()
    assert "% free" in st["disk"]["alert"]


def test_no_clickhouse_no_disk_figures(fleet: dict[str, Any], redis_client: Any) -> None:
    d = _collector(redis_client, None).collect()["disk"]
    assert d["bytes_on_disk"] is None and d["free_bytes"] is None and d["alert"] is None
