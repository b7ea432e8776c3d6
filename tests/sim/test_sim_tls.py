"""The simulator over TLS with passwords, against a real mosquitto with accounts, per-device ACLs and TLS.

One broker for the module (``kit.services.start_mosquitto(secure=True)``); a paho subscriber on
the ingest account, over TLS, sees what arrives.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from firmware_sim.cli import build_parser, main, resolve_targets
from sensorhub.security.tlsctx import client_context

INGEST, TOOLS = "sensorhub-ingest", "sensorhub-tools"


@pytest.fixture(scope="module")
def broker(secure_broker: Any) -> Any:
    return secure_broker


class Seen:
    """A paho subscriber over TLS as the ingest account: (topic, payload) of everything."""

    def __init__(self, broker: Any) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"seen-{uuid.uuid4().hex[:8]}")
        c.username_pw_set(INGEST, broker.accounts[INGEST])
        c.tls_set_context(client_context(broker.ca_file))
        c.on_connect = lambda cl, *_a: cl.subscribe([("sensors/#", 1), ("spBv1.0/#", 1)])
        c.on_subscribe = lambda *_a: ready.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload)))

        c.on_message = on_message
        c.connect("127.0.0.1", broker.tls_port)
        c.loop_start()
        self.client = c
        assert ready.wait(10), "subscription not acknowledged"

    def of(self, prefix: str, n: int, timeout: float = 10.0) -> list[str]:
        """Topics of the messages of devices ``prefix-*`` (NDEATH left out), once ``n`` are in."""
        def mine() -> list[str]:
            with self.lock:
                return [t for t, _p in self.messages if f"/{prefix}-" in t and "/NDEATH/" not in t]
        deadline = time.monotonic() + timeout
        while len(mine()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # anything beyond n would arrive now
        return mine()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def seen(broker: Any) -> Iterator[Seen]:
    s = Seen(broker)
    yield s
    s.close()


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return rc, json.loads(lines[-1]) if lines else {}, err


def _load(prefix: str, tmp_path: Path, *more: str) -> list[str]:
    return ["--devices", "10", "--rate", "2000", "--duration", "0.5", "--json", "--truth", str(tmp_path / "t.truth"),
            "--client-prefix", f"c{prefix}", "--device-prefix", prefix, *more]


def test_publishes_over_tls_with_a_password_file(broker: Any, seen: Seen, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    pw = _secret_file(tmp_path / "tools-password", broker.accounts[TOOLS])
    rc, out, err = _run(["run", "--mqtt", f"127.0.0.1:{broker.tls_port}", "--tls", "--ca-file", str(broker.ca_file),
                         "--username", TOOLS, "--password-file", str(pw),
                         *_load("tls", tmp_path, "--format", "mixed")], capsys)
    assert rc == 0, err
    assert out["published_messages"] > 50 and out["unacked_messages"] == 0
    topics = seen.of("tls", out["published_messages"])
    assert len(topics) == out["published_messages"]  # every PUBACKed message arrived, once
    assert any(t.startswith("spBv1.0/") for t in topics) and any(t.startswith("sensors/") for t in topics)
    # the Sparkplug node's control connection (aiomqtt) subscribed over TLS too
    assert "not subscribed yet" not in caplog.text


def test_each_device_authenticates_as_itself(broker: Any, seen: Seen, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    creds = {f"own-{i:04d}": broker.add_device(f"own-{i:04d}") for i in range(1, 4)}
    cf = _secret_file(tmp_path / "devices.json", json.dumps(creds))
    tls = ["--mqtt", f"127.0.0.1:{broker.tls_port}", "--tls", "--ca-file", str(broker.ca_file)]
    rc, out, err = _run(["run", *tls, "--device-credentials", str(cf),
                         *_load("own", tmp_path, "--devices", "3", "--format", "frame")], capsys)
    assert rc == 0, err
    topics = seen.of("own", out["published_messages"])
    assert len(topics) == out["published_messages"] > 0
    assert {t.split("/")[2] for t in topics} == set(creds)  # each on its own connection, its own topics
    # a device with a wrong password is refused, and the error names it
    _secret_file(cf, json.dumps({**creds, "own-0002": "wrong"}))
    rc, _out, err = _run(["run", *tls, "--device-credentials", str(cf),
                          *_load("own", tmp_path, "--devices", "3", "--format", "frame")], capsys)
    assert rc == 2 and "own-0002" in err and "wrong" not in err
    # pooled connections carry many devices: not with per-device accounts
    rc, _out, err = _run(["run", *tls, "--device-credentials", str(cf), "--mode", "pooled",
                          *_load("own", tmp_path, "--devices", "3")], capsys)
    assert rc == 2 and "per-device" in err


def test_a_stack_gives_broker_account_tls_and_store(tmp_path: Path) -> None:
    stack = {
        "mqtt": {"host": "127.0.0.1", "port": 1883, "tls_port": 8883, "ca_file": str(tmp_path / "ca.crt"),
                 "username": TOOLS, "password": "pw"},
        "clickhouse_url": "http://sensorhub-tools:secret@127.0.0.1:8123/plant",
        "clickhouse_database": "plant",
    }
    p = build_parser()

    def resolved(*argv: str) -> argparse.Namespace:
        a = p.parse_args(list(argv))
        resolve_targets(a, stack)
        return a

    a = resolved("loadtest", "--stack", "d", "--tls")
    assert a.mqtt == ("127.0.0.1", 8883) and a.ca_file == tmp_path / "ca.crt"
    assert (a.username, a.password) == (TOOLS, "pw")
    assert (a.clickhouse, a.database) == ("http://sensorhub-tools:secret@127.0.0.1:8123/plant", "plant")
    a = resolved("run", "--stack", "d")
    assert a.mqtt == ("127.0.0.1", 1883) and a.ca_file is None and a.mode == "pooled"
    # what is given wins over the stack's
    own = _secret_file(tmp_path / "pw", "mine")
    a = resolved("loadtest", "--stack", "d", "--tls", "--mqtt", "10.0.0.1:9999", "--username", "u",
                 "--password-file", str(own), "--clickhouse", "http://h:1/other")
    assert a.mqtt == ("10.0.0.1", 9999) and (a.username, a.password) == ("u", "mine")
    assert (a.clickhouse, a.database) == ("http://h:1/other", "other")
    a = resolved("verify", "--stack", "d", "--truth", "t")
    assert a.clickhouse == stack["clickhouse_url"] and a.database == "plant"


def test_secrets_never_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run", "--password", "hunter2"], ["run", "--password=hunter2"], ["loadtest", "--passw", "hunter2"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--password-file" in err and "hunter2" not in err
    rc = main(["run", "--password-file", str(_secret_file(tmp_path / "p", "x")), "--truth", str(tmp_path / "t")])
    assert rc == 2 and "needs --username" in capsys.readouterr().err


def test_a_publish_the_broker_refuses_is_counted_not_published(broker: Any) -> None:
    """A device account publishing under another device's topic: MQTT 5 PUBACK 0x87, counted as refused."""
    import asyncio

    from firmware_sim.mqtt import MqttConnection, topic_field

    password = broker.add_device("cnt-0001")
    acked: list[Any] = []

    async def go() -> MqttConnection:
        c = MqttConnection("127.0.0.1", broker.port, "cnt-0001", on_ack=acked.append, version=5,
                           username="cnt-0001", password=password)
        await c.connect()
        c.publish(topic_field("sensors/l1/cnt-0001/json"), b'{"v": 1}', 1, "own")
        c.publish(topic_field("sensors/l1/cnt-0002/json"), b'{"v": 2}', 1, "forged")
        c.flush()
        assert await c.wait_acked(5)
        await c.disconnect()
        return c

    conn = asyncio.run(go())
    assert acked == ["own"] and conn.refused == 1
