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

Scale-out (docs/operations.md): ``--redis-cluster M --replicas R`` runs a Redis Cluster instead of
the one redis-server: children ``redis-1..M*(1+R)`` on loopback ports, each with the stack's ACL
file, replicas logging in to their masters as admin (``masteruser``/``masterauth`` in the node's
0600 config file). It is created once (``redis-cli --cluster create``, the password in
``REDISCLI_AUTH``); a restart on the same directory finds it again in the nodes' ``nodes.conf``.
``redis_url`` (and ``monitor.redis_url``) then names every node, a cluster URL, and the JSON gains
``"redis_nodes": [{"url", "pid", "role"}]``. ``--ingests K`` runs ``ingest-1..K`` (sources
``mqtt-1..K``) in one MQTT v5 shared subscription, each with its own client id; ``--writers W``
runs ``writer-1..W`` in the one consumer group. With none of these the children are those above.

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
from sensorhub.service import redis_cluster, stack_services
from sensorhub.service.supervisor import ChildSpec, Supervisor

__all__ = ["stack_down", "stack_rotate", "stack_status", "stack_up"]

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
HOST = "127.0.0.1"
CHILDREN = ("mosquitto", "redis", "chdb-server", "ingest", "writer")  # the single-node defaults
# with --redis-cluster M --replicas R: redis-1..M*(1+R) instead of redis; --ingests K: ingest-1..K;
# --writers W: writer-1..W
INGEST_SHARED_GROUP = "sensorhub-ingest"  # mqtt.shared_group of the ingests with --ingests K > 1
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


def scale(opts: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(masters, replicas, ingests, writers)`` of the options; ``masters`` 0 is a single Redis."""
    return (int(opts.get("redis_cluster") or 0), int(opts.get("replicas", 1)), int(opts.get("ingests") or 1),
            int(opts.get("writers") or 1))


def redis_hosts(ports: dict[str, Any]) -> str:
    """``HOST:PORT`` of the single Redis, or ``HOST:PORT,HOST:PORT,...`` of every cluster node
    (a cluster URL: :func:`sensorhub.pipeline.redisconn.cluster_target`)."""
    nodes = ports.get("redis_nodes")
    if nodes:
        return ",".join(f"{HOST}:{p}" for p in nodes)
    return f"{HOST}:{ports['redis']}"


def _node_name(i: int) -> str:
    return f"redis-{i + 1}"


def _ingest_specs(
    py: str, cfg: list[str], env: dict[str, str], logs: Path, ports: dict[str, int], k: int
) -> list[ChildSpec]:
    """One ingest (``ingest``, source ``mqtt``), or ``k`` sharing the devices: ``ingest-1..k``, sources
    ``mqtt-1..k``, each with its own client id (its own persistent session) in one MQTT v5 shared
    subscription group; only ``ingest-1`` runs the Sparkplug host (one host application, one connection)."""
    if k == 1:
        return [ChildSpec("ingest", (py, "-m", "sensorhub", *cfg, "ingest", "--source", "mqtt"), env=env,
                          output=str(logs / "ingest.log"), start_timeout_s=60)]
    out = []
    for i in range(1, k + 1):
        source = f"mqtt-{i}"
        extra = {
            "SENSORHUB_MQTT_CLIENT_ID": f"sensorhub-ingest-{ports['mqtt']}-{i}",
            "SENSORHUB_MQTT_SHARED_GROUP": env.get("SENSORHUB_MQTT_SHARED_GROUP", INGEST_SHARED_GROUP),
            "SENSORHUB_SOURCES": json.dumps({source: {"driver": "mqtt"}}),
        }
        if i > 1:
            extra["SENSORHUB_MQTT_SPARKPLUG"] = "false"
        out.append(ChildSpec(f"ingest-{i}", (py, "-m", "sensorhub", *cfg, "ingest", "--source", source),
                             env={**env, **extra}, output=str(logs / f"ingest-{i}.log"), start_timeout_s=60))
    return out


def _writer_specs(py: str, cfg: list[str], env: dict[str, str], logs: Path, w: int) -> list[ChildSpec]:
    """``writer`` (consumer ``writer-1``), or ``writer-1..w``, consumers of one group."""
    names = ["writer"] if w == 1 else [f"writer-{i}" for i in range(1, w + 1)]
    return [ChildSpec(name, (py, "-m", "sensorhub", *cfg, "writer", "--consumer", f"writer-{i}"), env=env,
                      output=str(logs / f"{name}.log"), start_timeout_s=120)
            for i, name in enumerate(names, 1)]


def _redis_specs(
    d: Path, ports: dict[str, Any], opts: dict[str, Any], creds: Credentials | None, logs: Path
) -> list[ChildSpec]:
    """``redis``, or the cluster's nodes ``redis-1..M`` (each with the stack's ACL file; with the
    admin account as ``masteruser``/``masterauth`` in its own 0600 config file)."""
    aclfile = creds.redis_acl_file if creds is not None else None
    if not ports.get("redis_nodes"):
        return [ChildSpec("redis", tuple(stack_services.redis_argv(d, ports["redis"], HOST, opts.get("redis_maxmemory"),
                                                                   aclfile)),
                          notify=False, output=str(logs / "redis.log"))]
    admin = creds.password("redis", "admin") if creds is not None else None
    server = stack_services.binary("redis-server", "/usr/bin")
    return [
        ChildSpec(_node_name(i), tuple(redis_cluster.node_argv(
            d, port, HOST, aclfile=aclfile, admin_password=admin, maxmemory=opts.get("redis_maxmemory"),
            redis_server=server)), notify=False, output=str(logs / f"{_node_name(i)}.log"))
        for i, port in enumerate(ports["redis_nodes"])
    ]


def _specs(
    d: Path, ports: dict[str, Any], opts: dict[str, Any], creds: Credentials | None
) -> tuple[list[ChildSpec], list[ChildSpec]]:
    """``(services, pipeline)``: the broker, Redis and the chdb-server; the ingests, writers and alerts."""
    py = sys.executable
    logs = d / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _masters, _replicas, ingests, writers = scale(opts)
    env = {
        "SENSORHUB_MQTT_HOST": HOST,
        "SENSORHUB_MQTT_PORT": str(ports["mqtt"]),
        "SENSORHUB_MQTT_CLIENT_ID": f"sensorhub-ingest-{ports['mqtt']}",
        "SENSORHUB_REDIS_URL": f"redis://{redis_hosts(ports)}/0",
        "SENSORHUB_CLICKHOUSE_URL": f"http://{HOST}:{ports['clickhouse']}/{opts.get('database', DEFAULT_DATABASE)}",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(opts.get("env", {}))
    cfg = ["--config", opts["config"]] if opts.get("config") else []
    broker = None
    chdb_extra: list[str] = []
    if creds is not None:
        broker = stack_services.BrokerSecurity(
            creds.mqtt_password_file, creds.mqtt_acl_file, ports["mqtt_tls"], HOST, creds.ca_file,
            creds.server_cert.cert, creds.server_cert.key,
        )
        chdb_extra = ["--users-file", str(creds.chdb_users_file)]
    services = [
        ChildSpec("mosquitto", tuple(stack_services.mosquitto_argv(d, ports["mqtt"], HOST, broker)), notify=False,
                  output=str(logs / "mosquitto.log")),
        *_redis_specs(d, ports, opts, creds, logs),
        ChildSpec("chdb-server", tuple(stack_services.chdb_argv(d, ports["clickhouse"], HOST, py, extra=chdb_extra)),
                  notify=False, output=str(logs / "chdb-server.log")),
    ]
    pipeline = [
        *_ingest_specs(py, cfg, {**env, **_child_env(creds, "ingest", "monitor")}, logs, ports, ingests),
        *_writer_specs(py, cfg, {**env, **_child_env(creds, "writer", "writer")}, logs, writers),
        *_alert_specs(py, cfg, {**env, **_child_env(creds, "alerts", "writer")}, logs, ports, creds),
    ]
    return services, pipeline


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


def _node_role(port: int, creds: Credentials | None) -> str:
    """``master`` or ``replica`` as the node on ``port`` says now (a failover swaps them), ``down`` if it
    does not answer."""
    import redis

    user, password = ("admin", creds.password("redis", "admin")) if creds is not None else (None, None)
    r = redis.Redis(host=HOST, port=port, username=user, password=password, socket_timeout=1.0,
                    socket_connect_timeout=1.0)
    try:
        role = str(r.info("replication").get("role"))
    except (redis.RedisError, OSError):
        return "down"
    finally:
        r.close()
    return "replica" if role == "slave" else role


def _public(state: dict[str, Any], sup: Supervisor | None = None) -> dict[str, Any]:
    pids = dict(state.get("pids", {}))
    database = str(state.get("database") or DEFAULT_DATABASE)
    if sup is not None:
        pids = {n: s.pid for n, s in sup.states().items()}
    ports = state["ports"]
    redis_at = f"{redis_hosts(ports)}/0"
    ch_at = f"{HOST}:{ports['clickhouse']}/{database}"
    secure = bool(state.get("secure")) and state.get("dir") is not None
    creds = Credentials(Path(state["dir"])) if secure else None
    mqtt: dict[str, Any] = {"host": HOST, "port": ports["mqtt"]}
    urls: dict[str, Any] = {"redis_url": f"redis://{redis_at}", "clickhouse_url": f"http://{ch_at}"}
    monitor = dict(urls)
    if creds is not None:
        mqtt.update(tls_port=ports["mqtt_tls"], ca_file=str(creds.ca_file), username=TOOLS_ACCOUNT,
                    password=creds.password("mqtt", TOOLS_ACCOUNT))
        urls = {"redis_url": f"redis://admin:{creds.password('redis', 'admin')}@{redis_at}",
                "clickhouse_url": f"http://admin:{creds.password('clickhouse', 'admin')}@{ch_at}"}
        monitor = {"redis_url": f"redis://monitor:{creds.password('redis', 'monitor')}@{redis_at}",
                   "clickhouse_url": f"http://monitor:{creds.password('clickhouse', 'monitor')}@{ch_at}"}
        if "alerts" in ports:
            urls["alerts_token"] = creds.alerts_token()
    nodes: dict[str, Any] = {}
    if ports.get("redis_nodes"):
        # each node's own URL (no account: log in with the redis_url's), its pid, its role now
        nodes["redis_nodes"] = [
            {"url": f"redis://{HOST}:{port}/0", "pid": pids.get(_node_name(i)),
             "role": _node_role(port, creds) if pids.get(_node_name(i)) else "down"}
            for i, port in enumerate(ports["redis_nodes"])
        ]
    return {
        "mqtt": mqtt,
        **urls,
        "clickhouse_database": database,
        "monitor": monitor,
        "secure": secure,
        "pids": pids,
        **nodes,
        "supervisor_pid": state.get("supervisor_pid"),
        "dir": state.get("dir"),
        "ready": state.get("ready", False),
        "restarts": state.get("restarts", {}),
        **({"alerts_url": f"ws://{HOST}:{ports['alerts']}/alerts"} if "alerts" in ports else {}),
    }


def _ensure_cluster(d: Path, ports: dict[str, Any], replicas: int, creds: Credentials | None,
                    timeout_s: float = 60.0) -> bool:
    """Create the cluster of ``ports["redis_nodes"]`` unless it exists; wait until it is ok.

    A node started again from its ``nodes-<port>.conf`` knows its cluster: then nothing is created
    (``redis-cli --cluster create`` would refuse a node that already has slots, and must not run
    twice). Only when every node knows itself alone, with no slot, is it created, once, masters first
    in port order. Returns whether it created it.
    """
    user, password = ("admin", creds.password("redis", "admin")) if creds is not None else (None, None)
    nodes = [(HOST, p) for p in ports["redis_nodes"]]
    import redis

    try:
        states = [redis_cluster.node_state(h, p, user, password) for h, p in nodes]
    except (redis.RedisError, OSError) as exc:
        raise SensorhubError(f"the Redis Cluster nodes on {ports['redis_nodes']} do not answer: {exc}") from exc
    fresh = all(int(s.get("cluster_known_nodes", 0)) <= 1 and int(s.get("cluster_slots_assigned", 0)) == 0
                for s in states)
    if fresh:
        argv = redis_cluster.create_argv(nodes, replicas, user=user,
                                         redis_cli=stack_services.binary("redis-cli", "/usr/bin"))
        log.info("creating the Redis Cluster: %s", " ".join(argv))
        # the password in REDISCLI_AUTH, never in argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                             env=redis_cluster.create_env(password), check=False)
        if out.returncode != 0:
            raise SensorhubError(f"redis-cli --cluster create failed (status {out.returncode}): "
                                 f"{(out.stdout + out.stderr).strip()[-2000:]}")
    redis_cluster.wait_ok(nodes, replicas, timeout_s, user, password)
    return fresh


def supervise(d: Path, opts: dict[str, Any]) -> int:
    """Run in the background: start the children, keep them up, record their pids.

    On a Redis Cluster the broker, the nodes and the chdb-server start first; once every node
    answers, the cluster is created (the first time) and ok, and only then the ingests, writers
    and alerts start. They stop first, while the services they drain into still run.
    """
    state = _read_state(d)
    masters, replicas, _ingests, _writers = scale(opts)
    ports = state.get("ports") or {}
    ports.setdefault("mqtt", stack_services.free_port(HOST))
    ports.setdefault("clickhouse", stack_services.free_port(HOST))
    if masters:
        # kept with the directory: a restart finds each node's nodes.conf under its port
        ports.setdefault("redis_nodes", redis_cluster.free_ports(masters * (1 + replicas), HOST))
    else:
        ports.setdefault("redis", stack_services.free_port(HOST))
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
    service_specs, pipeline_specs = _specs(d, ports, opts, creds)
    services, pipeline = Supervisor(service_specs), Supervisor(pipeline_specs)
    redis_ports = ports.get("redis_nodes") or [ports["redis"]]
    stopping = False

    def on_term(_sig: int, _frm: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    services.start()
    pipeline_started = False
    if not masters:
        pipeline.start()  # a single Redis: everything at once, as the children wait for their peers
        pipeline_started = True
    try:
        while not stopping:
            states = {**services.states(), **pipeline.states()}
            redis_up = all(stack_services.redis_ready(HOST, p) for p in redis_ports)
            if not pipeline_started and redis_up and all(s.ready for s in services.states().values()):
                try:
                    state["cluster_created"] = _ensure_cluster(d, ports, replicas, creds) or bool(
                        state.get("cluster_created"))
                except SensorhubError as exc:
                    log.error("%s", exc)
                    state["failed"] = {"redis-cluster": {"status": None, "log": str(d / "supervisor.log")}}
                    state["ready"] = False
                    _write_state(d, state)
                    return 1
                pipeline.start()
                pipeline_started = True
                states = {**services.states(), **pipeline.states()}
            ready = pipeline_started and all(
                s.ready for s in states.values()
            ) and redis_up and stack_services.http_ready(f"http://{HOST}:{ports['clickhouse']}")
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
        # writers and ingests first so they drain into services still running
        pipeline.stop()
        services.stop()
        state["pids"] = {}
        state["ready"] = False
        state["supervisor_pid"] = None
        _write_state(d, state)
    return 0


def _log_tail(log_path: Path, since: int = 0) -> str:
    """The last 64 KiB of a child's log, from byte ``since`` on; empty if it cannot be read."""
    try:
        with log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 65536))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _error_line(log_path: Path) -> str:
    """The error line a failed child printed last (``configuration error: ...``), if any."""
    for line in reversed(_log_tail(log_path).splitlines()):
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


def _check_scale(d: Path, state: dict[str, Any], opts: dict[str, Any]) -> None:
    """A directory keeps its Redis (one, or a cluster of so many nodes): its data is there."""
    masters, replicas, ingests, writers = scale(opts)
    if masters and masters < 3:
        raise SensorhubError(f"--redis-cluster {masters}: a Redis Cluster needs 3 masters or more")
    if replicas < 0 or ingests < 1 or writers < 1:
        raise SensorhubError("--replicas is 0 or more, --ingests and --writers 1 or more")
    ports = state.get("ports") or {}
    had = len(ports.get("redis_nodes") or [])
    want = masters * (1 + replicas)
    if ports and had != want:
        was = f"a Redis Cluster of {had} nodes" if had else "a single Redis"
        now = f"--redis-cluster {masters} --replicas {replicas}" if masters else "a single Redis"
        raise SensorhubError(f"the stack in {d} has {was}; it cannot start with {now} (another --dir, or the same "
                             "options as before)")


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
    _check_scale(d, state, opts)
    if state.pop("failed", None) is not None:
        _write_state(d, state)
    (d / "opts.json").write_text(json.dumps(opts))
    for attempt in range(1, PORT_ATTEMPTS + 1):
        logs_before = {p.name: p.stat().st_size for p in (d / "logs").glob("*.log")}
        try:
            return _start_supervisor(d, timeout_s)
        except SensorhubError as exc:
            state = _read_state(d)
            taken = _ports_taken(d, state, logs_before)
            if not taken or attempt == PORT_ATTEMPTS:
                raise
            # the port was free when the stack chose it; another program took it since
            log.warning("%s: port taken by another program, starting again on another port (%s)",
                        ", ".join(sorted(taken)), exc)
            for keys in taken.values():
                for key in keys:
                    state.get("ports", {}).pop(key, None)
            state.pop("failed", None)
            _write_state(d, state)
    raise AssertionError("unreachable")


# Which ports of the stack's state a child listens on: the ones chosen again when another
# program holds one (a Redis Cluster keeps its nodes' ports: nodes.conf names them).
_CHILD_PORTS = {"mosquitto": ("mqtt", "mqtt_tls"), "chdb-server": ("clickhouse",), "redis": ("redis",),
                "alerts-gateway": ("alerts",)}
PORT_ATTEMPTS = 3


def _ports_taken(d: Path, state: dict[str, Any], logs_before: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """The failed children whose log says, since ``logs_before`` (each log's size then), that
    their address was in use, each with the keys of its ports in the state."""
    keys: dict[str, tuple[str, ...]] = {}
    for name, f in (state.get("failed") or {}).items():
        if name not in _CHILD_PORTS:
            continue
        path = Path(f.get("log", d / "logs" / f"{name}.log"))
        tail = _log_tail(path, logs_before.get(path.name, 0)).lower()
        if "address already in use" in tail:
            keys[name] = _CHILD_PORTS[name]
    return keys


def _start_supervisor(d: Path, timeout_s: float) -> dict[str, Any]:
    """Start the supervisor of ``d`` in the background and wait until the stack is ready."""
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
    """Stop the supervisor (it stops every child by PID, pipeline first); then any child it left,
    each cluster node included, by the PID it recorded."""
    st = _read_state(d.resolve())
    pid = st.get("supervisor_pid")
    if not pid or not _alive(pid):
        return False
    children = [int(p) for p in (st.get("pids") or {}).values() if p]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    # each child leads its own process group, so the supervisor's end does not take it along
    left = [c for c in children if _alive(c)]
    for c in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(c, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(c) for c in left):
        time.sleep(0.1)
    for c in left:
        if _alive(c):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c, signal.SIGKILL)
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
    admins: list[Any] = []
    if service == "redis":
        import redis

        # authenticated before the change, so that rotating admin itself can still reload; one
        # connection per node of a cluster (each loads the ACL file on its own)
        for port in st["ports"].get("redis_nodes") or [st["ports"]["redis"]]:
            admins.append(redis.Redis(host=HOST, port=port, username="admin",
                                      password=creds.password("redis", "admin"), socket_timeout=5))
            admins[-1].ping()
    if secret == f"mqtt-{INGEST_ACCOUNT}":
        _rotate_ingest_account(d, creds)
        return
    password = creds.rotate(service, account)
    if service == "mqtt":
        os.kill(int(st["pids"]["mosquitto"]), signal.SIGHUP)
    for admin in admins:
        if account == "admin" and st["ports"].get("redis_nodes"):
            # a replica logs in to its master as admin: the new password, now and in its config file
            # (before ACL LOAD, which may end this connection of the changed user)
            admin.config_set("masterauth", password)
        admin.execute_command("ACL", "LOAD")
        admin.close()
    if account == "admin" and st["ports"].get("redis_nodes"):
        for port in st["ports"]["redis_nodes"]:
            redis_cluster.node_argv(d, port, HOST, aclfile=creds.redis_acl_file, admin_password=password)


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
    names = sorted(n for n in _read_state(d)["pids"] if n == "ingest" or n.startswith("ingest-"))
    for name in names:  # one at a time: the others keep taking the shared subscription's messages
        pid = int(_read_state(d)["pids"][name])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = _read_state(d)
            if st.get("ready") and st["pids"].get(name) not in (None, pid):
                break
            time.sleep(0.1)
        else:
            raise SensorhubError(f"{name} did not come back within {timeout_s:.0f} s; the old account "
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
        if args.redis_cluster:
            opts["redis_cluster"] = args.redis_cluster
            opts["replicas"] = args.replicas
        if args.ingests != 1:
            opts["ingests"] = args.ingests
        if args.writers != 1:
            opts["writers"] = args.writers
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
