"""A running ``sensorhub ingest --source mqtt`` has imported none of the other commands' dependencies.

The real command against the real broker and Redis: it becomes READY, stores a
reading, stops on SIGTERM, and then reports what its interpreter had loaded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from svc_helpers import REPO, NotifyListener

#: what an MQTT ingest does not run, so must not import on every restart
OTHERS = ("rich", "websockets", "prometheus_client", "chdb", "sensorhub.chdb_server",
          "sensorhub.sources.exchanges", "sensorhub.pipeline.writer", "sensorhub.monitor")

_CHILD = f"""
import json, sys
from sensorhub.cli import main
rc = main(["ingest", "--source", "mqtt"])
print(json.dumps({{"rc": rc, "loaded": sorted(w for w in {list(OTHERS)!r}
                  if any(m == w or m.startswith(w + ".") for m in sys.modules))}}))
"""


def test_a_running_mqtt_ingest_loads_no_other_commands_dependencies(
    mosquitto: Any, redis_server: Any, redis_client: Any, listener: NotifyListener
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"imp{tag}"
    env = {
        "PATH": "/usr/bin:/bin",
        "NOTIFY_SOCKET": listener.address,
        "SENSORHUB_MQTT_HOST": mosquitto.host,
        "SENSORHUB_MQTT_PORT": str(mosquitto.port),
        "SENSORHUB_MQTT_CLIENT_ID": f"sensorhub-imports-{tag}",
        "SENSORHUB_REDIS_URL": redis_server.url,
        "SENSORHUB_REDIS_PREFIX": prefix,
    }
    child = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        msgs = listener.collect(60, until="READY=1")
        assert any(m.has("READY=1") for m in msgs), [m.lines for m in msgs]
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"imports-pub-{tag}")
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        try:
            doc = json.dumps({"ts": 1764072000, "seq": 1, "values": {"temp_c": 20.5}})
            pub.publish(f"sensors/l1/imports-{tag}/json", doc, qos=1).wait_for_publish(10)
        finally:
            pub.loop_stop()
            pub.disconnect()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            redis_client.xlen(k) for k in redis_client.scan_iter(f"{prefix}:readings:*")
        ):
            time.sleep(0.05)
        assert any(redis_client.xlen(k) for k in redis_client.scan_iter(f"{prefix}:readings:*")), "no reading stored"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=10)
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"rc": 0, "loaded": []}, err
