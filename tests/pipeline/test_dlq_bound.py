"""ingest.dlq_maxlen bounds the dead-letter stream: one device sending garbage cannot fill Redis.

Nothing drains the stream here (no writer), so only the bound keeps it short;
every dead letter is still counted in the audit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.pipeline.keys import StreamLayout

REPO = Path(__file__).resolve().parents[2]

BOUND = 1000
SENT = 3000


def test_dead_letter_stream_stays_within_its_bound(mosquitto: Any, redis_server: Any, redis_client: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"dlq{tag}"
    env = {
        "PATH": "/usr/bin:/bin",
        "SENSORHUB_MQTT_HOST": mosquitto.host,
        "SENSORHUB_MQTT_PORT": str(mosquitto.port),
        "SENSORHUB_MQTT_CLIENT_ID": f"sensorhub-dlq-{tag}",
        "SENSORHUB_REDIS_URL": redis_server.url,
        "SENSORHUB_REDIS_PREFIX": prefix,
        "SENSORHUB_INGEST_DLQ_MAXLEN": str(BOUND),
    }
    child = subprocess.Popen([sys.executable, "-m", "sensorhub", "ingest", "--source", "mqtt"], cwd=REPO, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(redis_client.scan_iter(f"{prefix}:metrics:*")):
            time.sleep(0.1)
        time.sleep(1.0)  # subscribed
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"dlq-pub-{tag}")
        pub.max_inflight_messages_set(500)
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        try:
            infos = [pub.publish(f"sensors/l1/bad-{tag}/json", f"{{not json {i}".encode(), qos=1)
                     for i in range(SENT)]
            for i in infos:
                i.wait_for_publish(60)
        finally:
            pub.loop_stop()
            pub.disconnect()

        def counted() -> int:
            return sum(int(redis_client.hget(k, "dead_lettered") or 0)
                       for k in redis_client.scan_iter(f"{prefix}:audit:*"))

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and counted() < SENT:
            time.sleep(0.1)
        assert counted() == SENT  # every one counted
        # the dead letters of a device go to its partition's stream, which the bound holds
        stream = StreamLayout(prefix).dlq(StreamLayout(prefix).partition(f"bad-{tag}"))
        length = int(redis_client.xlen(stream))
        # MAXLEN ~ trims whole stream nodes (100 entries each by default): the bound, give or take a node
        assert BOUND <= length <= BOUND + 100, length
        newest = redis_client.xrevrange(stream, count=1)[0][1]
        assert newest[b"payload"] == f"{{not json {SENT - 1}".encode()  # the newest are kept
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate(timeout=10)
