"""``sensorhub chdb-server``: the embedded ClickHouse (chdb) served over the ClickHouse HTTP interface."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

from sensorhub.chdb_server.engine import Engine
from sensorhub.chdb_server.server import ChdbHTTPServer, QueryRunner, ServerConfig, SessionStore
from sensorhub.chdb_server.threads import BackgroundPriority
from sensorhub.errors import ConfigError
from sensorhub.service.lifecycle import DEFAULT_DRAIN_S, Lifecycle

__all__ = ["run", "serve"]

log = logging.getLogger(__name__)

def _config(args: argparse.Namespace) -> ServerConfig:
    if not 0 <= args.port <= 65535:
        raise ConfigError("chdb-server.port", "0..65535", args.port)
    for name in ("max_body_bytes", "spool_bytes", "max_connections", "max_sessions"):
        if getattr(args, name) < 1:
            raise ConfigError(f"chdb-server.{name}", "a positive integer", getattr(args, name))
    if not 0 <= args.background_nice <= 19:
        raise ConfigError("chdb-server.background_nice", "0..19", args.background_nice)
    for name in ("idle_timeout", "lock_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"chdb-server.{name}", "seconds > 0", getattr(args, name))
    spool = args.insert_spool_dir
    if spool is not None and not (os.path.isdir(spool) and os.access(spool, os.W_OK | os.X_OK)):
        raise ConfigError("chdb-server.insert_spool_dir", "an existing writable directory", spool)
    return ServerConfig(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data).resolve(),
        user=args.user,
        password=args.password,
        max_body_bytes=args.max_body_bytes,
        spool_bytes=args.spool_bytes,
        tmp_dir=Path(args.tmp_dir) if args.tmp_dir else None,
        insert_spool_dir=Path(args.insert_spool_dir) if args.insert_spool_dir else None,
        max_connections=args.max_connections,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        lock_timeout_s=args.lock_timeout,
        background_nice=args.background_nice,
    )


def serve(config: ServerConfig, life: Lifecycle) -> int:
    """Serve until ``life.stop`` is set; then close the engine so everything is on disk."""
    engine = Engine(config.data_dir, lock_timeout_s=config.lock_timeout_s, insert_spool_dir=config.insert_spool_dir)
    runner = QueryRunner(
        engine,
        SessionStore(config.max_sessions, config.default_session_timeout_s, config.max_session_timeout_s),
    )
    try:
        server = ChdbHTTPServer(config, runner)
    except OSError as exc:
        engine.close()
        raise ConfigError("chdb-server.port", f"a free port on {config.host}", f"{config.port}: {exc}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    host, port = config.host, int(server.server_address[1])
    life.ready(f"ClickHouse {engine.version} on http://{host}:{port}, data {config.data_dir}")
    log.info(
        "chdb-server ready: http://%s:%s (ClickHouse %s, data %s, auth %s)",
        host, port, engine.version, config.data_dir, "on" if config.password is not None else "off",
    )
    background = BackgroundPriority(config.background_nice)
    background.apply()
    while not life.stop.wait(1.0):
        life.watchdog.tick()
        background.apply()  # the engine starts its pool threads when first needed
    log.info("chdb-server stopping (%s)", life.stop_reason)
    server.shutdown()
    server.server_close()
    thread.join(5.0)
    # within systemd's stop timeout; the lifecycle's drain bound
    engine.close(timeout_s=min(config.lock_timeout_s, DEFAULT_DRAIN_S))
    log.info("chdb-server stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sensorhub chdb-server``; exits 0 on SIGTERM/SIGINT."""
    config = _config(args)
    life = Lifecycle("chdb-server")
    life.install_signal_handlers()
    try:
        return serve(config, life)
    finally:
        life.restore_signal_handlers()
