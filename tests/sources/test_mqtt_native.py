"""The native MQTT driver against real mosquitto: exactly once, redelivery, coalesced acks, reconnects."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from kit.services import publish_all
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.config import Settings, load_settings
from sensorhub.sources import base
from sensorhub.sources.mqtt.native import FrameBatchQueue, MqttNativeSource
from sensorhub.sources.mqtt.paho import MqttSource


def _settings(port: int, **mqtt_opts: Any) -> Settings:
    mqtt_cfg: dict[str, Any] = {
        "port": port,
        "client_id": f"test-native-{uuid.uuid4().hex[:10]}",
        "sparkplug": False,
        "client": "native",
    }
    mqtt_cfg.update(mqtt_opts)
    return load_settings(mqtt=mqtt_cfg, ingest={"backoff": {"initial_s": 0.05, "max_s": 0.5}})


def _publish(port: int, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    publish_all(c, "127.0.0.1", port, msgs)


def _msgs(n: int, tag: str = "m") -> list[tuple[str, bytes]]:
    return [(f"sensors/line1/dev{i % 7}/json", f'{{"{tag}": {i}}}'.encode()) for i in range(n)]


def _collect(src: base.Source, n: int, timeout: float = 15.0) -> list[base.Frame]:
    out: list[base.Frame] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(src.get(4096, 0.2))
    return out


@pytest.fixture
def started() -> Iterator[Callable[[Settings], MqttNativeSource]]:
    sources: list[MqttNativeSource] = []

    def start(settings: Settings) -> MqttNativeSource:
        src = base.create("mqtt", "test", settings=settings)
        assert isinstance(src, MqttNativeSource)
        src.start()
        sources.append(src)
        deadline = time.monotonic() + 10
        while not src.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.ready()
        time.sleep(0.2)  # SUBACK
        return src

    yield start
    for s in sources:
        s.stop()


def test_client_setting_chooses_the_driver() -> None:
    assert isinstance(base.create("mqtt", "a", settings=load_settings(mqtt={"client": "paho"})), MqttSource)
    assert isinstance(base.create("mqtt", "a", settings=load_settings(mqtt={"client": "native"})), MqttNativeSource)
    assert isinstance(base.create("mqtt-native", "a", settings=load_settings()), MqttNativeSource)
    assert {"mqtt", "mqtt-native", "mqtt-paho"} <= set(base.driver_names())


@pytest.mark.parametrize("protocol, group", [("5", None), ("3.1.1", None), ("5", "ingest")])
def test_qos1_messages_arrive_exactly_once(mosquitto: Any, started: Any, protocol: str, group: str | None) -> None:
    src = started(_settings(mosquitto.port, protocol=protocol, shared_group=group))
    msgs = _msgs(500)
    _publish(mosquitto.port, msgs)
    frames = _collect(src, 500)
    assert sorted(f.payload for f in frames) == sorted(p for _t, p in msgs)
    assert all(isinstance(f, base.Frame) and f.ack_token is not None for f in frames)
    assert src.decoder_for(frames[0].topic) is not None
    src.ack([f.ack_token for f in frames])
    time.sleep(0.5)
    assert src.get(4096, 0.2) == []  # acknowledged: nothing comes twice
    assert src.health.frames == 500 and src.health.last_frame_ns > 0


def test_unacked_messages_redelivered_after_reconnect(mosquitto: Any, started: Any) -> None:
    settings = _settings(mosquitto.port)
    first = started(settings)
    msgs = _msgs(300, "r")
    _publish(mosquitto.port, msgs)
    got = _collect(first, 300)
    assert len(got) == 300
    first.ack([f.ack_token for f in got[:100]])  # the rest is never acknowledged
    first.stop()
    second = started(settings)  # same client id: the persistent session
    again = _collect(second, 200)
    assert sorted(f.payload for f in again) == sorted(f.payload for f in got[100:])
    assert second.redelivered == 200
    second.ack([f.ack_token for f in again])
    assert second.get(4096, 0.5) == []


def test_acks_coalesced_into_one_write(mosquitto: Any, started: Any) -> None:
    src = started(_settings(mosquitto.port))
    _publish(mosquitto.port, _msgs(400, "c"))
    frames = _collect(src, 400)
    assert len(frames) == 400
    src.ack([f.ack_token for f in frames] + [None])
    assert (src.ack_writes, src.acks_sent, src.stale_acks) == (1, 400, 0)


def test_broker_restart_redelivers_and_old_tokens_are_stale(spawn: Any, started: Any) -> None:
    broker = spawn.mosquitto()
    src = started(_settings(broker.port))
    msgs = _msgs(200, "b")
    _publish(broker.port, msgs)
    got = _collect(src, 200)
    assert len(got) == 200
    broker.restart()  # SIGTERM: the broker saves sessions and in-flight messages
    again = _collect(src, 200, timeout=20)
    assert sorted(f.payload for f in again) == sorted(p for _t, p in msgs)
    assert src.health.reconnects >= 1 and src.ready()
    src.ack([f.ack_token for f in got])  # packet ids of the dead connection
    assert (src.acks_sent, src.stale_acks) == (0, 200)
    src.ack([f.ack_token for f in again])
    assert src.acks_sent == 200
    time.sleep(0.3)
    broker.restart()
    assert _collect(src, 1, timeout=3) == []  # all acknowledged: nothing comes back


def test_reconnects_with_backoff_while_the_broker_is_down(spawn: Any, started: Any) -> None:
    broker = spawn.mosquitto()
    src = started(_settings(broker.port))
    broker.kill()
    deadline = time.monotonic() + 5
    while src.health.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not src.health.connected
    time.sleep(1.5)  # several refused attempts (backoff capped at 0.5 s)
    broker.start()
    deadline = time.monotonic() + 10
    while not src.health.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert src.health.connected and src.health.reconnects == 1
    time.sleep(0.2)
    _publish(broker.port, _msgs(10, "u"))
    assert len(_collect(src, 10)) == 10


def test_malformed_stream_drops_the_connection_and_reconnects() -> None:
    """A peer that answers CONNECT with CONNACK and then a packet no broker sends a subscriber."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        srv.settimeout(10)
        for _ in range(2):
            try:
                conn, _addr = srv.accept()
            except OSError:
                return
            accepted.append(1)
            with conn:
                conn.recv(4096)  # CONNECT
                conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK (MQTT 5, no properties)
                conn.recv(4096)  # SUBSCRIBE
                conn.sendall(b"\x60\x02\x00\x01")  # PUBREL: never sent to a QoS 1 subscriber
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    src = MqttNativeSource("test", _settings(port))
    src.start()
    try:
        deadline = time.monotonic() + 10
        while len(accepted) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(accepted) == 2
        assert src.health.reconnects >= 1
        assert "malformed stream" in src.health.detail
    finally:
        src.stop()
        srv.close()
        t.join(5)


def test_batch_queue_bounds_and_splits() -> None:
    q = FrameBatchQueue(4)
    stop = threading.Event()
    fr = [base.Frame("t", bytes([i]), i, i) for i in range(6)]
    assert q.put(fr[:3], stop) and q.put(fr[3:], stop)
    assert len(q) == 6
    stop.set()
    assert not q.put([fr[0]], stop)  # full: waits for room, gives up when stopping
    assert q.get(2, 0) == fr[:2]
    assert q.get(10, 0) == fr[2:]
    assert q.get(10, 0.01) == []


def test_whole_stack_with_the_native_client(stack_factory: Any, loadtest: Any) -> None:
    stack = stack_factory('[mqtt]\nclient = "native"\n')
    r = loadtest(stack, "--rate", "5000", "--duration", "8", "--format", "mixed", "--per-message", "1", "--qos", "1")
    assert r["published"] > 30_000
    assert (r["lost"], r["duplicated"], r["mismatched"]) == (0, 0, 0)
    assert "(session present: False, connection 1)" in stack.log("ingest")  # the native driver's own line
