"""``sensorhub chdb-server`` against the real client: clickhouse-connect, unmodified, over loopback HTTP.

The server runs as its own process (the ``chdb_server`` / ``spawn`` fixtures
of conftest.py). Raw ``http.client`` requests check what clickhouse-connect
does not show: status codes, headers, chunked and compressed bodies.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import lz4.frame
import pytest
from backports import zstd
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from kit.services import ManagedProcess, start_chdb_server

from sensorhub.chdb_server.codecs import compress_body, make_decoder
from sensorhub.chdb_server.errors import CODES, ClickHouseError
from sensorhub.chdb_server.params import split_params
from sensorhub.chdb_server.sql import (
    output_format,
    parse_insert_head,
    parse_set,
    parse_use,
    statement_count,
)

# ---------------------------------------------------------------- helpers


def raw(
    server: Any,
    body: bytes | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    path: str = "/",
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request; returns status, headers (lower-case names) and the raw body."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).hostname or "127.0.0.1", server.port, timeout=30)
    try:
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        conn.request(method or ("POST" if body is not None else "GET"), url, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


READINGS_DDL = """
CREATE TABLE {db}.readings (
    ts DateTime64(6, 'UTC'),
    device LowCardinality(String),
    kind Enum8('temp' = 1, 'rpm' = 2, 'flow' = 3),
    value Nullable(Float64),
    note String,
    seq UInt64
) ENGINE = MergeTree ORDER BY (device, ts, seq)
SETTINGS non_replicated_deduplication_window = 100
"""
COLUMNS = ["ts", "device", "kind", "value", "note", "seq"]
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def make_rows(n: int, start: int = 0) -> list[list[Any]]:
    kinds = ("temp", "rpm", "flow")
    return [
        [
            T0 + dt.timedelta(microseconds=7 * i + 1),
            f"dev-{i % 97}",
            kinds[i % 3],
            None if i % 11 == 0 else i * 0.125 - 3.5,
            f"note {i} ü",
            i,
        ]
        for i in range(start, start + n)
    ]


@pytest.fixture
def readings(ch_client: Any, ch_database: str) -> str:
    ch_client.command(READINGS_DDL.format(db=ch_database))
    return f"{ch_database}.readings"


# ---------------------------------------------------------------- clickhouse-connect


def test_get_client_sees_a_clickhouse_server(chdb_server: Any) -> None:
    client = clickhouse_connect.get_client(dsn=chdb_server.url)
    try:
        assert client.ping()
        version = client.command("SELECT version()")
        assert client.server_version == version
        assert client.server_version.split(".")[0].isdigit()
        assert client.command("SELECT timezone()") == "UTC"
        # settings discovered from system.settings; the client then sends them as URL parameters
        assert "max_threads" in client.server_settings
        assert client.get_client_setting("date_time_input_format") == "best_effort"
    finally:
        client.close()


def test_command_and_query_with_summary(ch_client: Any, ch_database: str) -> None:
    assert ch_client.command("SELECT 1 + 1") == 2
    assert ch_client.command("SELECT 'a', 'b'") == ["a", "b"]
    ch_client.command(f"CREATE TABLE {ch_database}.n (x UInt32) ENGINE = MergeTree ORDER BY x")
    ch_client.command(f"INSERT INTO {ch_database}.n SELECT number FROM numbers(1000)")
    result = ch_client.query("SELECT x, x * 2 AS y FROM n WHERE x < 5 ORDER BY x")
    assert result.column_names == ("x", "y")
    assert result.result_rows == [(i, 2 * i) for i in range(5)]
    assert result.summary["result_rows"] == "5"
    assert int(result.summary["read_rows"]) >= 5
    # query parameters are bound by the server ({name:Type} placeholders)
    bound = ch_client.query("SELECT {a:UInt32} + {b:UInt32} AS s", parameters={"a": 40, "b": 2})
    assert bound.result_rows == [(42,)]


def test_insert_100k_rows_round_trip_every_type(ch_client: Any, readings: str) -> None:
    rows = make_rows(100_000)
    summary = ch_client.insert(readings, rows, column_names=COLUMNS)
    assert summary.written_rows == 100_000
    got = ch_client.query(f"SELECT * FROM {readings} ORDER BY seq").result_rows
    assert len(got) == 100_000
    # DateTime64 values come back as naive UTC (the client's default)
    expected = [
        (r[0].replace(tzinfo=None), r[1], r[2], r[3], r[4], r[5]) for r in rows
    ]
    assert got == expected
    assert ch_client.command(f"SELECT countIf(value IS NULL) FROM {readings}") == sum(
        1 for r in rows if r[3] is None
    )
    assert ch_client.command(f"SELECT toTypeName(device) FROM {readings} LIMIT 1") == "LowCardinality(String)"


def test_query_df_and_query_arrow(ch_client: Any, readings: str) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is not installed")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    ch_client.insert(readings, make_rows(500), column_names=COLUMNS)
    df = ch_client.query_df(f"SELECT seq, device, value FROM {readings} ORDER BY seq")
    assert isinstance(df, pd.DataFrame)
    assert list(df["seq"]) == list(range(500))
    assert df["value"].isna().sum() == sum(1 for i in range(500) if i % 11 == 0)
    table = ch_client.query_arrow(f"SELECT seq, device FROM {readings} ORDER BY seq LIMIT 3")
    assert table.column("seq").to_pylist() == [0, 1, 2]
    assert table.column("device").to_pylist() == ["dev-0", "dev-1", "dev-2"]


def test_bad_query_raises_database_error_with_server_message(ch_client: Any) -> None:
    with pytest.raises(DatabaseError) as syntax:
        ch_client.query("SELEC 1")
    assert "Code: 62. DB::Exception: Syntax error" in str(syntax.value)
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError) as unknown:
        ch_client.command("SELECT * FROM no_such_table_here")
    assert unknown.value.code == 60
    assert "UNKNOWN_TABLE" in str(unknown.value)


def test_insert_deduplication_token_makes_a_repeat_a_no_op(ch_client: Any, readings: str) -> None:
    rows = make_rows(1000)
    token = {"insert_deduplication_token": f"batch-{uuid.uuid4().hex}"}
    ch_client.insert(readings, rows, column_names=COLUMNS, settings=token)
    ch_client.insert(readings, rows, column_names=COLUMNS, settings=token)
    assert ch_client.command(f"SELECT count() FROM {readings}") == 1000
    # the token is not left behind for the next insert
    ch_client.insert(readings, rows, column_names=COLUMNS)
    assert ch_client.command(f"SELECT count() FROM {readings}") == 2000
    ch_client.insert(readings, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "other"})
    assert ch_client.command(f"SELECT count() FROM {readings}") == 3000


@pytest.mark.parametrize("method", ["lz4", "zstd", "gzip"])
def test_compressed_inserts_and_results_round_trip(
    chdb_server: Any, ch_client: Any, ch_database: str, readings: str, method: str
) -> None:
    client = clickhouse_connect.get_client(dsn=chdb_server.url, database=ch_database, compress=method)
    try:
        rows = make_rows(20_000)
        client.insert(readings, rows, column_names=COLUMNS)
        got = client.query(f"SELECT seq, note FROM {readings} ORDER BY seq").result_rows
        assert got == [(r[5], r[4]) for r in rows]
    finally:
        client.close()
    status, headers, body = raw(
        chdb_server,
        b"SELECT number FROM numbers(1000) FORMAT TSV",
        params={"enable_http_compression": "1"},
        headers={"Accept-Encoding": method},
    )
    assert status == 200
    assert headers["content-encoding"] == method
    plain = {"lz4": lz4.frame.decompress, "zstd": zstd.decompress, "gzip": gzip.decompress}[method](body)
    assert plain == "".join(f"{i}\n" for i in range(1000)).encode()


def test_settings_apply_to_their_request_only(ch_client: Any) -> None:
    default = ch_client.command("SELECT getSetting('max_block_size')")
    assert ch_client.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 1234}) == 1234
    assert ch_client.command("SELECT getSetting('max_block_size')") == default
    with pytest.raises(DatabaseError) as unknown:
        ch_client.command("SELECT 1", settings={"no_such_setting_anywhere": 1})
    assert unknown.value.code == 115
    assert ch_client.command("SELECT 2") == 2  # a failed SET leaves the engine usable


def test_concurrent_clients_keep_their_own_settings(chdb_server: Any, readings: str) -> None:
    errors: list[str] = []

    def worker(k: int) -> None:
        client = clickhouse_connect.get_client(dsn=chdb_server.url)
        try:
            for i in range(15):
                mine = 1000 + 100 * k + i
                got = client.command("SELECT getSetting('max_block_size')", settings={"max_block_size": mine})
                if got != mine:
                    errors.append(f"client {k}: max_block_size {got}, expected {mine}")
                token = {"insert_deduplication_token": f"w{k}-{i % 5}"}  # each batch sent three times
                client.insert(readings, make_rows(10, start=1000 * k + i % 5), column_names=COLUMNS, settings=token)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,), name=f"client-{k}") for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert not any(t.is_alive() for t in threads)
    check = clickhouse_connect.get_client(dsn=chdb_server.url)
    try:
        # 4 clients x 5 distinct batches x 10 rows: the repeats were deduplicated
        assert check.command(f"SELECT count() FROM {readings}") == 200
    finally:
        check.close()


# ---------------------------------------------------------------- raw HTTP


def test_ping_root_and_unknown_path(chdb_server: Any) -> None:
    assert raw(chdb_server, path="/ping")[::2] == (200, b"Ok.\n")
    assert raw(chdb_server, path="/")[::2] == (200, b"Ok.\n")
    status, _, body = raw(chdb_server, path="/nope")
    assert status == 404 and b"There is no handle /nope" in body


@pytest.mark.parametrize(
    ("sql", "status", "code"),
    [
        ("SELEC 1", 400, 62),
        ("SELECT * FROM no_such_table_x", 404, 60),
        ("SELECT * FROM no_such_db.t", 404, 81),
        ("SELECT throwIf(1)", 500, 395),
        ("SELECT 1; SELECT 2", 400, 62),
    ],
)
def test_errors_carry_clickhouse_status_code_and_text(chdb_server: Any, sql: str, status: int, code: int) -> None:
    got_status, headers, body = raw(chdb_server, sql.encode(), params={"query_id": "q-err"})
    assert got_status == status
    assert headers["x-clickhouse-exception-code"] == str(code)
    assert headers["x-clickhouse-query-id"] == "q-err"
    assert body.startswith(f"Code: {code}. DB::Exception:".encode())
    assert b"(version " in body


def test_headers_of_a_result(chdb_server: Any) -> None:
    status, headers, body = raw(
        chdb_server, b"SELECT number FROM numbers(10) FORMAT JSONEachRow", params={"query_id": "q-1"}
    )
    assert status == 200
    assert headers["x-clickhouse-query-id"] == "q-1"
    assert headers["x-clickhouse-format"] == "JSONEachRow"
    assert headers["x-clickhouse-timezone"] == "UTC"
    assert headers["x-clickhouse-server-display-name"]
    summary = json.loads(headers["x-clickhouse-summary"])
    expected_keys = {"read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read",
                     "result_rows", "result_bytes", "elapsed_ns"}
    assert expected_keys <= set(summary)
    assert all(isinstance(v, str) and v.isdigit() for v in summary.values())
    assert summary["result_rows"] == "10"
    assert [json.loads(line)["number"] for line in body.splitlines()] == list(range(10))
    # default_format applies when the statement names none
    _, headers, body = raw(chdb_server, b"SELECT 1 AS x", params={"default_format": "CSVWithNames"})
    assert headers["x-clickhouse-format"] == "CSVWithNames"
    assert body == b'"x"\n1\n'


def test_formats_pass_through_both_ways(chdb_server: Any, ch_client: Any, ch_database: str) -> None:
    ch_client.command(f"CREATE TABLE {ch_database}.f (a UInt32, b String) ENGINE = MergeTree ORDER BY a")
    db = {"database": ch_database}
    assert raw(chdb_server, b"INSERT INTO f FORMAT TabSeparated\n1\tone\n2\ttwo\n", params=db)[0] == 200
    assert raw(chdb_server, b'{"a":3,"b":"three"}\n', params={**db, "query": "INSERT INTO f FORMAT JSONEachRow"})[0] == 200
    assert raw(chdb_server, b"4,\"four\"\n", params={**db, "query": "INSERT INTO f FORMAT CSV"})[0] == 200
    assert raw(chdb_server, b"INSERT INTO f VALUES (5, 'five'), (6, 'six')", params=db)[0] == 200
    # RowBinary: UInt32 little-endian, then a varint-prefixed string
    assert raw(chdb_server, b"\x07\x00\x00\x00\x05seven", params={**db, "query": "INSERT INTO f FORMAT RowBinary"})[0] == 200
    status, _, body = raw(chdb_server, b"SELECT a, b FROM f ORDER BY a FORMAT CSV", params=db)
    assert status == 200
    assert body.decode().splitlines() == [
        '1,"one"', '2,"two"', '3,"three"', '4,"four"', '5,"five"', '6,"six"', '7,"seven"'
    ]
    status, _, body = raw(chdb_server, b"SELECT count() AS n FROM f FORMAT JSON", params=db)
    assert json.loads(body)["data"] == [{"n": 7}]


def test_chunked_compressed_insert_with_query_in_url(chdb_server: Any, ch_client: Any, ch_database: str) -> None:
    ch_client.command(f"CREATE TABLE {ch_database}.c (a UInt64) ENGINE = MergeTree ORDER BY a")
    payload = "".join(f"{i}\n" for i in range(50_000)).encode()
    packed = gzip.compress(payload[:100_000]) + gzip.compress(payload[100_000:])  # two gzip members

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(packed), 7_001):
            yield packed[i : i + 7_001]

    conn = http.client.HTTPConnection("127.0.0.1", chdb_server.port, timeout=30)
    try:
        q = urllib.parse.urlencode({"query": f"INSERT INTO {ch_database}.c FORMAT TSV"})
        conn.request("POST", "/?" + q, body=chunks(), headers={"Content-Encoding": "gzip"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert json.loads(resp.getheader("X-ClickHouse-Summary") or "{}")["written_rows"] == "50000"
        resp.read()
    finally:
        conn.close()
    assert ch_client.command(f"SELECT count(), sum(a) FROM {ch_database}.c") == [
        "50000", str(sum(range(50_000)))
    ]


def test_sessions_keep_set_and_use(chdb_server: Any, ch_database: str, ch_client: Any) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert raw(chdb_server, b"SET max_block_size = 777", params={"session_id": a})[0] == 200
    assert raw(chdb_server, f"USE {ch_database}".encode(), params={"session_id": a})[0] == 200
    _, _, body = raw(chdb_server, b"SELECT getSetting('max_block_size'), currentDatabase()", params={"session_id": a})
    assert body == f"777\t{ch_database}\n".encode()
    _, _, body = raw(chdb_server, b"SELECT getSetting('max_block_size') = 777, currentDatabase()", params={"session_id": b})
    assert body == b"0\tdefault\n"
    status, headers, _ = raw(chdb_server, b"SELECT 1", params={"session_id": "gone", "session_check": "1"})
    assert (status, headers["x-clickhouse-exception-code"]) == (404, "372")
    status, headers, _ = raw(chdb_server, b"USE no_such_db_here", params={"session_id": a})
    assert (status, headers["x-clickhouse-exception-code"]) == (404, "81")


def test_readonly_requests_cannot_write(chdb_server: Any, ch_client: Any, ch_database: str) -> None:
    ch_client.command(f"CREATE TABLE {ch_database}.r (a UInt8) ENGINE = MergeTree ORDER BY a")
    status, headers, _ = raw(chdb_server, f"INSERT INTO {ch_database}.r VALUES (1)".encode(), params={"readonly": "1"})
    assert (status, headers["x-clickhouse-exception-code"]) == (403, "164")
    # GET requests only read, as on ClickHouse
    status, _, _ = raw(chdb_server, params={"query": f"INSERT INTO {ch_database}.r SELECT 1"}, method="GET")
    assert status == 403
    assert raw(chdb_server, params={"query": "SELECT 1"}, method="GET")[2] == b"1\n"
    assert ch_client.command(f"SELECT count() FROM {ch_database}.r") == 0


def test_error_codes_match_the_engine(chdb_server: Any) -> None:
    codes = ",".join(str(c) for c in CODES.values())
    _, _, body = raw(chdb_server, f"SELECT n, errorCodeToName(n) FROM (SELECT arrayJoin([{codes}]) AS n)".encode())
    engine_names = {int(n): name for n, name in (line.split("\t") for line in body.decode().splitlines())}
    assert {name: code for code, name in engine_names.items()} == CODES


def test_ping_answers_while_a_long_insert_runs(chdb_server: Any, ch_client: Any, ch_database: str) -> None:
    ch_client.command(f"CREATE TABLE {ch_database}.slow (a UInt64) ENGINE = MergeTree ORDER BY a")
    done = threading.Event()
    outcome: list[Any] = []

    def slow_insert() -> None:
        client = clickhouse_connect.get_client(dsn=chdb_server.url)
        try:
            # 10 rows, 0.25 s each: the engine is busy for about 2.5 s
            client.command(
                f"INSERT INTO {ch_database}.slow SELECT number FROM numbers(10) WHERE sleepEachRow(0.25) = 0",
                settings={"max_block_size": 10},
            )
            outcome.append("ok")
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)
        finally:
            client.close()
            done.set()

    t = threading.Thread(target=slow_insert, name="slow-insert")
    started = time.monotonic()
    t.start()
    time.sleep(0.5)
    pings = 0
    while not done.is_set() and pings < 10:
        t0 = time.monotonic()
        status, _, body = raw(chdb_server, path="/ping")
        assert (status, body) == (200, b"Ok.\n")
        assert time.monotonic() - t0 < 0.5
        pings += 1
        time.sleep(0.1)
    t.join(30)
    assert pings >= 3, "the insert finished before /ping could be checked"
    assert outcome == ["ok"]
    assert time.monotonic() - started >= 2.0
    assert ch_client.command(f"SELECT count() FROM {ch_database}.slow") == 10


# ---------------------------------------------------------------- private servers


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A server with a password (from a file: never on the command line) and a 64 KiB body limit."""
    run_dir = tmp_path_factory.mktemp("guarded")
    password_file = run_dir / "password"
    password_file.write_text("s3cret\n")
    password_file.chmod(0o600)
    p = start_chdb_server(run_dir, extra=("--password-file", str(password_file), "--max-body-bytes", "65536"))
    yield p
    assert p.terminate() == 0


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_wrong_password_fails_and_right_one_works(guarded_server: Any) -> None:
    with pytest.raises((DatabaseError, OperationalError)) as denied:
        clickhouse_connect.get_client(dsn=guarded_server.url, password="wrong")
    assert "516" in str(denied.value) and "Authentication failed" in str(denied.value)
    client = clickhouse_connect.get_client(dsn=guarded_server.url, password="s3cret")
    try:
        assert client.command("SELECT 7") == 7
    finally:
        client.close()
    status, headers, body = raw(guarded_server, b"SELECT 1", headers=_basic("default", "nope"))
    assert (status, headers["x-clickhouse-exception-code"]) == (401, "516")
    assert body.startswith(b"Code: 516. DB::Exception: default: Authentication failed")
    assert raw(guarded_server, b"SELECT 1")[0] == 401
    assert raw(guarded_server, b"SELECT 1", headers=_basic("other", "s3cret"))[0] == 401
    ok_headers = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "s3cret"}
    assert raw(guarded_server, b"SELECT 1", headers=ok_headers)[::2] == (200, b"1\n")
    assert raw(guarded_server, b"SELECT 2", params={"user": "default", "password": "s3cret"})[::2] == (200, b"2\n")
    assert raw(guarded_server, path="/ping")[::2] == (200, b"Ok.\n")  # health checks need no password


def test_body_limit_answers_413(guarded_server: Any) -> None:
    auth = _basic("default", "s3cret")
    big = b"SELECT '" + b"x" * 70_000 + b"'"
    status, headers, body = raw(guarded_server, big, headers=auth)
    assert (status, headers["x-clickhouse-exception-code"]) == (413, "229")
    assert b"max_body_bytes" in body
    # a small body that decompresses past the limit is refused as well
    bomb = gzip.compress(b"SELECT '" + b"0" * 1_000_000 + b"'")
    assert len(bomb) < 65536
    status, _, body = raw(guarded_server, bomb, headers={**auth, "Content-Encoding": "gzip"})
    assert status == 413 and b"max_body_bytes" in body
    # and the server goes on serving
    assert raw(guarded_server, b"SELECT 3", headers=auth)[::2] == (200, b"3\n")


def test_data_survives_sigstop_sigterm_and_kill_9(spawn: Any) -> None:
    server = spawn.chdb()
    client = clickhouse_connect.get_client(dsn=server.url)
    client.command("CREATE DATABASE p")
    client.command(READINGS_DDL.format(db="p"))
    client.insert("p.readings", make_rows(10_000), column_names=COLUMNS)
    server.stop()  # SIGSTOP: connections are accepted by the kernel, nothing answers
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/ping", timeout=0.5)
    server.cont()
    assert client.command("SELECT count() FROM p.readings") == 10_000
    client.close()
    assert server.terminate() == 0  # SIGTERM: a clean exit
    server.start()
    client = clickhouse_connect.get_client(dsn=server.url)
    assert client.command("SELECT count() FROM p.readings") == 10_000
    client.insert("p.readings", make_rows(5_000, start=10_000), column_names=COLUMNS)
    client.close()
    server.kill()  # kill -9 right after the insert was acknowledged
    server.start()
    client = clickhouse_connect.get_client(dsn=server.url)
    try:
        assert client.command("SELECT count(), max(seq) FROM p.readings") == ["15000", "14999"]
    finally:
        client.close()


# ---------------------------------------------------------------- protocol, without a server


def test_parse_insert_head_finds_where_data_starts() -> None:
    text = "INSERT INTO db.t (a, `format`) SETTINGS x = 'FORMAT y' FORMAT Native\n\x00\x01FORMAT"
    head = parse_insert_head(text)
    assert head is not None
    assert head.statement == "INSERT INTO db.t (a, `format`) SETTINGS x = 'FORMAT y'"
    assert head.fmt == "Native"
    assert text[head.data_offset :] == "\x00\x01FORMAT"
    head = parse_insert_head("insert into format format TSV \r\n\n1\n")
    assert head is not None and (head.statement, head.fmt) == ("insert into format", "TSV")
    assert "insert into format format TSV \r\n\n1\n"[head.data_offset :] == "\n1\n"  # one line break only
    values = parse_insert_head("INSERT INTO t VALUES (1), (2)")
    assert values is not None and values.fmt == "Values" and values.statement == "INSERT INTO t"
    assert parse_insert_head("INSERT INTO t SELECT * FROM s FORMAT TSV") is None
    assert parse_insert_head("SELECT 1 FORMAT TSV") is None
    assert parse_insert_head("INSERT INTO t FORMAT") is None


def test_output_format_and_statements() -> None:
    assert output_format("SELECT 1 FORMAT JSON", "TSV") == "JSON"
    assert output_format("SELECT format FROM t", "TSV") == "TSV"
    assert output_format("SELECT 1 FORMAT Native SETTINGS a = 1;", "TSV") == "Native"
    assert output_format("SELECT 'FORMAT JSON'", "TSV") == "TSV"
    assert output_format("SELECT 1 -- FORMAT JSON", "TSV") == "TSV"
    assert output_format("SELECT x AS format FORMAT `CSV`", "TSV") == "CSV"
    assert output_format("SELECT (SELECT 1 FORMAT JSON)", "TSV") == "TSV"
    assert statement_count("SELECT ';'; ") == 1
    assert statement_count("SELECT 1; SELECT 2") == 2
    assert parse_set("SET a = 1, b = 'x,y', c = [1, 2];") == {"a": "1", "b": "'x,y'", "c": "[1, 2]"}
    assert parse_set("SET ROLE admin") is None
    assert parse_set("SELECT 1") is None
    with pytest.raises(ClickHouseError):
        parse_set("SET = 1")
    assert parse_use("USE `my db`") == "my db"
    assert parse_use("USE db; ") == "db"
    assert parse_use("USE a b") is None


def test_split_params_sorts_transport_settings_and_parameters() -> None:
    rp = split_params(
        [
            ("query", "SELECT 1"), ("database", "d"), ("session_id", "s"), ("wait_end_of_query", "1"),
            ("enable_http_compression", "1"), ("send_progress_in_http_headers", "1"),
            ("insert_deduplication_token", "it's"), ("param_x", "5"), ("client_protocol_version", "54405"),
        ]
    )
    assert (rp.query, rp.database, rp.session_id, rp.compress_response) == ("SELECT 1", "d", "s", True)
    assert rp.settings == {"insert_deduplication_token": "'it\\'s'"}
    assert rp.query_params == {"x": "5"}
    with pytest.raises(ClickHouseError) as bad:
        split_params([("max threads", "1")])
    assert bad.value.code == 115 and bad.value.http_status == 404


@pytest.mark.parametrize("encoding", ["lz4", "zstd", "gzip", "deflate"])
def test_decoders_join_frames_and_bound_output(encoding: str) -> None:
    pack = {
        "lz4": lz4.frame.compress, "zstd": zstd.compress, "gzip": gzip.compress, "deflate": zlib.compress,
    }[encoding]
    parts = [b"a" * 1000, b"b" * 5000, b""]
    stream = b"".join(pack(p) for p in parts) if encoding != "deflate" else pack(b"".join(parts))
    decoder = make_decoder(encoding)
    assert decoder is not None
    out = b"".join(decoder.feed(stream[i : i + 13], 1 << 20) for i in range(0, len(stream), 13))
    decoder.finish()
    assert out == b"".join(parts)
    with pytest.raises(ClickHouseError) as too_big:
        make_decoder(encoding).feed(stream, 100)  # type: ignore[union-attr]
    assert too_big.value.http_status == 413
    truncated = make_decoder(encoding)
    assert truncated is not None
    with pytest.raises(ClickHouseError):
        truncated.feed(stream[: len(stream) // 2], 1 << 20)
        truncated.finish()
    with pytest.raises(ClickHouseError) as unknown:
        make_decoder("snappy")
    assert unknown.value.code == 89
    body, enc = compress_body(b"x" * 100, f"identity;q=0, {encoding}")
    assert enc == encoding and body != b"x" * 100


def test_exports_are_documented() -> None:
    import sensorhub.chdb_server as pkg

    assert set(pkg.__all__) == {"ClickHouseError", "ServerConfig"}
    doc = Path(__file__).resolve().parents[1] / "docs" / "chdb-server.md"
    text = doc.read_text()
    for flag in ("--host", "--port", "--data", "--password", "--max-body-bytes"):
        assert flag in text


def test_sigterm_during_a_long_insert_finishes_it_and_exits_0(spawn: Any) -> None:
    server = spawn.chdb()
    client = clickhouse_connect.get_client(dsn=server.url)
    client.command("CREATE TABLE slow (a UInt64) ENGINE = MergeTree ORDER BY a")
    client.close()
    done = threading.Event()

    def slow_insert() -> None:
        try:
            raw(server, b"INSERT INTO slow SELECT number FROM numbers(8) WHERE sleepEachRow(0.25) = 0",
                params={"max_block_size": "8"})
        except OSError:
            pass  # the process may exit before the response is written; the rows count below
        finally:
            done.set()

    t = threading.Thread(target=slow_insert, name="slow-insert")
    t.start()
    time.sleep(0.7)
    assert not done.is_set()
    assert server.terminate(timeout=20) == 0
    t.join(10)
    server.start()
    client = clickhouse_connect.get_client(dsn=server.url)
    try:
        assert client.command("SELECT count() FROM slow") == 8
    finally:
        client.close()


def test_form_encoded_query_with_bound_parameters(chdb_server) -> None:  # type: ignore[no-untyped-def]
    """clickhouse-connect sends long queries with bound parameters as multipart form fields."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=chdb_server.url, form_encode_query_params=True)
    names = [f"dev-{i:04d}" for i in range(300)]
    got = client.query(
        "SELECT count() FROM system.numbers WHERE number < {n:UInt32} AND toString(number) NOT IN {names:Array(String)}",
        parameters={"n": 10, "names": names},
    ).result_rows
    assert got == [(10,)]
    with pytest.raises(clickhouse_connect.driver.exceptions.DatabaseError, match="external data"):
        client.query(
            "SELECT * FROM ext",
            external_data=clickhouse_connect.driver.external.ExternalData(
                data=b"1\n", file_name="ext.tsv", structure=["x UInt8"]
            ),
        )
