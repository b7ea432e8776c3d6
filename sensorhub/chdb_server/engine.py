"""The one chdb engine of the process, used by one statement at a time.

chdb runs one ClickHouse engine per process with one session context. The
HTTP interface applies settings and the current database per request; here
they are applied with ``SET`` and ``USE`` on that context, and only what
differs from the previous request is sent, so a client that sends the same
settings every time (clickhouse-connect does) costs nothing extra. A lock
makes "apply settings, then run the statement" atomic; the lock wait is
bounded and a busy engine answers 503 (retryable by clients).

Inserts run as ``INSERT ... FROM INFILE`` over a spooled copy of the data,
not through chdb's streaming inserter: ``StreamingInserter.finish()``
reports success even when the engine refused the block (too many
partitions, a violated constraint...), and the rows are then silently not
stored. A statement run with ``query`` raises every engine error.

A part found broken while a statement reads it (``CORRUPTED_DATA``, code
246: the engine once left a part with an empty marks file after the disk
filled) would fail every later read of its table. The engine is then
reopened: loading the table detaches the broken part (``broken-on-start_``
in ``detached/``) and brings back the parts it was merged from while they
are still on disk (``old_parts_lifetime``, 8 minutes), and the statement is
run once more. At most once a minute, so a part that breaks again returns
the error rather than a loop of reopenings.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensorhub.chdb_server.errors import ClickHouseError, error_from_engine
from sensorhub.chdb_server.sql import insert_from_file, quote_string

__all__ = ["Engine", "Outcome"]

log = logging.getLogger(__name__)

CORRUPTED_DATA = 246
REOPEN_AT_MOST_EVERY_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """The result of one statement: the response body and ClickHouse's summary counters."""

    body: bytes
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, str]:
        """``X-ClickHouse-Summary`` as real servers send it: every counter a decimal string."""
        return {
            "read_rows": str(self.read_rows),
            "read_bytes": str(self.read_bytes),
            "written_rows": str(self.written_rows),
            "written_bytes": str(self.written_bytes),
            "total_rows_to_read": str(self.read_rows),
            "result_rows": str(self.result_rows),
            "result_bytes": str(self.result_bytes),
            "elapsed_ns": str(int(self.elapsed_s * 1e9)),
        }


def _quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def default_insert_spool_dir() -> Path | None:
    """``/dev/shm`` when it is a writable directory (memory: it keeps working when the data
    disk is full), else None: the system's temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


class Engine:
    """The chdb session over ``data_dir``; every public method is safe to call from any thread."""

    def __init__(self, data_dir: Path, lock_timeout_s: float = 300.0, insert_spool_dir: Path | None = None) -> None:
        # The engine reads the zone once at start; UTC makes timezone() 'UTC' as
        # on the servers the rest of sensorhub talks to, whatever the host says.
        os.environ["TZ"] = "UTC"
        time.tzset()
        # imported here: loading the engine takes a moment, and only the server needs it
        chdb_session: Any = importlib.import_module("chdb.session")

        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.lock_timeout_s = lock_timeout_s
        self.insert_spool_dir = insert_spool_dir or default_insert_spool_dir()
        self._lock = threading.Lock()
        self._session_class: Any = chdb_session.Session
        self._session: Any = self._session_class(str(data_dir))
        self._applied: dict[str, str] = {}
        self._database = "default"
        self.reopened = 0
        self._reopened_at = float("-inf")
        rows = self._session.query("SELECT name, value FROM system.settings WHERE changed", "TSVRaw")
        self._baseline: dict[str, str] = dict(
            line.split("\t", 1) for line in rows.bytes().decode().splitlines() if "\t" in line
        )
        info = self._session.query("SELECT version(), timezone()", "TSVRaw").bytes().decode().split("\t")
        self.version = info[0].strip()
        self.timezone = info[1].strip()
        self.display_name = socket.gethostname()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=self.lock_timeout_s):
            raise ClickHouseError.of(
                "CANNOT_SCHEDULE_TASK",
                f"The engine was busy with other statements for {self.lock_timeout_s:.0f} s",
            )
        try:
            if self._session is None:
                raise ClickHouseError.of(
                    "CANNOT_SCHEDULE_TASK", "The engine is closed: the server is shutting down, or reopening it failed"
                )
            yield
        finally:
            self._lock.release()

    def _run(self, sql: str, fmt: str, params: Mapping[str, str] | None = None) -> Any:
        """``sql`` on the session (lock held), the engine's error raised as ClickHouse's; a broken
        part is recovered from once by reopening the engine (see the module's doc)."""
        try:
            return self._session.query(sql, fmt, params=dict(params) if params else None)
        except RuntimeError as exc:
            err = error_from_engine(exc)
        if err.code != CORRUPTED_DATA or time.monotonic() - self._reopened_at < REOPEN_AT_MOST_EVERY_S:
            raise err
        log.error("a part is broken, reopening the engine so that it detaches the part and restores what it "
                  "was merged from: %s", err)
        settings, database = self._applied, self._database
        before = self._detached()
        self._reopen()
        self._report_detached(before)
        self._apply(settings, database)
        try:
            r = self._session.query(sql, fmt, params=dict(params) if params else None)
        except RuntimeError as exc:
            raise error_from_engine(exc)
        log.warning("the engine was reopened; the statement succeeded on the second try")
        return r

    def _reopen(self) -> None:
        """Close the session and open it again over the same data (lock held)."""
        self._reopened_at = time.monotonic()
        self._session.close()
        self._session = None
        try:
            self._session = self._session_class(str(self.data_dir))
        except RuntimeError as exc:
            log.critical("the engine could not be reopened over %s; every statement is refused until the "
                         "server restarts: %s", self.data_dir, exc)
            raise error_from_engine(exc)
        self._applied, self._database = {}, "default"
        self.reopened += 1

    def _detached(self) -> dict[str, tuple[str, ...]]:
        """``system.detached_parts`` by ``<database>.<table>/<name>`` (lock held); empty if unreadable."""
        try:
            rows = self._session.query(
                "SELECT database, table, name, reason, min_block_number, max_block_number, level "
                "FROM system.detached_parts", "TSVRaw"
            ).bytes().decode()
        except RuntimeError:
            return {}
        out: dict[str, tuple[str, ...]] = {}
        for line in rows.splitlines():
            f = tuple(line.split("\t"))
            if len(f) == 7:
                out[f"{f[0]}.{f[1]}/{f[2]}"] = f
        return out

    def _report_detached(self, before: Mapping[str, tuple[str, ...]]) -> None:
        """Log each part the reopening set aside. One that covers a single block came from one
        INSERT, or from a merge whose source is gone: nothing can bring back its rows."""
        for key, (_db, _table, _name, reason, lo, hi, level) in sorted(self._detached().items()):
            if key in before:
                continue
            if lo == hi:
                log.critical("part %s (%s, block %s, level %s) was set aside and covers a single block: its "
                             "rows are not in the table any more, and no other part holds them", key, reason, lo, level)
            else:
                log.error("part %s (%s, blocks %s-%s, level %s) was set aside; the parts it was merged from "
                          "are back where they were still on disk", key, reason, lo, hi, level)

    def _reset_literal(self, name: str) -> str:
        base = self._baseline.get(name)
        return quote_string(base) if base is not None else "DEFAULT"

    def _apply(self, settings: Mapping[str, str], database: str | None) -> None:
        """Make the session's settings and database those of this request (lock held)."""
        changes = [f"{k} = {v}" for k, v in settings.items() if self._applied.get(k) != v]
        changes += [f"{k} = {self._reset_literal(k)}" for k in self._applied if k not in settings]
        if changes:
            try:
                self._session.query("SET " + ", ".join(changes), "TSV")
            except RuntimeError as exc:
                self._recover_settings(settings)
                raise error_from_engine(exc)
            self._applied = dict(settings)
        db = database or "default"
        if db != self._database:
            try:
                self._session.query(f"USE {_quote_ident(db)}", "TSV")
            except RuntimeError as exc:
                raise error_from_engine(exc)
            self._database = db

    def _recover_settings(self, requested: Mapping[str, str]) -> None:
        """After a failed SET, put every setting either request named back to its start value.

        One by one, because a name the engine does not know fails again.
        """
        for name in set(self._applied) | set(requested):
            try:
                self._session.query(f"SET {name} = {self._reset_literal(name)}", "TSV")
            except RuntimeError as exc:
                log.debug("reset of setting %s after a failed SET: %s", name, exc)
        self._applied = {}

    def check_settings(self, settings: Mapping[str, str]) -> None:
        """Raise the engine's error if ``settings`` cannot be applied (unknown name, bad value)."""
        with self._locked():
            self._apply({**self._applied, **settings}, self._database)

    def query(
        self,
        sql: str,
        *,
        settings: Mapping[str, str],
        database: str | None,
        params: Mapping[str, str],
        default_format: str,
    ) -> Outcome:
        """Run one statement; its result is written in its FORMAT clause or ``default_format``."""
        with self._locked():
            self._apply(settings, database)
            r = self._run(sql, default_format, params)
            # chdb's rows_read/bytes_read count the result; storage_* what was read
            return Outcome(
                body=r.bytes() or b"",
                read_rows=int(r.storage_rows_read()),
                read_bytes=int(r.storage_bytes_read()),
                written_rows=int(r.rows_written()),
                written_bytes=int(r.bytes_written()),
                result_rows=int(r.rows_read()),
                result_bytes=int(r.bytes_read()),
                elapsed_s=float(r.elapsed()),
            )

    def insert(
        self,
        statement: str,
        fmt: str,
        chunks: Iterable[bytes],
        *,
        settings: Mapping[str, str],
        database: str | None,
    ) -> Outcome:
        """Insert ``chunks`` (``fmt``-encoded rows) with ``statement`` (an INSERT without FORMAT).

        The data is spooled to a file in :attr:`insert_spool_dir` and read by
        the engine with ``FROM INFILE``, so every refusal of the engine is
        raised; the file is gone when this returns. Spooling happens under
        the engine lock: at most one spooled copy exists at a time.
        """
        with self._locked():
            self._apply(settings, database)
            started = time.perf_counter()
            with self._spooled(chunks) as path:
                r = self._run(insert_from_file(statement, path, fmt), "TSV")
            return Outcome(
                body=b"",
                written_rows=int(r.rows_written()),
                written_bytes=int(r.bytes_written()),
                result_rows=int(r.rows_written()),
                result_bytes=int(r.bytes_written()),
                elapsed_s=time.perf_counter() - started,
            )

    @contextlib.contextmanager
    def _spooled(self, chunks: Iterable[bytes]) -> Iterator[str]:
        """A path the engine can open holding the concatenated ``chunks``; gone on exit.

        The file is anonymous (unlinked from the start) and reached through
        ``/proc/self/fd``: nothing is left behind, not even after kill -9.
        """
        try:
            # unbuffered: a full spool directory fails the write here, not the close
            f = tempfile.TemporaryFile(dir=self.insert_spool_dir, prefix="sensorhub-insert-", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _spool_error(exc, self.insert_spool_dir)
        with f:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[f.write(view) :]
            except OSError as exc:
                raise _spool_error(exc, self.insert_spool_dir)
            yield f"/proc/self/fd/{f.fileno()}"

    def close(self, timeout_s: float = 20.0) -> bool:
        """Wait up to ``timeout_s`` for the running statement, then close the session.

        Returns False when a statement was still running: the session is then
        left to the process exit (every acknowledged insert is already on disk;
        the running one was never acknowledged).
        """
        if not self._lock.acquire(timeout=timeout_s):
            log.warning("a statement still runs after %.0f s; exiting without closing the engine", timeout_s)
            return False
        try:
            if self._session is not None:
                self._session.close()
                self._session = None
        finally:
            self._lock.release()
        return True


def _spool_error(exc: OSError, spool_dir: Path | None) -> ClickHouseError:
    where = str(spool_dir or tempfile.gettempdir())
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ClickHouseError.of("NOT_ENOUGH_SPACE", f"Cannot spool the data of an INSERT to {where}: {exc.strerror}")
    return ClickHouseError.of("CANNOT_OPEN_FILE", f"Cannot spool the data of an INSERT to {where}: {exc}")
