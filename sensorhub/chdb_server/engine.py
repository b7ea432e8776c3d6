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

An INSERT the engine answered while the data disk ran out can still have
left a part with empty or short files: ClickHouse refuses an INSERT below
``min_free_disk_ratio_to_perform_insert``, but when another program takes
the last bytes while the part is written, the engine may commit it broken
(measured on a tmpfs: ``benchmarks/disk_race.py``). Such a part has no other
copy, and the client has been told its rows are stored. So while the disk is
low (under ``verify_inserts_below`` bytes free, before or after the INSERT)
or an out-of-space error was answered in the last minute, each single-block
part an INSERT leaves is checked (``CHECK TABLE ... PART``, a few ms). A
broken one is detached (``ALTER TABLE ... DETACH PART``, which also takes its
block out of the deduplication log) and the INSERT is answered
``NOT_ENOUGH_SPACE``: the client repeats it under the same
``insert_deduplication_token``, which stores the rows of the detached part
once and is dropped as a duplicate by every table and view whose part was
sound.
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
from sensorhub.chdb_server.sql import insert_from_file, is_insert, quote_string

__all__ = ["Engine", "Outcome"]

log = logging.getLogger(__name__)

CORRUPTED_DATA = 246
# what reading a part whose files a full disk left empty or short raises, besides CORRUPTED_DATA:
# ATTEMPT_TO_READ_AFTER_EOF, CANNOT_READ_ALL_DATA, CHECKSUM_DOESNT_MATCH, NO_FILE_IN_DATA_PART,
# BAD_SIZE_OF_FILE_IN_DATA_PART, CANNOT_DECOMPRESS, UNKNOWN_CODEC (measured: benchmarks/disk_race.py).
# An INSERT's malformed data can raise some of them too, so only a read reopens for these.
READ_OF_A_BROKEN_PART = frozenset({32, 33, 40, 226, 228, 271, 432})
NOT_ENOUGH_SPACE = 243
REOPEN_AT_MOST_EVERY_S = 60.0
OUT_OF_SPACE_REMEMBERED_S = 60.0  # inserts are checked this long after an out-of-space error
VERIFIED_REMEMBERED_S = 30.0


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

    def __init__(
        self,
        data_dir: Path,
        lock_timeout_s: float = 300.0,
        insert_spool_dir: Path | None = None,
        verify_inserts_below: int = 1 << 30,
        fault_break_insert_parts: Iterable[str] = (),
    ) -> None:
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
        self.verify_inserts_below = verify_inserts_below  # bytes free on the data disk
        self._out_of_space_at = float("-inf")
        self._verified: dict[tuple[str, str, str], float] = {}  # parts found sound lately
        self._broken: set[tuple[str, str, str]] = set()  # parts found broken and not set aside yet
        # fault injection: tables, in order; each INSERT into the first breaks that table's part
        self.fault_break_insert_parts = list(fault_break_insert_parts)
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
        if err.code == NOT_ENOUGH_SPACE or "No space left on device" in str(err):
            self._out_of_space_at = time.monotonic()
        broken = err.code == CORRUPTED_DATA or (err.code in READ_OF_A_BROKEN_PART and not is_insert(sql))
        if not broken or time.monotonic() - self._reopened_at < REOPEN_AT_MOST_EVERY_S:
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

    @contextlib.contextmanager
    def _inserting(self) -> Iterator[None]:
        """Around an INSERT (lock held): on a low disk, check the parts it left once it succeeded."""
        low = self._disk_low()
        wall = time.time()
        parts_before = self._fault_parts() if self.fault_break_insert_parts else set()
        yield
        if self.fault_break_insert_parts:
            self._fault_break_insert_part(parts_before)
        if low or self._disk_low():
            self._verify_insert_parts(wall)

    def _disk_low(self) -> bool:
        """Whether an INSERT's parts are checked now (see the module's doc); never with 0 bytes."""
        if not self.verify_inserts_below:
            return False
        if time.monotonic() - self._out_of_space_at < OUT_OF_SPACE_REMEMBERED_S:
            return True
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize < self.verify_inserts_below

    def _verify_insert_parts(self, since_wall: float) -> None:
        """Check the single-block parts written since ``since_wall`` (lock held); detach a broken
        one and raise ``NOT_ENOUGH_SPACE``, so that the client repeats its INSERT."""
        now = time.monotonic()
        self._verified = {k: t for k, t in self._verified.items() if now - t < VERIFIED_REMEMBERED_S}
        try:
            listing = self._session.query(
                "SELECT database, table, name FROM system.parts WHERE active AND min_block_number = max_block_number "
                f"AND modification_time >= toDateTime({int(since_wall) - 1}) "
                "AND lower(database) NOT IN ('system', 'information_schema')", "TSVRaw",
            ).bytes().decode()
        except RuntimeError as exc:
            log.warning("could not list the parts of an INSERT to check them: %s", error_from_engine(exc))
            return
        found = [k for line in listing.splitlines() if len(k := tuple(line.split("\t"))) == 3]
        for db, table, name in found:
            if (db, table, name) in self._verified or (db, table, name) in self._broken:
                continue
            where = f"{_quote_ident(db)}.{_quote_ident(table)}"
            try:
                check = self._session.query(
                    f"CHECK TABLE {where} PART {quote_string(name)} SETTINGS check_query_single_value_result = 0",
                    "TSVRaw",
                ).bytes().decode()
            except RuntimeError as exc:
                err = error_from_engine(exc)
                if "NO_SUCH_DATA_PART" in str(err):
                    continue  # merged meanwhile: the merge read it whole
                check = f"{name}\t0\t{err}"
            fields = check.rstrip("\n").split("\t")
            if len(fields) >= 2 and fields[1] == "1":
                self._verified[(db, table, name)] = now
                continue
            self._broken.add((db, table, name))
            log.error("part %s.%s/%s of an INSERT was written broken while the disk ran out of space (%s); it "
                      "is set aside and the INSERT answered NOT_ENOUGH_SPACE, so that its client repeats it "
                      "with the same token and stores its rows once", db, table, name,
                      fields[2] if len(fields) > 2 else check.strip())
        broken, stuck = [], []
        for db, table, name in list(self._broken):
            try:
                self._session.query(f"ALTER TABLE {_quote_ident(db)}.{_quote_ident(table)} DETACH PART "
                                    f"{quote_string(name)}", "TSV")
            except RuntimeError as exc:
                err = error_from_engine(exc)
                if "NO_SUCH_DATA_PART" not in str(err):
                    log.warning("the broken part %s.%s/%s could not be set aside yet: %s", db, table, name, err)
                    stuck.append(f"{db}.{table}/{name}")
                    continue
            self._broken.discard((db, table, name))
            broken.append(f"{db}.{table}/{name}")
        broken += stuck
        if broken:
            self._out_of_space_at = time.monotonic()
            raise ClickHouseError.of(
                "NOT_ENOUGH_SPACE",
                f"The data disk ran out of space while an INSERT was written: part {', '.join(broken)} was "
                "written broken and is set aside (its rows are not stored). Send the same INSERT again, with "
                "the same insert_deduplication_token, once there is space",
            )

    def _fault_parts(self) -> set[str]:
        """Fault injection: the active parts of the table whose next INSERT's part is broken, by path."""
        table = quote_string(self.fault_break_insert_parts[0])
        rows = self._session.query(f"SELECT path FROM system.parts WHERE active AND table = {table}", "TSVRaw")
        return set(rows.bytes().decode().split())

    def _fault_break_insert_part(self, before: set[str]) -> None:
        """Fault injection: empty the marks of the part this INSERT wrote into the first table of
        ``fault_break_insert_parts``, as a disk that ran out once left one; that table is then done."""
        new = sorted(self._fault_parts() - before)
        if not new:
            return  # not this INSERT's table (or a duplicate): the next one
        self.fault_break_insert_parts.pop(0)
        for marks in Path(new[-1]).glob("*.*mrk*"):
            marks.write_bytes(b"")
        log.error("fault injection: emptied the marks of part %s", new[-1])

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
            with self._inserting() if is_insert(sql) else contextlib.nullcontext():
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
            with self._inserting(), self._spooled(chunks) as path:
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
