"""Both MQTT drivers over TLS with a password, against a real mosquitto with accounts, ACLs and a TLS listener.

One broker for the module (``kit.services.start_mosquitto(secure=True)``): the ingest account
receives, the tools account publishes. Refused credentials are retried until the password file
holds the right one; a client that trusts another CA never talks to the broker.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from kit import services
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.config import Settings, load_settings
from sensorhub.security.pki import make_ca, make_client_cert
from sensorhub.security.tlsctx import client_context
from sensorhub.sources import base
from sensorhub.sources.mqtt.native import MqttNativeSource
from sensorhub.sources.mqtt.paho import MqttSource

INGEST, TOOLS = "sensorhub-ingest", "sensorhub-tools"


@pytest.fixture(scope="module")
def broker(secure_broker: Any) -> Any:
    return secure_broker


def _secret_file(d: Path, text: str, name: str = "mqtt-password") -> Path:
    p = d / name
    p.write_text(text + "\n")
    p.chmod(0o600)
    return p


def _settings(broker: Any, client: str, password_file: Path, **mqtt_opts: Any) -> Settings:
    cfg: dict[str, Any] = {
        "port": broker.tls_port, "tls": True, "ca_file": str(broker.ca_file),
        "username": INGEST, "password_file": str(password_file),
        "client_id": f"test-tls-{uuid.uuid4().hex[:10]}", "sparkplug": False, "client": client,
    }
    cfg.update(mqtt_opts)
    return load_settings(mqtt=cfg, ingest={"backoff": {"initial_s": 0.05, "max_s": 0.3}})


def _publish(broker: Any, msgs: list[tuple[str, bytes]]) -> None:
    """Publish as the tools account, over TLS too."""
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    c.username_pw_set(TOOLS, broker.accounts[TOOLS])
    c.tls_set_context(client_context(broker.ca_file))
    services.publish_all(c, "127.0.0.1", broker.tls_port, msgs)


def _msgs(n: int, tag: str) -> list[tuple[str, bytes]]:
    return [(f"sensors/line1/dev{i % 7}/json", f'{{"{tag}": {i}}}'.encode()) for i in range(n)]


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


def _receive_acking(src: base.Source, n: int, timeout: float = 15.0) -> list[base.Frame]:
    """Frames as they come, each batch acknowledged from this thread while the network thread reads."""
    out: list[base.Frame] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        got = src.get(512, 0.2)
        src.ack([f.ack_token for f in got])
        out.extend(got)
    return out


@pytest.mark.parametrize("client", ["native", "paho"])
def test_receives_over_tls_with_a_password(broker: Any, tmp_path: Path, client: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sensorhub.sources.mqtt")
    settings = _settings(broker, client, _secret_file(tmp_path, broker.accounts[INGEST]))
    src = base.create("mqtt", "tls", settings=settings)
    assert isinstance(src, MqttNativeSource if client == "native" else MqttSource)
    src.start()
    try:
        assert _wait(src.ready), src.health.detail
        time.sleep(0.2)  # SUBACK
        msgs = _msgs(2000, client)
        _publish(broker, msgs)
        frames = _receive_acking(src, len(msgs))
        assert sorted(f.payload for f in frames) == sorted(p for _t, p in msgs)
    finally:
        src.stop()
    if client == "native":
        assert isinstance(src, MqttNativeSource)
        assert src.acks_sent == 2000 and src.stale_acks == 0
        assert any(" over TLSv1." in r.getMessage() for r in caplog.records)
    # the same persistent session again: every acknowledgement went through TLS, nothing comes back
    again = base.create("mqtt", "tls", settings=settings)
    again.start()
    try:
        assert _wait(again.ready)
        assert again.get(4096, 0.7) == []
    finally:
        again.stop()


@pytest.mark.parametrize("client", ["native", "paho"])
def test_a_refused_password_is_retried_until_the_file_holds_the_right_one(
    broker: Any, tmp_path: Path, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = broker.accounts[INGEST]
    pw = _secret_file(tmp_path, "not-the-password")
    src = base.create("mqtt", "rotated", settings=_settings(broker, client, pw))
    refusals = (lambda: src.refusals) if isinstance(src, MqttNativeSource) else (lambda: src.refusals.count)
    src.start()
    try:
        assert _wait(lambda: refusals() >= 2), src.health.detail  # refused, and tried again
        assert not src.ready()
        assert INGEST in src.health.detail
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors  # one line, not one per retry
        assert INGEST in errors[0] and ("password" in errors[0].lower() or "authori" in errors[0].lower())
        assert "not-the-password" not in caplog.text
        _secret_file(tmp_path, secret)  # the operator fixes the file: picked up on the next connect
        assert _wait(src.ready), src.health.detail
        time.sleep(0.2)
        _publish(broker, _msgs(20, "rot"))
        assert len(_receive_acking(src, 20)) == 20
        assert secret not in caplog.text
    finally:
        src.stop()


def test_a_client_trusting_another_ca_refuses_the_broker(broker: Any, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    other = make_ca(tmp_path / "other-ca", name="someone else's CA")
    src = MqttNativeSource("untrusted", _settings(broker, "native", _secret_file(tmp_path, broker.accounts[INGEST]),
                                                  ca_file=str(other.cert)))
    src.start()
    try:
        assert _wait(lambda: src.refusals >= 2), src.health.detail  # retried
        assert "not trusted" in src.health.detail and "mqtt.ca_file" in src.health.detail
        assert not src.ready() and src.health.reconnects == 0
        assert src.acks_sent == 0 and src.get(10, 0) == []
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "not trusted" in errors[0], errors
    finally:
        src.stop()


def test_the_client_context_checks_the_certificate_and_the_host_name(broker: Any, tmp_path: Path) -> None:
    ctx = client_context(broker.ca_file)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED

    def handshake(c: ssl.SSLContext, server_hostname: str) -> str:
        with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw, \
                c.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return str(tls.version())

    assert handshake(ctx, "127.0.0.1").startswith("TLSv1.")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname"):
        handshake(ctx, "not-the-broker.example")  # a certificate for another name
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context(make_ca(tmp_path / "ca2").cert), "127.0.0.1")
    # a client certificate is loaded when given, and the key alone is an error
    ca = make_ca(tmp_path / "ca3")
    pair = make_client_cert(ca, tmp_path / "ca3", "sensorhub-ingest")
    assert handshake(client_context(broker.ca_file, pair.cert, pair.key), "127.0.0.1").startswith("TLSv1.")
    with pytest.raises(ValueError, match="cert_file"):
        client_context(broker.ca_file, None, pair.key)


def test_a_broker_asking_for_client_certificates_takes_the_name_from_the_certificate(tmp_path: Path) -> None:
    """``require_certificate``: no certificate, no connection; a device certificate's common name is its
    user name, so the per-device ACL applies to it."""
    from sensorhub.security.pki import CertPair

    b = services.start_mosquitto(tmp_path, secure=True, client_certs=True)
    try:
        ca = CertPair(b.creds.ca_file, b.creds.tls / "ca.key")
        dev = make_client_cert(ca, tmp_path / "certs", "cert-dev-1")
        b.add_device("cert-dev-1")  # the account the ACL patterns name
        acks: dict[int, Any] = {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cert-dev-1", protocol=mqtt.MQTTv5)
        c.tls_set_context(client_context(b.ca_file, dev.cert, dev.key))
        c.on_publish = lambda _c, _u, mid, rc, _p: acks.setdefault(mid, str(rc))
        c.connect("127.0.0.1", b.tls_port)
        c.loop_start()
        own = c.publish("sensors/l1/cert-dev-1/json", b"{}", qos=1)
        other = c.publish("sensors/l1/cert-dev-2/json", b"{}", qos=1)
        own.wait_for_publish(5)
        other.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while len(acks) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert acks[own.mid] in ("Success", "No matching subscribers")  # accepted (nobody subscribes here)
        assert acks[other.mid] == "Not authorized"
        c.disconnect()
        c.loop_stop()
        # the same CONNECT over TLS: answered with a certificate, the connection dropped without one
        from firmware_sim.mqtt import encode_connect

        connect = encode_connect("cert-probe", username="cert-dev-1")
        with socket.create_connection(("127.0.0.1", b.tls_port), 5) as raw, \
                client_context(b.ca_file, dev.cert, dev.key).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(connect)
            assert tls.recv(4)[:1] == b"\x20"  # CONNACK
        with socket.create_connection(("127.0.0.1", b.tls_port), 5) as raw, \
                client_context(b.ca_file).wrap_socket(raw, server_hostname="127.0.0.1") as tls, \
                pytest.raises(ssl.SSLError):
            tls.sendall(connect)  # TLS 1.3: the server's refusal arrives with the first read
            tls.recv(4)
    finally:
        b.terminate()
