"""A part found broken while a statement reads it: the server reopens the engine, which detaches
the part and brings back the parts it was merged from, and the statement is answered.

The part is broken as a full disk once left one (an empty marks file), in a real engine behind
a real chdb-server; the reads go through the ClickHouse HTTP interface.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from kit.services import ManagedProcess, start_chdb_server


def _empty_a_marks_file(data: Path, part: str, column: str = "v") -> Path:
    (part_dir,) = [p for p in data.glob(f"store/*/*/{part}") if p.is_dir()]
    (marks,) = sorted(part_dir.glob(f"{column}.*mrk*"))
    marks.write_bytes(b"")
    return marks


@pytest.fixture
def server_and_client(tmp_path: Path) -> Iterator[tuple[ManagedProcess, Any]]:
    """A chdb-server of its own, a client, and a table ``t`` of wide parts (a marks file a column)."""
    server = start_chdb_server(tmp_path)
    client = clickhouse_connect.get_client(dsn=server.url)
    try:
        client.command(
            "CREATE TABLE t (k UInt32, v Float64) ENGINE = MergeTree ORDER BY k SETTINGS min_bytes_for_wide_part = 0"
        )
        yield server, client
    finally:
        client.close()
        server.terminate(timeout=20)


def test_a_broken_merged_part_is_detached_and_its_sources_restored(server_and_client: Any, tmp_path: Path) -> None:
    server, client = server_and_client
    client.command("INSERT INTO t SELECT number, number FROM numbers(1000)")
    client.command("INSERT INTO t SELECT number, number FROM numbers(1000, 500)")
    client.command("OPTIMIZE TABLE t FINAL")
    (merged,) = [n for (n,) in client.query("SELECT name FROM system.parts WHERE table = 't' AND active").result_rows]
    _empty_a_marks_file(tmp_path / "chdb" / "data", merged)
    # the first read meets the broken part; it is answered from the restored sources
    assert client.query("SELECT count(), sum(v) FROM t").result_rows == [(1500, 1124250.0)]
    detached = client.query("SELECT name, reason FROM system.detached_parts WHERE table = 't'").result_rows
    assert detached == [(f"broken-on-start_{merged}", "broken-on-start")]
    client.command("INSERT INTO t VALUES (2000, 1.0)")  # the table takes inserts again
    assert int(client.command("SELECT count() FROM t")) == 1501
    log = server.log_path.read_text()
    assert "a part is broken, reopening the engine" in log
    assert f"part default.t/broken-on-start_{merged} (broken-on-start, blocks 1-2, level 1) was set aside" in log
    assert "covers a single block" not in log


def test_a_part_broken_again_within_a_minute_returns_the_error(server_and_client: Any, tmp_path: Path) -> None:
    _, client = server_and_client
    for start in (0, 1000, 2000):
        client.command(f"INSERT INTO t SELECT number, number FROM numbers({start}, 10)")
    data = tmp_path / "chdb" / "data"
    _empty_a_marks_file(data, "all_1_1_0")
    # (a bare count() is answered from the parts' row counts without reading a column)
    assert client.query("SELECT count(), sum(v) FROM t").result_rows == [(20, 30090.0)]  # all_1_1_0 is gone
    _empty_a_marks_file(data, "all_2_2_0", "k")  # v's marks are in the engine's cache now
    with pytest.raises(DatabaseError) as broken:
        client.query("SELECT sum(k) FROM t")
    assert broken.value.code == 246  # CORRUPTED_DATA: no second reopening so soon


def test_every_table_gets_the_engine_settings_and_an_old_database_gets_them_at_start(tmp_path: Path) -> None:
    """chdb's own old_parts_lifetime is 0: without sensorhub's setting the parts a merge replaced
    are deleted at the next cleanup, and a merge result found broken later cannot be recovered;
    without the insert floor an INSERT writes into the last bytes of a full disk
    (benchmarks/full_disk.py measures both). A database made before the settings gets them at
    the next start."""
    from sensorhub.sinks.schema import ENGINE_SETTINGS, apply_schema

    server = start_chdb_server(tmp_path)
    client = clickhouse_connect.get_client(dsn=server.url)

    def settings() -> dict[str, dict[str, str]]:
        rows = client.query(
            "SELECT name, engine_full FROM system.tables WHERE database = 'sensorhub' AND engine LIKE '%MergeTree' AND name != 'schema_version'"
        ).result_rows
        return {n: {k: (m.group(1) if (m := re.search(rf"\b{k} = ([\d.]+)", e)) else "") for k in ENGINE_SETTINGS}
                for n, e in rows}

    try:
        apply_schema(client, "sensorhub")
        got = settings()
        assert ENGINE_SETTINGS == {"old_parts_lifetime": "480", "min_free_disk_ratio_to_perform_insert": "0.02"}
        assert "readings" in got and all(v == ENGINE_SETTINGS for v in got.values()), got
        client.command("ALTER TABLE sensorhub.readings MODIFY SETTING old_parts_lifetime = 0, "
                       "min_free_disk_ratio_to_perform_insert = 0")
        assert settings()["readings"] == {"old_parts_lifetime": "0", "min_free_disk_ratio_to_perform_insert": "0"}
        apply_schema(client, "sensorhub")
        assert all(v == ENGINE_SETTINGS for v in settings().values())
    finally:
        client.close()
        server.terminate(timeout=20)


def test_an_insert_is_refused_before_it_writes_when_under_two_percent_of_the_disk_is_free(tmp_path: Path) -> None:
    """On a near-full data disk every table refuses an INSERT (NOT_ENOUGH_SPACE, which the writer
    waits out) before it writes a part; once space returns the same INSERT lands."""
    import os
    import shutil
    import subprocess

    from kit.disk import fill, free_bytes

    from sensorhub.sinks.schema import apply_schema

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    data = tmp_path / "chdb" / "data"
    data.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(data)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    server = None
    try:
        server = start_chdb_server(tmp_path)
        client = clickhouse_connect.get_client(dsn=server.url)
        apply_schema(client, "sensorhub")
        insert = ("INSERT INTO sensorhub.readings (device, metric, ts, value, quality, seq, recv, source) "
                  "SELECT 'd', 'm', now64(6), number, 0, number, now64(6), 'mqtt' FROM numbers(1000)")
        client.command(insert, settings={"insert_deduplication_token": "a"})
        filler = data / "filler"
        fill(filler, leave_bytes=4 * 2**20)  # under 2 % of 256 MiB (5.1 MiB), room for the INSERT
        assert 0 < free_bytes(data) < 0.02 * 256 * 2**20
        parts = client.query("SELECT count() FROM system.parts WHERE database = 'sensorhub'").result_rows
        with pytest.raises(DatabaseError) as refused:
            client.command(insert, settings={"insert_deduplication_token": "b"})
        assert refused.value.code == 243, refused.value  # NOT_ENOUGH_SPACE
        assert client.query("SELECT count() FROM system.parts WHERE database = 'sensorhub'").result_rows == parts
        assert not list(data.glob("store/*/*/tmp_insert_*"))  # nothing was written
        filler.unlink()
        client.command(insert, settings={"insert_deduplication_token": "b"})
        assert int(client.command("SELECT count() FROM sensorhub.readings")) == 2000
        client.close()
    finally:
        if server is not None:
            server.terminate(timeout=20)
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_broken_single_block_part_is_reported_as_rows_lost(server_and_client: Any, tmp_path: Path) -> None:
    """A part that covers one block (one INSERT's) has no sources to restore: the server says so."""
    server, client = server_and_client
    client.command("INSERT INTO t SELECT number, number FROM numbers(100)")
    client.command("INSERT INTO t SELECT number, number FROM numbers(100, 10)")
    _empty_a_marks_file(tmp_path / "chdb" / "data", "all_2_2_0")
    assert client.query("SELECT count(), sum(v) FROM t").result_rows == [(100, 4950.0)]
    log = server.log_path.read_text()
    assert re.search(r"CRITICAL.*part default\.t/broken-on-start_all_2_2_0 \(broken-on-start, block 2, level 0\) "
                     r"was set aside and covers a single block", log), log[-2000:]


def _rollup_counts(client: Any) -> tuple[int, int, int]:
    return (
        int(client.command("SELECT count() FROM sensorhub.readings")),
        int(client.command("SELECT countMerge(readings) FROM sensorhub.readings_by_minute")),
        int(client.command("SELECT countMerge(readings) FROM sensorhub.readings_by_hour")),
    )


_ROLLUP_INSERT = ("INSERT INTO sensorhub.readings (device, metric, ts, value, quality, seq, recv, source) "
                  "SELECT 'd', 'm', toDateTime64('2026-12-01 00:00:00', 6) + number, number, 0, number, now64(6), "
                  "'mqtt' FROM numbers(1000)")


def _client_of(server: ManagedProcess) -> Any:
    """A client with the settings sensorhub's writer sends (deduplication in the rollups' views)."""
    from sensorhub.sinks.clickhouse import INSERT_SETTINGS

    return clickhouse_connect.get_client(dsn=server.url, settings=INSERT_SETTINGS)


def test_an_insert_whose_part_was_written_broken_is_refused_and_its_repeat_stores_it_once(tmp_path: Path) -> None:
    """A part an INSERT left broken (as when another program takes the disk's last bytes while it is
    written, benchmarks/disk_race.py) is found by the check of a low disk: set aside, the INSERT
    answered NOT_ENOUGH_SPACE, and its repeat under the same token stores the rows once in the table
    and in both rollups, the tables whose parts were sound dropping it as a duplicate. Once with the
    readings' part broken, once with a rollup's."""
    from sensorhub.sinks.schema import apply_schema

    # a disk below 1 TiB free is "low" here, so every INSERT's parts are checked
    server = start_chdb_server(tmp_path, extra=["--verify-inserts-below", str(1 << 40),
                                                "--fault-break-insert-parts", "readings,readings_by_minute"])
    client = _client_of(server)
    tables = ("readings", "readings_by_minute", "readings_by_hour")
    try:
        apply_schema(client, "sensorhub")
        for batch, table in enumerate(["readings", "readings_by_minute"]):
            insert = _ROLLUP_INSERT.replace("+ number", f"+ {batch * 1000} + number", 1)
            token = {"insert_deduplication_token": f"batch-{batch}"}
            with pytest.raises(DatabaseError) as refused:
                client.command(insert, settings=token)
            assert refused.value.code == 243, refused.value  # NOT_ENOUGH_SPACE: the writer waits it out
            assert f"part sensorhub.{table}/" in str(refused.value)
            before = batch * 1000
            assert _rollup_counts(client) == tuple(before + (0 if t == table else 1000) for t in tables)
            assert (table,) in client.query("SELECT table FROM system.detached_parts").result_rows
            client.command(insert, settings=token)
            assert _rollup_counts(client) == (before + 1000,) * 3
            client.command(insert, settings=token)  # and again: a duplicate everywhere
            assert _rollup_counts(client) == (before + 1000,) * 3
        assert int(client.command("SELECT sum(seq) FROM sensorhub.readings")) == 2 * 499500
        log = server.log_path.read_text()
        for table in ("readings", "readings_by_minute"):
            assert re.search(rf"ERROR .*part sensorhub\.{table}/\S+ of an INSERT was written broken", log), log[-2000:]
    finally:
        client.close()
        server.terminate(timeout=20)


def test_without_the_check_an_insert_left_broken_is_answered_stored_and_its_rows_are_lost(tmp_path: Path) -> None:
    """What the check prevents: with it off (0 bytes) the same broken INSERT is acknowledged,
    the first read sets its part aside, and nothing can bring its rows back."""
    from sensorhub.sinks.schema import apply_schema

    server = start_chdb_server(tmp_path, extra=["--verify-inserts-below", "0",
                                                "--fault-break-insert-parts", "readings"])
    client = _client_of(server)
    try:
        apply_schema(client, "sensorhub")
        client.command(_ROLLUP_INSERT, settings={"insert_deduplication_token": "batch-1"})  # answered stored
        assert int(client.command("SELECT sum(seq) FROM sensorhub.readings")) == 0  # the part is gone
        client.command(_ROLLUP_INSERT, settings={"insert_deduplication_token": "batch-1"})
        assert int(client.command("SELECT count() FROM sensorhub.readings")) == 0  # a repeat is a duplicate
        assert "covers a single block" in server.log_path.read_text()
    finally:
        client.close()
        server.terminate(timeout=20)
