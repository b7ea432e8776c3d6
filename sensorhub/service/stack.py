"""``sensorhub stack``: the whole appliance on one box, on private loopback ports, without systemd.

``stack up --dir DIR`` starts a supervisor in the background (its own session)
that runs mosquitto, redis-server, chdb-server, one MQTT ingest and one
writer, each restarted like systemd's ``Restart=always`` when it dies. It
returns once everything is ready and prints::

    {"mqtt": {"host", "port", "tls_port", "ca_file", "username", "password"}, "redis_url", "clickhouse_url",
     "clickhouse_database", "monitor": {"redis_url", "clickhouse_url"}, "secure", "pids": {name: pid}, ...}

It is secured by default (docs/security.md): a private CA and certificates under ``DIR/tls``, a
password per account under ``DIR/secrets`` (mode 0600), the broker default-deny with per-device
ACLs and a TLS listener (``tls_port``) beside the plain one on loopback, Redis with one ACL user per
role and the default user off, the chdb-server asking every client for a password. Each child
gets its own account and reads its password from its file (``*_password_file``), never from argv.
The JSON's ``mqtt.username``/``password`` may publish to every device topic (the simulator and test
tools), ``redis_url`` and ``clickhouse_url`` carry an admin account, ``monitor`` read-only ones.
``stack up --insecure`` runs the open stack of earlier versions, for debugging.

With alert rules in the configuration (``[[alerts.rules]]``) it also runs the
alert evaluator and gateway (children ``alerts-evaluator`` and
``alerts-gateway``), and the JSON gains ``"alerts_url": "ws://HOST:PORT/alerts"``.

``clickhouse_url`` names the database (``http://HOST:PORT/sensorhub``), so a
clickhouse-connect client of that URL (``get_client(dsn=...)``) lands in it.
The configuration is checked before anything starts (the first bad key ends
``stack up`` with status 78, as ``sensorhub config check`` names it); a child
that exits with 78 all the same (a setting only it checks) is not restarted,
and ``stack up`` stops the stack and fails with that child's error line.

``stack status --dir DIR --json`` prints the same with current pids;
``stack down --dir DIR`` stops everything it started, by PID. ``make demo``,
the fault tests and outside tools use it: the names and keys are stable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sensorhub.config import load_settings
from sensorhub.errors import SensorhubError
from sensorhub.security.broker import INGEST_ACCOUNT, TOOLS_ACCOUNT
from sensorhub.security.credentials import Credentials, ensure_credentials
from sensorhub.service import stack_services
from sensorhub.service.supervisor import ChildSpec, Supervisor

__all__ = ["stack_down", "stack_rotate", "stack_status", "stack_up"]

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
HOST = "127.0.0.1"
CHILDREN = ("mosquitto", "redis", "chdb-server", "ingest", "writer")
ALERT_CHILDREN = ("alerts-evaluator", "alerts-gateway")  # when alert rules are configured
DEFAULT_DATABASE = "sensorhub"


def _state_path(d: Path) -> Path:
    return d / STATE_FILE


def _read_state(d: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(_state_path(d).read_text()))
    except (OSError, ValueError):
        return {}


def _write_state(d: Path, state: dict[str, Any]) -> None:
    tmp = _state_path(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(_state_path(d))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _child_env(creds: Credentials | None, redis_user: str, clickhouse_user: str) -> dict[str, str]:
    """The account a child runs as: user names, and the files its passwords are read from."""
    if creds is None:
        return {}
    return {
        "SENSORHUB_MQTT_USERNAME_FILE": str(creds.ingest_user_file),
        "SENSORHUB_MQTT_PASSWORD_FILE": str(creds.ingest_password_file),
        "SENSORHUB_REDIS_USERNAME": redis_user,
        "SENSORHUB_REDIS_PASSWORD_FILE": str(creds.password_file("redis", redis_user)),
        "SENSORHUB_CLICKHOUSE_USER": clickhouse_user,
        "SENSORHUB_CLICKHOUSE_PASSWORD_FILE": str(creds.password_file("clickhouse", clickhouse_user)),
    }


def _specs(d: Path, ports: dict[str, int], opts: dict[str, Any], creds: Credentials | None) -> list[ChildSpec]:
    py = sys.executable
    logs = d / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        "SENSORHUB_MQTT_HOST": HOST,
        "SENSORHUB_MQTT_PORT": str(ports["mqtt"]),
        "SENSORHUB_MQTT_CLIENT_ID": f"sensorhub-ingest-{ports['mqtt']}",
        "SENSORHUB_REDIS_URL": f"redis://{HOST}:{ports['redis']}/0",
        "SENSORHUB_CLICKHOUSE_URL": f"http://{HOST}:{ports['clickhouse']}/{opts.get('database', DEFAULT_DATABASE)}",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(opts.get("env", {}))
    cfg = ["--config", opts["config"]] if opts.get("config") else []
    broker = redis_acl = None
    chdb_extra: list[str] = []
    if creds is not None:
        broker = stack_services.BrokerSecurity(
            creds.mqtt_password_file, creds.mqtt_acl_file, ports["mqtt_tls"], HOST, creds.ca_file,
            creds.server_cert.cert, creds.server_cert.key,
        )
        redis_acl = creds.redis_acl_file
        chdb_extra = ["--users-file", str(creds.chdb_users_file)]
    return [
        ChildSpec("mosquitto", tuple(stack_services.mosquitto_argv(d, ports["mqtt"], HOST, broker)), notify=False,
                  output=str(logs / "mosquitto.log")),
        ChildSpec("redis", tuple(stack_services.redis_argv(d, ports["redis"], HOST, opts.get("redis_maxmemory"),
                                                           redis_acl)),
                  notify=False, output=str(logs / "redis.log")),
        ChildSpec("chdb-server", tuple(stack_services.chdb_argv(d, ports["clickhouse"], HOST, py, extra=chdb_extra)),
                  notify=False, output=str(logs / "chdb-server.log")),
        ChildSpec("ingest", (py, "-m", "sensorhub", *cfg, "ingest", "--source", "mqtt"),
                  env={**env, **_child_env(creds, "ingest", "monitor")},
                  output=str(logs / "ingest.log"), start_timeout_s=60),
        ChildSpec("writer", (py, "-m", "sensorhub", *cfg, "writer", "--consumer", "writer-1"),
                  env={**env, **_child_env(creds, "writer", "writer")},
                  output=str(logs / "writer.log"), start_timeout_s=120),
        *_alert_specs(py, cfg, {**env, **_child_env(creds, "alerts", "writer")}, logs, ports, creds),
    ]


def _alert_specs(
    py: str, cfg: list[str], env: dict[str, str], logs: Path, ports: dict[str, int], creds: Credentials | None
) -> list[ChildSpec]:
    if "alerts" not in ports:
        return []
    env = {**env, "SENSORHUB_ALERTS_HOST": HOST, "SENSORHUB_ALERTS_PORT": str(ports["alerts"])}
    if creds is not None:
        env["SENSORHUB_ALERTS_TOKEN_FILE"] = str(creds.alerts_token_file)
    return [
        ChildSpec("alerts-evaluator", (py, "-m", "sensorhub", *cfg, "alerts", "evaluate"), env=env,
                  output=str(logs / "alerts-evaluator.log"), start_timeout_s=60),
        ChildSpec("alerts-gateway", (py, "-m", "sensorhub", *cfg, "alerts", "serve"), env=env,
                  output=str(logs / "alerts-gateway.log"), start_timeout_s=60),
    ]


def _public(state: dict[str, Any], sup: Supervisor | None = None) -> dict[str, Any]:
    pids = dict(state.get("pids", {}))
    database = str(state.get("database") or DEFAULT_DATABASE)
    if sup is not None:
        pids = {n: s.pid for n, s in sup.states().items()}
    ports = state["ports"]
    redis_at = f"{HOST}:{ports['redis']}/0"
    ch_at = f"{HOST}:{ports['clickhouse']}/{database}"
    secure = bool(state.get("secure")) and state.get("dir") is not None
    mqtt: dict[str, Any] = {"host": HOST, "port": ports["mqtt"]}
    urls: dict[str, Any] = {"redis_url": f"redis://{redis_at}", "clickhouse_url": f"http://{ch_at}"}
    monitor = dict(urls)
    if secure:
        creds = Credentials(Path(state["dir"]))
        mqtt.update(tls_port=ports["mqtt_tls"], ca_file=str(creds.ca_file), username=TOOLS_ACCOUNT,
                    password=creds.password("mqtt", TOOLS_ACCOUNT))
        urls = {"redis_url": f"redis://admin:{creds.password('redis', 'admin')}@{redis_at}",
                "clickhouse_url": f"http://admin:{creds.password('clickhouse', 'admin')}@{ch_at}"}
        monitor = {"redis_url": f"redis://monitor:{creds.password('redis', 'monitor')}@{redis_at}",
                   "clickhouse_url": f"http://monitor:{creds.password('clickhouse', 'monitor')}@{ch_at}"}
        if "alerts" in ports:
            urls["alerts_token"] = creds.alerts_token()
    return {
        "mqtt": mqtt,
        **urls,
        "clickhouse_database": database,
        "monitor": monitor,
        "secure": secure,
        "pids": pids,
        "supervisor_pid": state.get("supervisor_pid"),
        "dir": state.get("dir"),
        "ready": state.get("ready", False),
        "restarts": state.get("restarts", {}),
        **({"alerts_url": f"ws://{HOST}:{ports['alerts']}/alerts"} if "alerts" in ports else {}),
    }


def supervise(d: Path, opts: dict[str, Any]) -> int:
    """Run in the background: start the children, keep them up, record their pids."""
    state = _read_state(d)
    ports = state.get("ports") or {
        "mqtt": stack_services.free_port(HOST),
        "redis": stack_services.free_port(HOST),
        "clickhouse": stack_services.free_port(HOST),
    }
    if opts.get("alerts"):
        ports.setdefault("alerts", stack_services.free_port(HOST))
    else:
        ports.pop("alerts", None)
    creds = None
    if not opts.get("insecure"):
        ports.setdefault("mqtt_tls", stack_services.free_port(HOST))
        settings = load_settings(opts.get("config"))
        creds = ensure_credentials(d, settings.mqtt.routes, settings.redis.prefix)
    state.update({"ports": ports, "supervisor_pid": os.getpid(), "dir": str(d), "ready": False,
                  "database": opts.get("database", DEFAULT_DATABASE), "secure": creds is not None})
    state.pop("failed", None)
    _write_state(d, state)
    sup = Supervisor(_specs(d, ports, opts, creds))
    stopping = False

    def on_term(_sig: int, _frm: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sup.start()
    try:
        while not stopping:
            states = sup.states()
            ready = all(
                s.ready for s in states.values()
            ) and stack_services.redis_ready(HOST, ports["redis"]) and stack_services.http_ready(f"http://{HOST}:{ports['clickhouse']}")
            state["pids"] = {n: s.pid for n, s in states.items()}
            state["restarts"] = {n: s.restarts for n, s in states.items()}
            state["ready"] = bool(ready)
            failed = {n: s for n, s in states.items() if s.state == "failed"}
            if failed:
                # not restarted (exit 78, or the start limit): the stack cannot come up; say so and stop
                state["failed"] = {
                    n: {"status": s.last_exit, "log": str(d / "logs" / f"{n}.log")} for n, s in failed.items()
                }
                state["ready"] = False
                _write_state(d, state)
                log.error("stopping the stack: %s failed", ", ".join(sorted(failed)))
                return 1
            _write_state(d, state)
            time.sleep(0.2)
    finally:
        # writer and ingest first so they drain into services still running
        sup.stop()
        state["pids"] = {}
        state["ready"] = False
        state["supervisor_pid"] = None
        _write_state(d, state)
    return 0


def _error_line(log_path: Path) -> str:
    """The error line a failed child printed last (``configuration error: ...``), if any."""
    try:
        with log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(("configuration error:", "error:")):
            return line.strip()
    return ""


def _failure(d: Path, failed: dict[str, Any]) -> SensorhubError:
    parts = []
    status = 1
    for name, f in sorted(failed.items()):
        code, path = f.get("status"), Path(f.get("log", d / "logs" / f"{name}.log"))
        what = _error_line(path) or f"see {path}"
        if code == 78:
            status = 78
            parts.append(f"{name} exited with status 78, {what}")
        else:
            parts.append(f"{name} failed (last exit status {code}, not restarted): {what}")
    err = SensorhubError("; ".join(parts) + f"; the stack in {d} is stopped")
    err.exit_status = status
    return err


def stack_up(d: Path, timeout_s: float = 120.0, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start the stack in ``d`` and return its public state once ready.

    The configuration (``opts["config"]`` and the environment) is checked first:
    :class:`~sensorhub.errors.ConfigError` names the first bad key before anything
    starts. A child that fails for good (exit 78) stops the stack, and this raises
    :class:`SensorhubError` with the child's own error line and ``exit_status`` 78.
    """
    opts = dict(opts or {})
    settings = load_settings(opts.get("config"))
    opts.setdefault("database", settings.clickhouse.database)
    opts["alerts"] = bool(settings.alerts.rules)
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    state = _read_state(d)
    if _alive(state.get("supervisor_pid")):
        raise SensorhubError(f"a stack already runs in {d} (supervisor pid {state['supervisor_pid']})")
    if state.pop("failed", None) is not None:
        _write_state(d, state)
    (d / "opts.json").write_text(json.dumps(opts))
    log_f = open(d / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    sup = subprocess.Popen(
        [sys.executable, "-m", "sensorhub", "stack", "_supervise", "--dir", str(d)],
        stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log_f.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = _read_state(d)
        if st.get("failed"):
            sup.wait(timeout=120)  # it stops what it started, then exits
            raise _failure(d, st["failed"])
        if st.get("ready"):
            return _public(st)
        if sup.poll() is not None:
            st = _read_state(d)
            if st.get("failed"):
                raise _failure(d, st["failed"])
            raise SensorhubError(f"the stack supervisor exited with status {sup.returncode} before the stack "
                                 f"was ready; see {d / 'supervisor.log'}")
        time.sleep(0.2)
    raise SensorhubError(f"stack in {d} not ready within {timeout_s:.0f} s; see {d / 'supervisor.log'} "
                         f"and {d / 'logs'}")


def stack_status(d: Path) -> dict[str, Any]:
    st = _read_state(d.resolve())
    if not st.get("ports"):
        raise SensorhubError(f"no stack in {d}")
    pub = _public(st)
    pub["running"] = _alive(st.get("supervisor_pid"))
    return pub


def stack_down(d: Path, timeout_s: float = 60.0) -> bool:
    st = _read_state(d.resolve())
    pid = st.get("supervisor_pid")
    if not pid or not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def stack_rotate(d: Path, secret: str) -> None:
    """A new password for one account of a running secured stack, with no reading lost.

    ``secret`` names the account as its file under ``DIR/secrets`` does (``mqtt-sensorhub-ingest``,
    ``redis-writer``, ``clickhouse-writer``...). The new password goes to its file and to the
    server's; then the server reloads: mosquitto on SIGHUP (it disconnects the sessions of the old
    password; they reconnect with the new one and the broker kept what arrived meanwhile), Redis by
    ``ACL LOAD`` (clients use the new password from their next connection), the chdb-server when
    its users file changes. Every client reads its password file again when it reconnects.
    """
    from sensorhub.pipeline.redisconn import redis_client
    from sensorhub.security.credentials import CLICKHOUSE_USERS, MQTT_ACCOUNTS, REDIS_USERS

    d = d.resolve()
    st = _read_state(d)
    if not _alive(st.get("supervisor_pid")):
        raise SensorhubError(f"no stack runs in {d}")
    if not st.get("secure"):
        raise SensorhubError(f"the stack in {d} runs --insecure: it has no passwords")
    service, _, account = secret.partition("-")
    known = {"mqtt": MQTT_ACCOUNTS, "redis": REDIS_USERS, "clickhouse": CLICKHOUSE_USERS}
    if account not in known.get(service, ()):
        names = sorted(f"{s}-{a}" for s, accounts in known.items() for a in accounts)
        raise SensorhubError(f"no secret {secret!r}; the stack's secrets are {', '.join(names)}")
    creds = Credentials(d)
    admin = None
    if service == "redis":
        # authenticated before the change, so that rotating admin itself can still reload
        admin = redis_client(load_settings().redis, f"redis://admin:{creds.password('redis', 'admin')}@"
                             f"{HOST}:{st['ports']['redis']}/0", socket_timeout=5)
        admin.ping()
    if secret == f"mqtt-{INGEST_ACCOUNT}":
        _rotate_ingest_account(d, creds)
        return
    creds.rotate(service, account)
    if service == "mqtt":
        os.kill(int(st["pids"]["mosquitto"]), signal.SIGHUP)
    elif admin is not None:
        admin.execute_command("ACL", "LOAD")
        admin.close()


def _rotate_ingest_account(d: Path, creds: Credentials, timeout_s: float = 60.0) -> None:
    """The ingest moves to its other account with a new password, then the old one is deleted.

    The broker knows both accounts while the ingest restarts (it drains, then reconnects as the new
    one and resumes its session, which queued what arrived meanwhile); it never re-checks the
    ingest's session against a changed password (mosquitto would drop that session's
    subscriptions).
    """
    def hup() -> None:
        os.kill(int(_read_state(d)["pids"]["mosquitto"]), signal.SIGHUP)

    old, new = creds.rotate_ingest_begin()
    hup()
    creds.rotate_ingest_switch(new)
    pid = int(_read_state(d)["pids"]["ingest"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = _read_state(d)
        if st.get("ready") and st["pids"].get("ingest") not in (None, pid):
            break
        time.sleep(0.1)
    else:
        raise SensorhubError(f"the ingest did not come back within {timeout_s:.0f} s; the old account "
                             f"{old} is kept (run rotate again once it runs)")
    creds.rotate_ingest_end(old)
    hup()


# ---- command line ----
def run(args: argparse.Namespace) -> int:
    d: Path = args.dir
    if args.action == "_supervise":
        saved = json.loads((d / "opts.json").read_text()) if (d / "opts.json").exists() else {}
        return supervise(d.resolve(), saved)
    if args.action == "up":
        opts: dict[str, Any] = {}
        if args.config:
            opts["config"] = str(Path(args.config).resolve())
        if args.redis_maxmemory:
            opts["redis_maxmemory"] = args.redis_maxmemory
        if args.insecure:
            opts["insecure"] = True
        info = stack_up(d, args.timeout, opts)
        print(json.dumps(info) if args.json else json.dumps(info, indent=1))
        return 0
    if args.action == "rotate":
        if not args.secret:
            raise SensorhubError("stack rotate needs --secret NAME (a file name under DIR/secrets)")
        stack_rotate(d, args.secret)
        print(json.dumps({"rotated": args.secret}))
        return 0
    if args.action == "status":
        info = stack_status(d)
        print(json.dumps(info) if args.json else json.dumps(info, indent=1))
        return 0 if info["running"] else 3
    stopped = stack_down(d)
    print("stopped" if stopped else "not running")
    return 0
