"""``sensorhub stack`` is secured by default: every port asks for credentials, devices publish only as
themselves, secrets stay out of argv, and rotating a password loses no reading.

Everything runs against the real processes the stack starts (mosquitto, redis-server,
chdb-server, ingest, writer).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import clickhouse_connect
import paho.mqtt.client as mqtt
import pytest
import redis
from kit.encoders import frame
from kit.store import count, wait_count
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.security import pki
from sensorhub.security.credentials import Credentials

T0_US = (int(time.time()) - 3600) * 1_000_000


def _client(user: str | None, password: str | None, tls_ca: Path | None = None) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"sec-{user}-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5)
    if user is not None:
        c.username_pw_set(user, password)
    if tls_ca is not None:
        c.tls_set_context(ssl.create_default_context(cafile=str(tls_ca)))
    return c


_OPEN: list[mqtt.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _OPEN:
        c = _OPEN.pop()
        c.disconnect()
        c.loop_stop()
        sock = c.socket()
        if sock is not None:
            sock.close()


def _connect(c: mqtt.Client, port: int) -> Any:
    """The CONNACK reason code of connecting ``c`` to ``port``."""
    got: dict[str, Any] = {}
    c.on_connect = lambda _c, _u, _f, rc, _p=None: got.setdefault("rc", rc)
    _OPEN.append(c)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 5
    while "rc" not in got and time.monotonic() < deadline:
        time.sleep(0.02)
    return got.get("rc")


def _sensorhub(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensorhub", *args], capture_output=True, text=True, timeout=timeout)


def _secrets(stack: Any) -> list[str]:
    return [p.read_text().strip() for p in (stack.dir / "secrets").iterdir()
            if not p.name.endswith(("-prefix", "-user"))]  # names, not secrets


def test_every_port_asks_for_credentials_and_devices_publish_only_as_themselves(stack_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    info = stack.info
    mq = info["mqtt"]
    assert info["secure"] and mq["tls_port"] and Path(mq["ca_file"]).is_file()

    # MQTT: anonymous and wrong passwords are refused, on the plain and the TLS listener
    assert str(_connect(_client(None, None), mq["port"])) == "Not authorized"
    assert str(_connect(_client(mq["username"], "wrong"), mq["port"])) == "Not authorized"
    tools = _client(mq["username"], mq["password"], Path(mq["ca_file"]))
    assert str(_connect(tools, mq["tls_port"])) == "Success"
    # a client that trusts another CA refuses the broker's certificate
    other = pki.make_ca(tmp_path / "other-ca")
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(("127.0.0.1", mq["tls_port"]), 5) as raw:
        ssl.create_default_context(cafile=str(other.cert)).wrap_socket(raw, server_hostname="127.0.0.1").close()

    # a device account: publishes under its own device level, nowhere else
    out = _sensorhub("device", "add", "press-7", "--stack", str(stack.dir), "--json")
    assert out.returncode == 0, out.stderr
    cred = json.loads(out.stdout)
    assert cred["username"] == "press-7" and len(cred["password"]) >= 32
    assert cred["password"] not in (stack.dir / "mosquitto" / "passwd").read_text()  # only its hash is kept
    time.sleep(0.3)  # the broker reloads its password file on SIGHUP
    dev = _client("press-7", cred["password"])
    assert str(_connect(dev, mq["port"])) == "Success"
    acks: dict[int, Any] = {}
    dev.on_publish = lambda _c, _u, mid, rc, _p: acks.setdefault(mid, rc)
    own = dev.publish("sensors/l1/press-7/frame", frame("press-7", 1, T0_US, [(1, 0, 0, 1.5)]), qos=1)
    forged = dev.publish("sensors/l1/press-8/frame", frame("press-8", 1, T0_US, [(1, 0, 0, 9.5)]), qos=1)
    own.wait_for_publish(10)
    forged.wait_for_publish(10)
    deadline = time.monotonic() + 5
    while len(acks) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert str(acks[own.mid]) == "Success"
    assert str(acks[forged.mid]) == "Not authorized"  # the publisher is told; nothing reaches the ingest
    ch = stack.ch()
    assert wait_count(ch, "SELECT count() FROM sensorhub.readings WHERE device = 'press-7'", 1) == 1
    time.sleep(1.0)
    assert count(ch, "SELECT count() FROM sensorhub.readings WHERE device = 'press-8'") == 0

    # removed: the broker drops its connection and refuses it from then on
    out = _sensorhub("device", "remove", "press-7", "--stack", str(stack.dir), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["reloaded"], out.stderr
    deadline = time.monotonic() + 5
    while dev.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dev.is_connected()
    dev.loop_stop()
    assert str(_connect(_client("press-7", cred["password"]), mq["port"])) == "Not authorized"

    # Redis: nothing without credentials; the monitor's user reads but cannot write
    port = int(info["redis_url"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    for password in ("", "default", info["redis_url"].split(":")[2].split("@")[0]):  # the default user is off
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, username="default", password=password).ping()
    ro = redis.Redis.from_url(info["monitor"]["redis_url"])
    assert ro.xlen("sh:readings:{0}") >= 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        ro.xadd("sh:readings:{0}", {"b": b"x"})
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(info["redis_url"].replace("admin:", "ingest:")).ping()  # another user's password

    # ClickHouse: a password for every query; the monitor's account only reads
    ch_port = int(info["clickhouse_url"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(Exception, match=r"516|Authentication failed"):
        clickhouse_connect.get_client(host="127.0.0.1", port=ch_port).command("SELECT 1")
    reader = clickhouse_connect.get_client(dsn=info["monitor"]["clickhouse_url"])
    assert reader.command("SELECT count() FROM sensorhub.readings WHERE device = 'press-7'") == 1
    with pytest.raises(Exception, match=r"164|readonly"):
        reader.command("TRUNCATE TABLE sensorhub.readings")

    # no secret in any process's command line; the configuration check masks them
    secrets = _secrets(stack)
    for pid in stack.status()["pids"].values():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(s in cmdline for s in secrets), cmdline
    logs = "".join(p.read_text(errors="replace") for p in (stack.dir / "logs").glob("*.log"))
    assert not any(s in logs for s in secrets)
    out = subprocess.run(
        [sys.executable, "-m", "sensorhub", "config", "check"], capture_output=True, text=True, timeout=60,
        env={"SENSORHUB_CLICKHOUSE_URL": info["clickhouse_url"], "SENSORHUB_REDIS_URL": info["redis_url"],
             "SENSORHUB_MQTT_PASSWORD": mq["password"], "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert not any(s in out.stdout for s in secrets) and "***" in out.stdout
    out = _sensorhub("monitor", "--stack", str(stack.dir), "--once", "--json")
    assert out.returncode == 0 and '"redis"' in out.stdout, out.stderr
    assert not any(s in out.stdout + out.stderr for s in secrets)


def test_rotating_the_mqtt_redis_and_clickhouse_passwords_loses_no_reading(stack_factory, loadtest) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    creds = Credentials(stack.dir)
    before = {n: creds.password(*n.split("-", 1)) for n in ("mqtt-sensorhub-ingest", "redis-ingest", "redis-writer",
                                                           "clickhouse-writer")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "loadtest", "--stack", str(stack.dir), "--rate", "2000",
         "--per-message", "10", "--duration", "8", "--devices", "20", "--format", "frame", "--qos", "1",
         "--drain-timeout", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(2.5)
    for name in before:
        out = _sensorhub("stack", "rotate", "--dir", str(stack.dir), "--secret", name)
        assert out.returncode == 0, out.stderr
        time.sleep(0.5)
    # the ingest reconnects with its new password now; the writer's next connection uses its own
    stack.signal("writer", 15)
    stdout, stderr = proc.communicate(timeout=180)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, stderr
    result = json.loads(lines[-1])
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["mismatched"] == 0, result
    assert result["stored"] == result["published"] > 0
    for name, old in before.items():
        if name != "mqtt-sensorhub-ingest":
            assert creds.password(*name.split("-", 1)) != old
    # the old passwords are refused now
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="writer", password=before["redis-writer"]).ping()
    # the ingest runs as its other account now; the one it had is gone
    assert creds.ingest_user() == "sensorhub-ingest-alt"
    assert str(_connect(_client("sensorhub-ingest", before["mqtt-sensorhub-ingest"]), stack.mqtt_port)) == "Not authorized"


def test_rediss_connects_with_tls_and_checks_the_server(tmp_path: Path) -> None:
    """``redis.url = rediss://...``: TLS to Redis, the server's certificate checked against ``redis.ca_file``."""
    from kit.services import ManagedProcess, free_port, wait_tcp

    from sensorhub.config import load_settings
    from sensorhub.pipeline.redisconn import redis_client

    ca, server = pki.ensure_pki(tmp_path / "tls")
    port = free_port()
    proc = ManagedProcess(
        "redis-tls", ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                      "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
                      "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no", "--save", "",
                      "--dir", str(tmp_path)],
        ready=lambda: wait_tcp("127.0.0.1", port, 0.2), log_path=tmp_path / "redis.log",
    ).start()
    try:
        ok = load_settings(redis={"url": f"rediss://127.0.0.1:{port}/0", "ca_file": str(ca.cert)})
        assert redis_client(ok.redis).ping()
        other = pki.make_ca(tmp_path / "other")
        bad = load_settings(redis={"url": f"rediss://127.0.0.1:{port}/0", "ca_file": str(other.cert)})
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis_client(bad.redis).ping()
    finally:
        proc.terminate()
