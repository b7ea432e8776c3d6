"""Every INSERT the engine refuses reaches the client as ClickHouse sends it, and stores nothing.

Each insert path the server serves (the statement in the URL with the data
in the body, the whole ``INSERT ... FORMAT X`` in the body, data starting in
the URL, compressed bodies, clickhouse-connect's Native ``insert``) in each
input format is sent once with a setting under which the engine refuses it
(too many partitions for one block) and once without: the refused one must
come back with ClickHouse's status, ``X-ClickHouse-Exception-Code`` and
text and leave the table empty; the other one must store every row.
"""

from __future__ import annotations

import datetime as dt
import gzip
import http.client
import json
import os
import struct
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clickhouse_connect
import lz4.frame
import pytest
from backports import zstd
from clickhouse_connect.driver.exceptions import DatabaseError
from kit.disk import fill
from kit.services import ManagedProcess, start_chdb_server

from sensorhub.chdb_server.sql import has_infile, insert_from_file
from sensorhub.varint import uvarint

# Three rows in three months of a table partitioned by month.
DAYS = [dt.date(2024, 1, 15), dt.date(2024, 2, 15), dt.date(2024, 3, 15)]
ROWS = [(d, i + 1) for i, d in enumerate(DAYS)]
TOO_MANY_PARTITIONS = {"max_partitions_per_insert_block": "2"}


def raw(
    url: str, body: bytes | None, params: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 8123, timeout=60)
    try:
        conn.request("POST", "/?" + urllib.parse.urlencode(params), body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _epoch_days(d: dt.date) -> int:
    return (d - dt.date(1970, 1, 1)).days


def _native(rows: list[tuple[dt.date, int]]) -> bytes:
    """One Native block (d Date, v UInt32), written here from the format description."""
    def name(s: str) -> bytes:
        return uvarint(len(s)) + s.encode()

    n = len(rows)
    return b"".join([
        uvarint(2), uvarint(n),
        name("d"), name("Date"), struct.pack(f"<{n}H", *(_epoch_days(d) for d, _ in rows)),
        name("v"), name("UInt32"), struct.pack(f"<{n}I", *(v for _, v in rows)),
    ])


BODIES: dict[str, Callable[[list[tuple[dt.date, int]]], bytes]] = {
    "TSV": lambda rows: "".join(f"{d}\t{v}\n" for d, v in rows).encode(),
    "CSV": lambda rows: "".join(f'"{d}",{v}\n' for d, v in rows).encode(),
    "JSONEachRow": lambda rows: "".join(json.dumps({"d": str(d), "v": v}) + "\n" for d, v in rows).encode(),
    "RowBinary": lambda rows: b"".join(struct.pack("<HI", _epoch_days(d), v) for d, v in rows),
    "Native": _native,
    "Values": lambda rows: ", ".join(f"('{d}', {v})" for d, v in rows).encode(),
}

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "lz4": lz4.frame.compress,
    "zstd": zstd.compress,
}


@pytest.fixture
def table(ch_client: Any, ch_database: str) -> str:
    ch_client.command(
        f"CREATE TABLE {ch_database}.m (d Date, v UInt32) ENGINE = MergeTree "
        "PARTITION BY toYYYYMM(d) ORDER BY v SETTINGS non_replicated_deduplication_window = 100"
    )
    return f"{ch_database}.m"


def _count(ch: Any, table: str) -> int:
    return int(ch.command(f"SELECT count() FROM {table}"))


def _request(path: str, fmt: str, table: str, rows: list[tuple[dt.date, int]]) -> tuple[bytes, dict[str, str], dict[str, str]]:
    """Body, URL parameters and headers of one insert of ``rows`` by ``path``."""
    data = BODIES[fmt](rows)
    head = f"INSERT INTO {table} (d, v) FORMAT {fmt}" if fmt != "Values" else f"INSERT INTO {table} (d, v) VALUES"
    if path == "url":  # the statement in the URL, the data in the body
        return data, {"query": head}, {}
    if path == "body":  # the whole statement and the data in the body
        return head.encode() + b"\n" + data, {}, {}
    if path == "split":
        # the first row in the URL; ClickHouse adds a line break after the URL text, then reads the body
        cut = data.index(b"\n")
        return data[cut + 1 :], {"query": head + "\n" + data[:cut].decode()}, {}
    # "gzip-url": as "url", the body compressed; "zstd-body": as "body", compressed
    method, inner = path.split("-", 1)
    body, params, _ = _request(inner, fmt, table, rows)
    return COMPRESS[method](body), params, {"Content-Encoding": method}


PATHS = ["url", "body", "gzip-url", "lz4-url", "zstd-url", "zstd-body", "gzip-body"]


@pytest.mark.parametrize("fmt", list(BODIES))
@pytest.mark.parametrize("path", PATHS)
def test_a_refused_insert_answers_the_engine_error_and_stores_nothing(
    chdb_server: Any, ch_client: Any, table: str, path: str, fmt: str
) -> None:
    body, params, headers = _request(path, fmt, table, ROWS)
    status, got, text = raw(chdb_server.url, body, {**params, **TOO_MANY_PARTITIONS, "query_id": "q-refused"}, headers)
    assert status == 500, text
    assert got["x-clickhouse-exception-code"] == "252"
    assert got["x-clickhouse-query-id"] == "q-refused"
    assert text.startswith(b"Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 2)")
    assert b"(version " in text
    assert _count(ch_client, table) == 0
    # the same request with the engine's default limit stores every row
    status, got, text = raw(chdb_server.url, body, params, headers)
    assert status == 200, text
    assert json.loads(got["x-clickhouse-summary"])["written_rows"] == "3"
    assert ch_client.query(f"SELECT d, v FROM {table} ORDER BY v").result_rows == ROWS


@pytest.mark.parametrize("fmt", ["TSV", "CSV", "JSONEachRow"])
def test_data_starting_in_the_url_is_refused_whole(chdb_server: Any, ch_client: Any, table: str, fmt: str) -> None:
    body, params, headers = _request("split", fmt, table, ROWS)
    status, got, text = raw(chdb_server.url, body, {**params, **TOO_MANY_PARTITIONS}, headers)
    assert (status, got["x-clickhouse-exception-code"]) == (500, "252"), text
    assert _count(ch_client, table) == 0
    assert raw(chdb_server.url, body, params, headers)[0] == 200
    assert ch_client.query(f"SELECT d, v FROM {table} ORDER BY v").result_rows == ROWS


@pytest.mark.parametrize("compress", [None, "lz4", "zstd", "gzip"])
def test_clickhouse_connect_insert_raises_the_engine_error(
    chdb_server: Any, ch_client: Any, ch_database: str, table: str, compress: str | None
) -> None:
    client = clickhouse_connect.get_client(dsn=chdb_server.url, database=ch_database, compress=compress or False)
    try:
        with pytest.raises(DatabaseError) as refused:
            client.insert(table, [list(r) for r in ROWS], column_names=["d", "v"], settings=TOO_MANY_PARTITIONS)
        assert refused.value.code == 252
        assert "Too many partitions for single INSERT block" in str(refused.value)
        with pytest.raises(DatabaseError) as refused_raw:
            client.raw_insert(table, column_names=["d", "v"], insert_block=_native(ROWS), fmt="Native",
                              settings=TOO_MANY_PARTITIONS)
        assert refused_raw.value.code == 252
        assert _count(ch_client, table) == 0
        summary = client.insert(table, [list(r) for r in ROWS], column_names=["d", "v"])
        assert summary.written_rows == 3
        assert ch_client.query(f"SELECT d, v FROM {table} ORDER BY v").result_rows == ROWS
    finally:
        client.close()


@pytest.mark.parametrize(
    ("fmt", "bad", "code"),
    [
        ("TSV", b"2024-01-15\tnot-a-number\n", 27),  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        ("CSV", b'"2024-01-15",12x\n', 117),  # INCORRECT_DATA
        ("JSONEachRow", b'{"d": "2024-01-15", "v": "many"}\n', 27),
        ("RowBinary", b"\x01\x02\x03", 33),  # CANNOT_READ_ALL_DATA: a truncated row
        ("Native", _native(ROWS)[:-3], 33),
    ],
)
def test_a_body_that_does_not_parse_is_refused_whole(
    chdb_server: Any, ch_client: Any, table: str, fmt: str, bad: bytes, code: int
) -> None:
    good = BODIES[fmt](ROWS[:2]) if fmt not in ("Native", "RowBinary") else b""
    status, got, text = raw(chdb_server.url, good + bad, {"query": f"INSERT INTO {table} (d, v) FORMAT {fmt}"})
    assert status in (400, 500), text
    assert got["x-clickhouse-exception-code"] == str(code), text
    assert text.startswith(f"Code: {code}. DB::Exception:".encode())
    # said once, as a server says it: one code, one version trailer at the end
    assert text.count(b"DB::Exception") == 1 and text.count(b"(version ") == 1, text
    assert text.rstrip().endswith(b")") and b"(version " in text.splitlines()[-1]
    assert _count(ch_client, table) == 0  # the good rows before the bad one were not stored either


def test_a_violated_constraint_and_a_missing_table_are_refused(chdb_server: Any, ch_client: Any, table: str) -> None:
    ch_client.command(f"ALTER TABLE {table} ADD CONSTRAINT small CHECK v < 3")
    status, got, text = raw(chdb_server.url, BODIES["TSV"](ROWS), {"query": f"INSERT INTO {table} FORMAT TSV"})
    assert (status, got["x-clickhouse-exception-code"]) == (500, "469"), text
    assert b"Constraint `small`" in text and b"(VIOLATED_CONSTRAINT)" in text
    assert _count(ch_client, table) == 0
    with pytest.raises(DatabaseError) as refused:
        ch_client.insert(table, [list(r) for r in ROWS], column_names=["d", "v"])
    assert refused.value.code == 469
    assert _count(ch_client, table) == 0
    ch_client.insert(table, [list(r) for r in ROWS[:2]], column_names=["d", "v"])
    assert _count(ch_client, table) == 2

    missing = table + "_nowhere"
    status, got, text = raw(chdb_server.url, BODIES["TSV"](ROWS), {"query": f"INSERT INTO {missing} FORMAT TSV"})
    assert (status, got["x-clickhouse-exception-code"]) == (404, "60"), text
    assert b"(UNKNOWN_TABLE)" in text
    with pytest.raises(DatabaseError) as unknown:
        ch_client.insert(missing, [list(r) for r in ROWS], column_names=["d", "v"])
    assert unknown.value.code == 60


def test_settings_and_column_lists_reach_the_insert(chdb_server: Any, ch_client: Any, table: str) -> None:
    token = uuid.uuid4().hex
    # a SETTINGS clause of the statement itself and a column list in another order
    stmt = f"INSERT INTO {table} (v, d) SETTINGS insert_deduplication_token = '{token}' FORMAT TSV\n"
    body = stmt.encode() + b"".join(f"{v}\t{d}\n".encode() for d, v in ROWS)
    for _ in range(2):
        status, got, text = raw(chdb_server.url, body, {})
        assert status == 200, text
    assert ch_client.query(f"SELECT d, v FROM {table} ORDER BY v").result_rows == ROWS  # stored once
    # the token as a URL setting: a repeat is dropped, another token is not
    params = {"query": f"INSERT INTO {table} FORMAT RowBinary", "insert_deduplication_token": "u-" + token}
    again = [(dt.date(2024, 1, 16), 10)]
    for _ in range(2):
        assert raw(chdb_server.url, BODIES["RowBinary"](again), params)[0] == 200
    assert _count(ch_client, table) == 4
    params["insert_deduplication_token"] = "w-" + token
    assert raw(chdb_server.url, BODIES["RowBinary"](again), params)[0] == 200
    assert _count(ch_client, table) == 5
    # the insert's own settings apply to it: here one that makes the engine refuse it
    stmt = f"INSERT INTO {table} SETTINGS max_partitions_per_insert_block = 1 FORMAT TSV\n"
    status, got, _ = raw(chdb_server.url, stmt.encode() + BODIES["TSV"](ROWS), {})
    assert (status, got["x-clickhouse-exception-code"]) == (500, "252")
    assert _count(ch_client, table) == 5


def test_from_infile_is_refused_as_on_a_server(chdb_server: Any, ch_client: Any, ch_database: str) -> None:
    ch_client.command(f"CREATE TABLE {ch_database}.lines (s String) ENGINE = MergeTree ORDER BY s")
    for body, params in [
        (b"", {"query": f"INSERT INTO {ch_database}.lines FROM INFILE '/etc/hostname' FORMAT LineAsString"}),
        (f"INSERT INTO {ch_database}.lines FROM INFILE '/etc/hostname' FORMAT LineAsString\n".encode(), {}),
        (f"INSERT INTO {ch_database}.lines FROM INFILE '/etc/hostname'".encode(), {}),
    ]:
        status, got, text = raw(chdb_server.url, body, params)
        assert (status, got["x-clickhouse-exception-code"]) == (404, "78"), text
        assert b"Query has infile and was send directly to server" in text
    assert int(ch_client.command(f"SELECT count() FROM {ch_database}.lines")) == 0
    # a table that happens to be called infile is no INFILE clause
    ch_client.command(f"CREATE TABLE {ch_database}.infile (s String) ENGINE = MergeTree ORDER BY s")
    ch_client.command(f"INSERT INTO {ch_database}.infile VALUES ('x')")
    status, _, text = raw(chdb_server.url, f"INSERT INTO {ch_database}.lines SELECT s FROM {ch_database}.infile".encode(), {})
    assert status == 200, text
    assert int(ch_client.command(f"SELECT count() FROM {ch_database}.lines")) == 1


def test_insert_from_file_and_has_infile() -> None:
    assert insert_from_file("INSERT INTO db.t (a, `settings`)", "/p/x", "Native") == (
        "INSERT INTO db.t (a, `settings`) FROM INFILE '/p/x' COMPRESSION 'none' FORMAT Native"
    )
    assert insert_from_file("INSERT INTO t SETTINGS a = 'SETTINGS', b = 2", "/p/it's", "TSV") == (
        "INSERT INTO t FROM INFILE '/p/it\\'s' COMPRESSION 'none' SETTINGS a = 'SETTINGS', b = 2 FORMAT TSV"
    )
    assert insert_from_file("insert into settings", "/x", "CSV") == (
        "insert into settings FROM INFILE '/x' COMPRESSION 'none' FORMAT CSV"
    )
    assert insert_from_file("INSERT INTO db.settings (s) settings x=1", "/x", "My Format") == (
        "INSERT INTO db.settings (s) FROM INFILE '/x' COMPRESSION 'none' settings x=1 FORMAT `My Format`"
    )
    assert has_infile("INSERT INTO t FROM INFILE 'f' FORMAT CSV")
    assert has_infile("insert into t (a) from infile 'f.gz' compression 'gzip'")
    assert not has_infile("INSERT INTO t SELECT * FROM infile")
    assert not has_infile("INSERT INTO infile FORMAT CSV")
    assert not has_infile("SELECT * FROM infile")


# ---------------------------------------------------------------- private servers


def _server(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> ManagedProcess:
    return start_chdb_server(run_dir, extra=extra, env=env)




def test_a_full_data_disk_answers_not_enough_space_and_stores_nothing(small_disk: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    server = _server(small_disk, "--insert-spool-dir", str(spool))
    client = clickhouse_connect.get_client(dsn=server.url)
    try:
        client.command("CREATE TABLE t (a UInt64, s String) ENGINE = MergeTree ORDER BY a")
        filler = small_disk / "filler"
        fill(filler)
        rows = [[i, f"row {i}"] for i in range(1000)]
        with pytest.raises(DatabaseError) as full:
            client.insert("t", rows, column_names=["a", "s"])
        assert full.value.code == 243  # NOT_ENOUGH_SPACE
        status, got, text = raw(server.url, b"1\tx\n", {"query": "INSERT INTO t FORMAT TSV"})
        assert (status, got["x-clickhouse-exception-code"]) == (500, "243"), text
        assert b"(NOT_ENOUGH_SPACE)" in text
        assert int(client.command("SELECT count() FROM t")) == 0
        assert os.listdir(spool) == []  # the spooled data is gone after each insert
        filler.unlink()
        client.insert("t", rows, column_names=["a", "s"])
        assert int(client.command("SELECT count() FROM t")) == 1000
        assert os.listdir(spool) == []
    finally:
        client.close()
        server.terminate(timeout=20)


def test_a_full_spool_directory_answers_not_enough_space(small_disk: Path, tmp_path: Path) -> None:
    server = _server(tmp_path, "--insert-spool-dir", str(small_disk))
    client = clickhouse_connect.get_client(dsn=server.url)
    try:
        client.command("CREATE TABLE t (a UInt64) ENGINE = MergeTree ORDER BY a")
        fill(small_disk / "filler")
        status, got, text = raw(server.url, b"1\n2\n", {"query": "INSERT INTO t FORMAT TSV"})
        assert (status, got["x-clickhouse-exception-code"]) == (500, "243"), text
        assert b"Cannot spool the data of an INSERT" in text
        assert int(client.command("SELECT count() FROM t")) == 0
        (small_disk / "filler").unlink()
        assert raw(server.url, b"1\n2\n", {"query": "INSERT INTO t FORMAT TSV"})[0] == 200
        assert int(client.command("SELECT count() FROM t")) == 2
    finally:
        client.close()
        server.terminate(timeout=20)


def test_a_spool_directory_that_is_not_there_is_a_configuration_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sensorhub", "chdb-server", "--port", "0", "--data", str(tmp_path / "d"),
         "--insert-spool-dir", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "chdb-server.insert_spool_dir" in out.stderr and "an existing writable directory" in out.stderr
