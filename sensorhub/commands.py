"""Every ``sensorhub`` command: its one-line help, its arguments, and the module that runs it.

Building the parser needs only this module. The module a :class:`Command`
names is imported for the chosen command alone, so that a restarted
``sensorhub ingest`` does not load rich, websockets, prometheus_client or
the embedded ClickHouse for commands it is not running; that module's
``run(args)`` returns the exit status.

A default that belongs to an implementation (the chdb-server's bounds in
``ServerConfig``) is written here again, and a test holds the two equal.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "Command"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Command:
    """One subcommand: ``help`` (one line), ``module`` (holds ``run``), ``arguments(parser)``."""

    help: str
    module: str
    arguments: Callable[[argparse.ArgumentParser], None]


def _alerts(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["evaluate", "serve", "open", "drop-group"],
                   help="evaluate: the rules on the live streams; serve: WebSocket and page; open: list the open "
                   "alerts; drop-group: remove the evaluator's consumer group (after removing every rule)")
    p.add_argument("--port", type=int, help="serve: port (default alerts.port; 0: any free port)")
    p.add_argument("--no-store", action="store_true", help="evaluate: do not store alerts in ClickHouse")


def _audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reconcile", action="store_true", help="compare with ClickHouse and exit 1 on a gap")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--redis", metavar="URL")
    p.add_argument("--clickhouse", metavar="URL")


class _SecretRefused(argparse.Action):
    """An option that once took a secret: refused, without repeating its value anywhere."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not accepted: a password on the command line is seen by every user "
                     "of the machine (ps); give --password-file FILE or --users-file FILE")


def _chdb_server(p: argparse.ArgumentParser) -> None:
    # names are fixed because other tools drive the command; defaults are ServerConfig's
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8123, help="TCP port (default %(default)s)")
    p.add_argument("--data", required=True, metavar="DIR", help="database directory; kept across restarts")
    # secrets come from files, never from the command line (ps shows it) or the environment
    p.add_argument(
        "--users-file", metavar="FILE", default=None,
        help='users and roles, JSON {"users": {NAME: {"password_sha256_hex": ..., "role": '
        '"admin"|"writer"|"reader"}}}; read again when it changes or on SIGHUP',
    )
    p.add_argument(
        "--password-file", metavar="FILE", default=None,
        help="instead of --users-file: one user (--user, role admin) whose password is the file's first line",
    )
    p.add_argument("--user", default="default", help="the user name of --password-file (default %(default)s)")
    p.add_argument("--password", action=_SecretRefused, dest="_password", help=argparse.SUPPRESS)
    p.add_argument("--tls-cert", metavar="FILE", default=None, help="PEM certificate (chain): serve HTTPS only")
    p.add_argument("--tls-key", metavar="FILE", default=None, help="the private key of --tls-cert (PEM)")
    p.add_argument(
        "--allow-file-functions", action="store_true",
        help="let statements use file(), url(), s3(), remote(), INTO OUTFILE... (the server's files and "
        "network); refused by default, for every user",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=512 * MiB,
        help="largest request body, compressed and decompressed (default %(default)s)",
    )
    p.add_argument(
        "--spool-bytes", type=int, default=16 * MiB,
        help="request bodies above this size are spooled to a temporary file (default %(default)s)",
    )
    p.add_argument("--tmp-dir", default=None, help="directory for spooled bodies (default: system temp)")
    p.add_argument(
        "--insert-spool-dir", default=None,
        help="directory the engine reads INSERT data from (default: /dev/shm when writable, else system temp)",
    )
    p.add_argument("--max-connections", type=int, default=128)
    p.add_argument("--max-sessions", type=int, default=1000)
    p.add_argument(
        "--idle-timeout", type=float, default=60.0,
        help="seconds an idle keep-alive connection stays open (default %(default)s)",
    )
    p.add_argument(
        "--lock-timeout", type=float, default=300.0,
        help="seconds a statement waits for the engine before 503 (default %(default)s)",
    )
    p.add_argument(
        "--background-nice", type=int, default=10,
        help="nice value of the engine's merge threads, so inserts run first (0: unchanged; default %(default)s)",
    )
    p.add_argument(
        "--verify-inserts-below", type=int, default=1 << 30, metavar="BYTES",
        help="with less than this free on the data disk (or after an out-of-space error), check each part an "
        "INSERT writes and refuse the INSERT (NOT_ENOUGH_SPACE) when one came out broken (0: never; default %(default)s)",
    )
    p.add_argument("--fault-break-insert-parts", metavar="TABLE,...", default=(), help=argparse.SUPPRESS,
                   type=lambda text: tuple(t for t in text.split(",") if t))


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check"], help="check: validate and print the effective config")


def _decode(p: argparse.ArgumentParser) -> None:
    # the formats of sensorhub.decoders.FORMATS (a test holds them equal)
    p.add_argument("--format", required=True, choices=["frame", "ilp", "json", "sparkplug"], help="payload format")
    p.add_argument("--device", default=None, help="the device the topic would name")
    p.add_argument("file", nargs="?", default="-", help="payload file, or - for standard input")


def _dlq(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("--source", help="only this source")
    p.add_argument("--limit", type=int, default=50, help="list: rows to show")
    p.add_argument("--dry-run", action="store_true", help="replay: decode and report, store nothing")
    p.add_argument("--clickhouse", metavar="URL")
    p.add_argument("--json", action="store_true")


def _ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, metavar="NAME", help="a name under [sources] (default: mqtt)")


def _metrics_exporter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: redis.url)")
    p.add_argument("--host", help="listen address (default: metrics.prometheus_host)")
    p.add_argument("--port", type=int, help="listen port (default: metrics.prometheus_port, 9108; 0: no endpoint)")
    p.add_argument("--stale-after", type=float, default=5.0, help="heartbeat age that makes a process down (s)")
    p.add_argument("--exit-after", type=float, default=0.0, help="stop after this many seconds (0: on SIGTERM)")


def _monitor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: redis.url)")
    p.add_argument("--clickhouse", metavar="URL", help="ClickHouse URL (default: clickhouse.url)")
    p.add_argument("--stack", metavar="DIR", type=Path, help="use the Redis and ClickHouse of a running `sensorhub stack`")
    p.add_argument("--no-clickhouse", action="store_true", help="do not query ClickHouse (totals unknown)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--json", action="store_true", help="print the state as JSON and exit")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes (0.1 .. 1, default 1)")
    p.add_argument("--stale-after", type=float, default=5.0, help="a heartbeat older than this is stale (s)")
    p.add_argument("--width", type=int, default=0, help="--once: render for this many columns (default: terminal)")
    p.add_argument("--height", type=int, default=0, help="--once: render for this many lines (default: terminal)")
    p.add_argument("--exit-after", type=float, default=0.0, help="live view: exit after this many seconds (0: on q)")


def _query(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help="one statement, e.g. \"SELECT count() FROM readings\"")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--clickhouse", metavar="URL",
                       help="a ClickHouse HTTP endpoint, http://HOST:PORT[/DATABASE] (default: clickhouse.url)")
    where.add_argument("--stack", metavar="DIR", help="the ClickHouse of a running `sensorhub stack`")
    where.add_argument("--data", metavar="DIR", help="open an embedded ClickHouse data directory directly (server stopped)")
    p.add_argument("--database", help="run in this database (default: clickhouse.database)")
    p.add_argument("--format", default="PrettyCompactMonoBlock", help="ClickHouse output format")


def _speed(text: str) -> float | None:
    """``--speed``: a positive factor, or ``max`` (None: as fast as possible)."""
    if text == "max":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive number or 'max'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("a positive number or 'max'")
    return v


def _replay(p: argparse.ArgumentParser) -> None:
    p.add_argument("capture", type=Path, help="capture file (*.jsonl.zst)")
    p.add_argument("--venue", required=True, help="venue driver, e.g. binance (docs/exchanges.md lists them)")
    p.add_argument("--symbols", default="", help="comma-separated normalized symbols (default: the capture header's trades)")
    p.add_argument("--speed", type=_speed, default=1.0, help="N times the recorded pace, or 'max' (default 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--http-port", type=int, default=0, help="REST replay port when the capture holds REST exchanges")
    p.add_argument("--drop-after", type=int, default=0, help="drop a connection after N frames (reconnect tests)")
    p.add_argument("--drops", type=int, default=1, help="how many connections to drop in all")
    p.add_argument("--overlap", type=int, default=20, help="frames resent after a drop")
    p.add_argument("--strict", action="store_true", help="close connections that subscribe to what the capture lacks")
    p.add_argument("--exit-when-done", action="store_true", help="exit once every recorded connection was sent")
    p.add_argument("--stack", metavar="DIR", help="run the venue's ingest into the stack in DIR; wait for every trade")
    p.add_argument("--stack-timeout", type=float, default=60.0,
                   help="with --stack: seconds to wait for the trades after the recording was sent")


def _schema(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action", nargs="?", choices=["print", "apply", "migrate"], default="print",
        help="print the DDL; apply it (create what is missing); migrate a database an older sensorhub "
        "wrote, or whose retention settings changed, to this version (stop the writers first)",
    )
    p.add_argument("--clickhouse", metavar="URL", help="override clickhouse.url (http://HOST:PORT[/DATABASE])")
    p.add_argument("--database", help="override clickhouse.database")
    p.add_argument("--cluster", help="generate Replicated*/Distributed DDL for this cluster")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["add", "remove", "list"])
    p.add_argument("name", nargs="?", help="device id: its MQTT user name")
    p.add_argument("--stack", metavar="DIR", help="the broker of a running `sensorhub stack`")
    p.add_argument("--password-file", metavar="FILE", help="an installed broker's mosquitto password file")
    p.add_argument("--reload-pid", type=int, help="with --password-file: the broker's pid, sent SIGHUP")
    p.add_argument("--json", action="store_true", help="print JSON ({\"username\", \"password\"} for add)")


def _stack(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "status", "down", "rotate", "_supervise"])
    p.add_argument("--dir", required=True, type=Path, help="run directory (data, logs, state)")
    p.add_argument("--json", action="store_true", help="print JSON (up and status)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--redis-maxmemory", help="e.g. 64mb: Redis refuses writes past it (noeviction)")
    p.add_argument("--insecure", action="store_true",
                   help="no passwords, no TLS, anonymous MQTT (debugging only; the default is secured)")
    p.add_argument("--redis-cluster", type=int, default=0, metavar="M",
                   help="up: a Redis Cluster of M masters (3 or more) instead of one Redis")
    p.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="up, with --redis-cluster: replicas per master (default %(default)s)")
    p.add_argument("--ingests", type=int, default=1, metavar="K",
                   help="up: K ingests sharing the devices (MQTT v5 shared subscription; default %(default)s)")
    p.add_argument("--writers", type=int, default=1, metavar="W",
                   help="up: W writers in the one consumer group (default %(default)s)")
    p.add_argument("--secret", metavar="NAME", help="rotate: the account, as named under DIR/secrets "
                   "(mqtt-sensorhub-ingest, redis-writer, clickhouse-writer, ...)")


def _writer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--consumer", help="consumer name (default writer.consumer or writer-<host>-<pid>)")


# name -> command; keep sorted. A command is listed only once it works.
COMMANDS: dict[str, Command] = {
    "alerts": Command(
        "threshold alerts: evaluate the rules on live readings, serve them over WebSocket, list the open ones",
        "sensorhub.alerts.cmd_alerts", _alerts),
    "audit": Command(
        "show per source and minute: received, written to Redis, inserted, stored; name gaps",
        "sensorhub.pipeline.cmd_audit", _audit),
    "chdb-server": Command(
        "serve the embedded ClickHouse engine (chdb) over the ClickHouse HTTP interface",
        "sensorhub.chdb_server.cli", _chdb_server),
    "config": Command(
        "check the configuration and print it (secrets masked)",
        "sensorhub.cmd_config", _config),
    "decode": Command(
        "decode one payload (file or stdin) and print its readings as JSON lines",
        "sensorhub.decoders.cmd_decode", _decode),
    "device": Command(
        "add, remove or list the broker accounts of devices (a device publishes only as itself)",
        "sensorhub.security.cmd_device", _device),
    "dlq": Command(
        "list dead letters, or replay them through the decoders after a fix (no duplicates)",
        "sensorhub.pipeline.cmd_dlq", _dlq),
    "ingest": Command(
        "run one source: receive, decode, write to Redis, acknowledge",
        "sensorhub.pipeline.cmd_ingest", _ingest),
    "metrics-exporter": Command(
        "serve Prometheus /metrics for every sensorhub process, read from Redis",
        "sensorhub.metrics.prometheus", _metrics_exporter),
    "monitor": Command(
        "live status screen: sources, pipeline lag, latency, dead letters, totals (--once, --json)",
        "sensorhub.monitor.cmd_monitor", _monitor),
    "query": Command(
        "run a SQL statement and print the result (ClickHouse URL, --stack DIR, or --data DIR)",
        "sensorhub.sinks.cmd_query", _query),
    "replay": Command(
        "serve a recorded exchange capture on a loopback WebSocket, as the venue would",
        "sensorhub.replay.cmd_replay", _replay),
    "schema": Command(
        "print, apply or migrate the ClickHouse schema (idempotent)",
        "sensorhub.sinks.cmd_schema", _schema),
    "stack": Command(
        "run the whole appliance on private loopback ports (up, status, down)",
        "sensorhub.service.stack", _stack),
    "writer": Command(
        "move stream entries into ClickHouse exactly once",
        "sensorhub.pipeline.cmd_writer", _writer),
}
