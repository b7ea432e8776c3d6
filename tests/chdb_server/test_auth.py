"""The chdb-server secured: users and roles from a users file, HTTPS, no reach outside, no secret in logs.

One real server process for the module (HTTPS with a throwaway CA, a users
file with an admin, a writer and a reader, DEBUG logging so that the access
log is written too), driven by clickhouse-connect and by raw requests; many
checks per test, because starting a server costs seconds. The statement
classification and the redaction are also checked as pure functions.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import ClickHouseError as DriverError
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from kit.services import ManagedProcess, free_port

from sensorhub.chdb_server.auth import parse_users
from sensorhub.chdb_server.server import redact, server_tls_context
from sensorhub.chdb_server.sql import outside_access, statement_role, with_readonly
from sensorhub.security.pki import CertPair, make_ca, make_server_cert
from sensorhub.service.stack_services import chdb_argv
from sensorhub.sinks.migrations import migrate, v1_ddl
from sensorhub.sinks.schema import SCHEMA_VERSION, Retention, apply_schema, current_version

ROLES = {"admin": "admin", "writer": "writer", "monitor": "reader"}


def users_json(passwords: dict[str, str]) -> str:
    users = {
        name: {"password_sha256_hex": hashlib.sha256(pw.encode()).hexdigest(), "role": ROLES[name]}
        for name, pw in passwords.items()
    }
    return json.dumps({"users": users})


@dataclass
class Secure:
    proc: ManagedProcess
    ca: CertPair
    users_file: Path
    passwords: dict[str, str]
    log_path: Path

    @property
    def port(self) -> int:
        return self.proc.port

    def context(self, ca: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca or self.ca.cert))

    def client(self, user: str, password: str | None = None, database: str = "default", **kw: Any) -> Any:
        pw = urllib.parse.quote(self.passwords[user] if password is None else password, safe="")
        kw.setdefault("ca_cert", str(self.ca.cert))
        # clickhouse-connect 1.12 takes host, port and credentials from the DSN but not TLS: secure=True
        return clickhouse_connect.get_client(
            dsn=f"https://{user}:{pw}@127.0.0.1:{self.port}/{database}", secure=True, **kw
        )

    def raw(
        self, body: bytes | None = None, user: str | None = None, password: str | None = None,
        params: dict[str, str] | None = None, headers: dict[str, str] | None = None, path: str = "/",
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request; ``user`` authenticates with HTTP basic auth (its own password by default)."""
        headers = dict(headers or {})
        if user is not None:
            pw = self.passwords.get(user, "") if password is None else password
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(), timeout=30)
        try:
            url = path + ("?" + urllib.parse.urlencode(params) if params else "")
            conn.request("POST" if body is not None else "GET", url, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def refused(self, sql: str, user: str, **kw: Any) -> tuple[int, str, str]:
        status, headers, body = self.raw(sql.encode(), user, **kw)
        return status, headers.get("x-clickhouse-exception-code", ""), body.decode()


def _https_ready(port: int, ca: Path) -> bool:
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)),
                                           timeout=1)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().read() == b"Ok.\n"
        finally:
            conn.close()
    except OSError:
        return False


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    run_dir = tmp_path_factory.mktemp("secure")
    ca = make_ca(run_dir / "tls")
    server = make_server_cert(ca, run_dir / "tls", hosts=["127.0.0.1", "localhost"])
    passwords = {name: base64.urlsafe_b64encode(os.urandom(15)).decode() for name in ROLES}
    users_file = run_dir / "users.json"
    users_file.write_text(users_json(passwords))
    port = free_port("127.0.0.1")
    extra = ["--users-file", str(users_file), "--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    log_path = run_dir / "chdb" / "chdb-server.log"
    proc = ManagedProcess(
        "chdb-server", chdb_argv(run_dir, port, extra=extra), ready=lambda: _https_ready(port, ca.cert),
        log_path=log_path, env={**os.environ, "SENSORHUB_LOG_LEVEL": "DEBUG"}, port=port,
        url=f"https://127.0.0.1:{port}",
    ).start(60)
    yield Secure(proc, ca, users_file, passwords, log_path)
    assert proc.terminate() == 0


# ---------------------------------------------------------------- against the server


def test_every_query_must_authenticate_and_health_checks_need_not(secure: Secure) -> None:
    assert secure.raw(path="/ping")[::2] == (200, b"Ok.\n")
    assert secure.raw(path="/")[::2] == (200, b"Ok.\n")
    for kw in ({}, {"user": "writer", "password": "wrong"}, {"user": "nobody", "password": "x"},
               {"params": {"user": "writer", "password": "wrong"}}):
        status, headers, body = secure.raw(b"SELECT 1", **kw)  # type: ignore[arg-type]
        assert (status, headers["x-clickhouse-exception-code"]) == (401, "516"), kw
        assert b"Authentication failed" in body and headers["www-authenticate"].startswith("Basic")
    assert secure.raw(b"SELECT 1", "writer")[::2] == (200, b"1\n")
    writer_key = {"X-ClickHouse-User": "writer", "X-ClickHouse-Key": secure.passwords["writer"]}
    assert secure.raw(b"SELECT 2", headers=writer_key)[::2] == (200, b"2\n")
    as_params = {"user": "monitor", "password": secure.passwords["monitor"]}
    assert secure.raw(b"SELECT 3", params=as_params)[::2] == (200, b"3\n")
    with pytest.raises(DatabaseError) as denied:
        secure.client("writer", password="wrong")
    assert "516" in str(denied.value)
    client = secure.client("admin")
    try:
        assert client.command("SELECT 7") == 7
        # a session belongs to its user: another one naming it starts its own
        client.command("SET max_threads = 1", settings={"session_id": "s-1"})
        assert client.command("SELECT getSetting('max_threads')", settings={"session_id": "s-1"}) == 1
    finally:
        client.close()
    other = secure.raw(b"SELECT getSetting('max_threads')", "monitor", params={"session_id": "s-1"})
    assert other[0] == 200 and other[2] != b"1\n"


def test_roles_bound_what_each_user_may_run(secure: Secure) -> None:
    admin, writer, monitor = secure.client("admin"), secure.client("writer"), secure.client("monitor")
    try:
        # the writer makes the schema and migrates as sensorhub does at start, then writes
        apply_schema(writer, "sh_roles", retention=Retention.default())
        assert current_version(writer, "sh_roles") == SCHEMA_VERSION
        for stmt in v1_ddl("sh_old"):
            writer.command(stmt)
        writer.command("INSERT INTO sh_old.schema_version (version) VALUES (1)")
        assert migrate(writer, "sh_old", retention=Retention.default())
        assert current_version(writer, "sh_old") == SCHEMA_VERSION
        writer.command("CREATE TABLE IF NOT EXISTS sh_roles.t (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
        writer.insert("sh_roles.t", [[1, "x"], [2, "y"]], column_names=["a", "s"])
        writer.command("INSERT INTO sh_roles.t VALUES (3, 'z')")
        writer.command("ALTER TABLE sh_roles.t ADD COLUMN IF NOT EXISTS b UInt8 DEFAULT 0")
        writer.command("RENAME TABLE sh_roles.t TO sh_roles.t2")
        writer.command("OPTIMIZE TABLE sh_roles.t2 FINAL")
        assert writer.command("SELECT count() FROM sh_roles.t2") == 3
        for stmt in ("DROP DATABASE sh_old", "SYSTEM FLUSH LOGS", "CREATE USER u IDENTIFIED BY 'x'",
                     "KILL QUERY WHERE 0", "ATTACH TABLE sh_roles.gone"):
            status, code, body = secure.refused(stmt, "writer")
            assert (status, code) == (403, "497"), stmt
            assert "writer: Not enough privileges" in body and "needs the role admin" in body
        writer.command("DROP TABLE sh_old.readings")  # tables are the writer's

        # the reader reads, and nothing else
        assert monitor.query("SELECT a, s FROM sh_roles.t2 ORDER BY a").result_rows == [(1, "x"), (2, "y"), (3, "z")]
        for stmt in ("SHOW TABLES FROM sh_roles", "DESCRIBE TABLE sh_roles.t2", "EXISTS TABLE sh_roles.t2",
                     "EXPLAIN SELECT 1", "WITH 2 AS x SELECT x", "(SELECT 1)", "SELECT 1 SETTINGS max_threads = 1"):
            assert secure.raw(stmt.encode(), "monitor")[0] == 200, stmt
        # the engine itself runs the reader's statements read-only
        assert monitor.command("SELECT getSetting('readonly')") == 2
        for stmt in ("INSERT INTO sh_roles.t2 (a) VALUES (9)", "INSERT INTO sh_roles.t2 (a) SELECT 9",
                     "CREATE TABLE sh_roles.r (a UInt8) ENGINE = Memory", "DROP TABLE sh_roles.t2",
                     "ALTER TABLE sh_roles.t2 DELETE WHERE 1", "TRUNCATE TABLE sh_roles.t2", "SYSTEM FLUSH LOGS",
                     "/* x */ DROP DATABASE sh_roles", "DELETE FROM sh_roles.t2 WHERE 1"):
            status, code, body = secure.refused(stmt, "monitor")
            assert (status, code) == (403, "164"), stmt
            assert "monitor: Cannot execute query in readonly mode" in body
        with pytest.raises(DriverError) as insert:
            monitor.insert("sh_roles.t2", [[9, "n", 0]], column_names=["a", "s", "b"])
        assert "164" in str(insert.value)
        assert admin.command("SELECT count() FROM sh_roles.t2") == 3

        # SET readonly stays with its session: the one engine context is not left read-only
        session = {"session_id": "ro-1"}
        assert secure.raw(b"SET readonly = 1", "admin", params=session)[0] == 200
        assert secure.refused("INSERT INTO sh_roles.t2 (a) VALUES (8)", "admin", params=session)[:2] == (403, "164")
        writer.command("INSERT INTO sh_roles.t2 (a) VALUES (8)")
        assert admin.command("SELECT count() FROM sh_roles.t2") == 4
        admin.command("DROP DATABASE sh_roles")
        admin.command("DROP DATABASE sh_old")
    finally:
        for c in (admin, writer, monitor):
            c.close()


def test_nobody_reaches_the_servers_files_or_the_network(secure: Secure, tmp_path: Path) -> None:
    out = tmp_path / "out.tsv"
    refused = [
        "SELECT * FROM file('/etc/passwd')",
        "SELECT * FROM file ('/etc/passwd', 'LineAsString')",
        "SELECT file('/etc/passwd')",
        "SELECT `file`('/etc/passwd')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')",
        "SELECT * FROM s3('http://127.0.0.1:1/b/k.csv')",
        "SELECT * FROM remote('127.0.0.1:9000', system.one)",
        "DESCRIBE TABLE file('/etc/passwd')",
        f"SELECT 1 INTO OUTFILE '{out}'",
        "CREATE TABLE default.leak (s String) ENGINE = File(LineAsString, '/etc/passwd')",
        f"INSERT INTO FUNCTION file('{out}', 'TSV', 's String') VALUES ('x')",
        "SELECT 1 FORMAT Template SETTINGS format_template_resultset = '/etc/passwd'",
    ]
    for user in ("admin", "writer"):
        for stmt in refused:
            status, code, body = secure.refused(stmt, user)
            assert (status, code) == (403, "497"), (user, stmt)
            assert "--allow-file-functions" in body
    assert secure.refused(refused[0], "monitor")[:2] == (403, "497")
    assert secure.refused("SELECT 1", "admin", params={"format_template_row": "/etc/passwd"})[:2] == (403, "497")
    writer = secure.client("writer")
    try:
        writer.command("CREATE TABLE default.files (file String, url String) ENGINE = MergeTree ORDER BY file")
        # VALUES data is evaluated by the engine: a file() there would read the file
        assert secure.refused("INSERT INTO default.files VALUES (file('/etc/passwd'), '')", "writer")[:2] == (
            403, "497")
        writer.command("INSERT INTO default.files VALUES ('file(/etc/passwd)', 'url(')")
        writer.insert("default.files", [["file('x')", "u"]], column_names=["file", "url"])
        rows = writer.query("SELECT file, url FROM default.files WHERE file LIKE 'file(%' ORDER BY file").result_rows
        assert rows == [("file('x')", "u"), ("file(/etc/passwd)", "url(")]
        text = writer.query("SELECT 'SELECT * FROM file(''/etc/passwd'')'").result_rows[0][0]
        assert text == "SELECT * FROM file('/etc/passwd')"
        writer.command("DROP TABLE default.files")
    finally:
        writer.close()
    assert not out.exists()


def test_a_rotated_password_works_at_once_without_a_restart(secure: Secure) -> None:
    pid = secure.proc.pid
    old = dict(secure.passwords)
    new = {**old, "writer": old["writer"] + "-2"}
    secure.users_file.write_text(users_json(new))  # rewritten in place
    try:
        assert secure.raw(b"SELECT 1", "writer", old["writer"])[0] == 401
        assert secure.raw(b"SELECT 1", "writer", new["writer"])[::2] == (200, b"1\n")
        # a malformed file (half written, a typo) leaves the users read before in force
        secure.users_file.write_text('{"users": {"writer": ')
        assert secure.raw(b"SELECT 1", "writer", new["writer"])[0] == 200
        # replaced by rename, as sensorhub's credentials are written
        tmp = secure.users_file.with_name("users.json.tmp")
        tmp.write_text(users_json(old))
        tmp.replace(secure.users_file)
        assert secure.raw(b"SELECT 1", "writer", new["writer"])[0] == 401
        assert secure.raw(b"SELECT 1", "writer", old["writer"])[0] == 200
        # SIGHUP: read again though nothing changed, and the server stays up
        reads = secure.log_path.read_text().count("read again: 3 users")
        secure.proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while secure.log_path.read_text().count("read again: 3 users") == reads:
            assert time.monotonic() < deadline, "SIGHUP did not have the users file read again"
            time.sleep(0.05)
        assert secure.proc.alive() and secure.proc.pid == pid
        assert secure.raw(b"SELECT 1", "writer")[0] == 200
    finally:
        secure.users_file.write_text(users_json(old))
    assert "users.json: not valid JSON" in secure.log_path.read_text()


def test_https_only_with_the_servers_ca(secure: Secure, tmp_path: Path) -> None:
    with socket_to(secure.port, secure.context()) as ssock:
        assert ssock.version() in ("TLSv1.2", "TLSv1.3")
    other_ca = make_ca(tmp_path / "other")
    with pytest.raises(OperationalError):
        secure.client("admin", ca_cert=str(other_ca.cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        conn = http.client.HTTPSConnection("127.0.0.1", secure.port, context=secure.context(other_ca.cert), timeout=10)
        try:
            conn.request("GET", "/ping")
        finally:
            conn.close()
    # plain HTTP to the HTTPS port gets no answer
    conn = http.client.HTTPConnection("127.0.0.1", secure.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/ping")
            conn.getresponse()
    finally:
        conn.close()
    assert secure.raw(b"SELECT 1", "admin")[::2] == (200, b"1\n")  # the server lives on
    server = secure.ca.cert.with_name("server.crt")
    assert server_tls_context(server, server.with_suffix(".key")).minimum_version == ssl.TLSVersion.TLSv1_2


def socket_to(port: int, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return (ctx or ssl.create_default_context()).wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def test_no_secret_in_the_log_or_the_process_list(secure: Secure) -> None:
    # a password in the URL, as some clients send it (also percent-encoded); request lines are logged at DEBUG
    pw = urllib.parse.quote(secure.passwords["admin"], safe="")
    for key in ("password", "pass%77ord"):
        assert secure.raw(b"SELECT 1", path=f"/?user=admin&{key}={pw}")[0] == 200
    log = secure.log_path.read_text()
    assert "password=[HIDDEN]" in log
    secrets = [*secure.passwords.values(), *(p + "-2" for p in secure.passwords.values())]
    for secret in secrets:
        assert secret not in log
        assert base64.b64encode(f"admin:{secret}".encode()).decode() not in log
    assert "Authorization" not in log and "X-ClickHouse-Key" not in log
    cmdline = Path(f"/proc/{secure.proc.pid}/cmdline").read_bytes().decode()
    environ = Path(f"/proc/{secure.proc.pid}/environ").read_bytes().decode(errors="replace")
    assert not any(s in cmdline or s in environ for s in secrets)


# ---------------------------------------------------------------- without a server


def _start_fails(tmp_path: Path, *extra: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "sensorhub", "chdb-server", "--data", str(tmp_path / "d"), "--port", "0", *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stderr


def test_bad_files_at_start_are_configuration_errors(tmp_path: Path) -> None:
    bad = tmp_path / "users.json"
    bad.write_text('{"users": {"w": {"password": "plain", "role": "writer"}}}')
    rc, err = _start_fails(tmp_path, "--users-file", str(bad))
    assert rc == 78, err
    assert str(bad) in err and "password_sha256_hex" in err and "plain password is not accepted" in err
    assert "plain\"" not in err.replace("plain password", "")
    rc, err = _start_fails(tmp_path, "--users-file", str(tmp_path / "missing.json"))
    assert rc == 78 and "missing.json: No such file or directory" in err, err
    rc, err = _start_fails(tmp_path, "--tls-cert", str(bad), "--tls-key", str(bad))
    assert rc == 78 and "--tls-cert" in err, err
    rc, err = _start_fails(tmp_path, "--password", "s3cret")  # never a password on the command line
    assert rc == 2 and "--password is not accepted" in err and "s3cret" not in err, err
    assert not (tmp_path / "d").exists()  # refused before the engine was opened


def test_users_file_form() -> None:
    digest = hashlib.sha256(b"pw").hexdigest()
    users = parse_users(json.dumps({"users": {"w": {"password_sha256_hex": digest.upper(), "role": "writer"}}}))
    assert users["w"].role == "writer" and users["w"].password_sha256 == hashlib.sha256(b"pw").digest()
    assert digest not in repr(users["w"])
    for doc, why in [
        ("[]", "top level"),
        ('{"users": {}}', "no users"),
        ('{"users": {"w": {"password_sha256_hex": "abc", "role": "writer"}}}', "64 hex digits"),
        ('{"users": {"w": {"password_sha256_hex": "' + digest + '", "role": "root"}}}', "role must be"),
        ('{"users": {"w": {"password_sha256_hex": "' + digest + '", "role": "reader", "rol": 1}}}', "unknown keys rol"),
        ('{"users": {"w": ', "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=why) as exc:
            parse_users(doc)
        assert digest not in str(exc.value)


@pytest.mark.parametrize(
    ("sql", "role"),
    [
        ("SELECT 1", "reader"), ("  /* c */ -- d\n ((SELECT 1))", "reader"), ("WITH 1 AS a SELECT a", "reader"),
        ("SHOW TABLES", "reader"), ("DESC t", "reader"), ("EXISTS TABLE t", "reader"), ("EXPLAIN SELECT 1", "reader"),
        ("INSERT INTO t VALUES", "writer"), ("CREATE TABLE IF NOT EXISTS d.t (a Int8)", "writer"),
        ("CREATE OR REPLACE TEMPORARY TABLE t (a Int8)", "writer"), ("CREATE MATERIALIZED VIEW v TO t AS SELECT 1", "writer"),
        ("CREATE DATABASE IF NOT EXISTS d", "writer"), ("ALTER TABLE t MODIFY TTL x", "writer"),
        ("RENAME TABLE a TO b", "writer"), ("DROP TABLE IF EXISTS t", "writer"), ("TRUNCATE t", "writer"),
        ("DELETE FROM t WHERE 1", "writer"), ("OPTIMIZE TABLE t FINAL", "writer"),
        ("DROP DATABASE d", "admin"), ("TRUNCATE DATABASE d", "admin"), ("RENAME DATABASE a TO b", "admin"),
        ("SYSTEM FLUSH LOGS", "admin"), ("KILL QUERY WHERE 1", "admin"), ("CREATE USER u", "admin"),
        ("ALTER USER u", "admin"), ("GRANT SELECT ON *.* TO u", "admin"), ("CREATE DICTIONARY d", "admin"),
        ("ATTACH TABLE t", "admin"), ("BACKUP TABLE t TO Disk('b', 'x')", "admin"), ("SET ROLE r", "admin"),
        ("\u200bSELECT 1", "reader"), ("", "admin"), ("FROBNICATE", "admin"),
    ],
)
def test_statement_role(sql: str, role: str) -> None:
    assert statement_role(sql) == role


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("SELECT * FROM file('/etc/passwd')", "file()"), ("SELECT file\t/* c */ ('/x')", "file()"),
        ("SELECT `fi\\x6ce`('/x')", "file()"), ('SELECT "file"(1)', "file()"), ("SELECT file\u200b('/x')", "file()"),
        ("SELECT * FROM icebergLocal('/x')", "icebergLocal()"), ("INSERT INTO FUNCTION url('u') VALUES (1)", "url()"),
        ("CREATE TABLE t (a Int8) ENGINE = S3('u')", "S3()"), ("SELECT 1 INTO OUTFILE 'x'", "INTO OUTFILE"),
        ("SELECT 1 INTO\u00a0OUTFILE $$x$$", "INTO OUTFILE"), ("SELECT $$'$$, file('/x'), $$'$$", "file()"),
        ("SELECT 1 SETTINGS format_schema = 'x'", "the setting format_schema"),
        ("SELECT file, url FROM t WHERE file = 'file('", None), ("SELECT 'x' AS file", None),
        ("SELECT * FROM db.file", None), ("INSERT INTO file (a) VALUES (1)", None), ("INSERT INTO outfile VALUES", None),
        ("CREATE TABLE IF NOT EXISTS url (a Int8) ENGINE = Memory", None), ("SELECT 1 -- file('/x')", None),
        ("SELECT $x$ file('/x') $x$", None), ("SELECT filesystemAvailable()", None),
        ("('file(', 'url(')", None), ("(1, file('/x'))", "file()"),
    ],
)
def test_outside_access(sql: str, found: str | None) -> None:
    assert outside_access(sql) == found


def test_with_readonly_and_redact() -> None:
    assert with_readonly("SELECT 1;  -- c") == "SELECT 1\nSETTINGS readonly = 2"
    assert with_readonly("SELECT 1 FORMAT TSV SETTINGS a = 1") == "SELECT 1 FORMAT TSV SETTINGS a = 1, readonly = 2"
    assert with_readonly("SELECT 1 SETTINGS a = 1 FORMAT TSV") == "SELECT 1 SETTINGS a = 1 FORMAT TSV\nSETTINGS readonly = 2"
    assert with_readonly("SELECT * FROM settings") == "SELECT * FROM settings\nSETTINGS readonly = 2"
    line = '"POST /?database=d&pass%77ord=s3cret&x=1 HTTP/1.1" 200 -'
    assert redact(line) == '"POST /?database=d&password=[HIDDEN]&x=1 HTTP/1.1" 200 -'
    assert redact("CREATE USER u IDENTIFIED WITH sha256_password BY 's3cret'") == (
        "CREATE USER u IDENTIFIED WITH sha256_password BY '[HIDDEN]'")
    assert redact("what? no=params") == "what? no=params"
