"""``sensorhub chdb-server``: the embedded ClickHouse (chdb) served over the ClickHouse HTTP interface.

The users file (or password file) and the certificate are read before the
engine is opened, so a bad one is a configuration error (exit status 78)
that names the file and the form it must have. SIGHUP has the users file read
again (it is also read again whenever it changes).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import threading
from pathlib import Path

from sensorhub.chdb_server.auth import Accounts
from sensorhub.chdb_server.engine import Engine
from sensorhub.chdb_server.server import (
    ChdbHTTPServer,
    QueryRunner,
    ServerConfig,
    SessionStore,
    server_tls_context,
)
from sensorhub.chdb_server.threads import BackgroundPriority
from sensorhub.errors import ConfigError
from sensorhub.service.lifecycle import DEFAULT_DRAIN_S, Lifecycle

__all__ = ["accounts_of", "run", "serve", "tls_of"]

log = logging.getLogger(__name__)

def _config(args: argparse.Namespace) -> ServerConfig:
    if not 0 <= args.port <= 65535:
        raise ConfigError("chdb-server.port", "0..65535", args.port)
    for name in ("max_body_bytes", "spool_bytes", "max_connections", "max_sessions"):
        if getattr(args, name) < 1:
            raise ConfigError(f"chdb-server.{name}", "a positive integer", getattr(args, name))
    if args.verify_inserts_below < 0:
        raise ConfigError("chdb-server.verify_inserts_below", "bytes >= 0", args.verify_inserts_below)
    if not 0 <= args.background_nice <= 19:
        raise ConfigError("chdb-server.background_nice", "0..19", args.background_nice)
    for name in ("idle_timeout", "lock_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"chdb-server.{name}", "seconds > 0", getattr(args, name))
    spool = args.insert_spool_dir
    if spool is not None and not (os.path.isdir(spool) and os.access(spool, os.W_OK | os.X_OK)):
        raise ConfigError("chdb-server.insert_spool_dir", "an existing writable directory", spool)
    if args.users_file and args.password_file:
        raise ConfigError("--password-file", "either --users-file or --password-file, not both", args.password_file)
    if args.user != "default" and not args.password_file:
        raise ConfigError("--user", "--user with --password-file (a users file names its own users)", args.user)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert", "--tls-cert and --tls-key together", args.tls_cert or args.tls_key)
    return ServerConfig(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data).resolve(),
        user=args.user,
        password_file=Path(args.password_file) if args.password_file else None,
        users_file=Path(args.users_file) if args.users_file else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        allow_file_functions=args.allow_file_functions,
        max_body_bytes=args.max_body_bytes,
        spool_bytes=args.spool_bytes,
        tmp_dir=Path(args.tmp_dir) if args.tmp_dir else None,
        insert_spool_dir=Path(args.insert_spool_dir) if args.insert_spool_dir else None,
        max_connections=args.max_connections,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        lock_timeout_s=args.lock_timeout,
        background_nice=args.background_nice,
        verify_inserts_below=args.verify_inserts_below,
        fault_break_insert_parts=tuple(args.fault_break_insert_parts),
    )


def accounts_of(config: ServerConfig) -> Accounts:
    """The users ``config`` names (users file, one user and its password file, or none);
    raises :class:`ConfigError` for a file that is unreadable or malformed."""
    if config.users_file is not None:
        return Accounts.from_users_file(config.users_file)
    if config.password_file is not None:
        return Accounts.from_password_file(config.user, config.password_file)
    return Accounts.anonymous()


def tls_of(config: ServerConfig) -> ssl.SSLContext | None:
    """The HTTPS context of ``config`` (None: plain HTTP); raises :class:`ConfigError` for bad files."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        return server_tls_context(config.tls_cert, config.tls_key)
    except OSError as exc:  # ssl.SSLError too
        problem = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else str(exc)
        raise ConfigError(
            "--tls-cert", "a PEM certificate (--tls-cert) and its private key (--tls-key)",
            f"{config.tls_cert}, {config.tls_key}: {problem}",
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(config: ServerConfig, life: Lifecycle) -> int:
    """Serve until ``life.stop`` is set; then close the engine so everything is on disk."""
    accounts = accounts_of(config)
    tls = tls_of(config)
    engine = Engine(
        config.data_dir, lock_timeout_s=config.lock_timeout_s, insert_spool_dir=config.insert_spool_dir,
        verify_inserts_below=config.verify_inserts_below, fault_break_insert_parts=config.fault_break_insert_parts,
    )
    runner = QueryRunner(
        engine,
        SessionStore(config.max_sessions, config.default_session_timeout_s, config.max_session_timeout_s),
        allow_file_functions=config.allow_file_functions,
    )
    try:
        server = ChdbHTTPServer(config, runner, accounts, tls)
    except OSError as exc:
        engine.close()
        raise ConfigError("chdb-server.port", f"a free port on {config.host}", f"{config.port}: {exc}")
    # SIGHUP: read the users file again (its default action would end the server)
    previous_hup = None
    if threading.current_thread() is threading.main_thread():
        previous_hup = signal.signal(signal.SIGHUP, lambda signum, frame: accounts.reload_soon())
    try:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
        thread.start()
        host, port = config.host, int(server.server_address[1])
        scheme = "https" if tls is not None else "http"
        life.ready(f"ClickHouse {engine.version} on {scheme}://{host}:{port}, data {config.data_dir}")
        log.info(
            "chdb-server ready: %s://%s:%s (ClickHouse %s, data %s, auth: %s%s)",
            scheme, host, port, engine.version, config.data_dir, accounts.what,
            f", {len(accounts)} users" if accounts.required else "",
        )
        if not accounts.required and not _is_loopback(host):
            log.warning("chdb-server on %s without authentication: anyone who reaches the port is admin "
                        "(give --users-file)", host)
        if config.allow_file_functions:
            log.warning("--allow-file-functions: statements may read and write the server's files and reach "
                        "the network as this process")
        background = BackgroundPriority(config.background_nice)
        background.apply()
        while not life.stop.wait(1.0):
            life.watchdog.tick()
            background.apply()  # the engine starts its pool threads when first needed
            accounts.refresh()  # after SIGHUP, also when no request comes
        log.info("chdb-server stopping (%s)", life.stop_reason)
        server.shutdown()
        server.server_close()
        thread.join(5.0)
        # within systemd's stop timeout; the lifecycle's drain bound
        engine.close(timeout_s=min(config.lock_timeout_s, DEFAULT_DRAIN_S))
    finally:
        if previous_hup is not None:
            signal.signal(signal.SIGHUP, previous_hup)
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
