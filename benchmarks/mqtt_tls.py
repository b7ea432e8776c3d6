"""What TLS costs the native MQTT driver: CPU per message, plain and TLS side by side in one run.

A private mosquitto as ``sensorhub stack`` runs it (accounts, ACLs, a TLS listener beside the
plain one; ``kit.services.start_mosquitto(secure=True)``). Each round:

1. a receiver child process starts ``MqttNativeSource`` (the ingest account, password from a
   file) on the plain port or on the TLS port, and a minimal ingest loop: ``get`` a batch,
   ``ack`` it at once (no decoding, no Redis: the driver alone);
2. a publisher child process (a raw socket, pre-encoded PUBLISH packets, 4096 in flight, the
   tools account, always on the plain port so that it costs the same in both cases) sends
   ``--messages`` QoS 1 messages, each a firmware frame of 10 readings, over 200 device topics;
3. the receiver reports its process CPU time (``time.process_time``: every thread of the
   process, so the network thread and the loop that acks) from its first batch to its last
   message, over the messages after the first batch, and the broker's CPU over the round
   (its TLS work shows there).

Rounds alternate plain, TLS, plain, TLS, ... (``--rounds`` of each); recorded: every round, the
medians, and the ratio TLS / plain of the median CPU per message, against the target of at
most 1.30. Loopback only; every child is bounded in time (``--round-timeout``). Writes
``benchmarks/results/mqtt-tls.json``. About half a minute with the defaults.

    .venv/bin/python benchmarks/mqtt_tls.py [--messages 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kit.encoders import frame  # noqa: E402
from kit.results import write_results  # noqa: E402
from kit.services import start_mosquitto  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "mqtt-tls.json"
INGEST, TOOLS = "sensorhub-ingest", "sensorhub-tools"
TOPICS = 200
READINGS = 10
WINDOW = 4096  # the publisher's QoS 1 messages in flight
TARGET_RATIO = 1.30


# ---------------------------------------------------------------- children


def publisher(port: int, password_file: Path, n: int, timeout_s: float) -> int:
    """Publish ``n`` QoS 1 messages as fast as the broker acknowledges them; one JSON line."""
    from firmware_sim.mqtt import encode_connect, encode_publish, topic_field

    password = password_file.read_text().splitlines()[0]
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(encode_connect(f"bench-pub-{uuid.uuid4().hex[:8]}", keepalive=60, username=TOOLS, password=password))
    connack = s.recv(4)
    if connack[:2] != b"\x20\x02" or connack[3] != 0:
        raise SystemExit(f"publisher: CONNACK {connack!r}")
    base = 1_764_072_000_000_000
    topics = [topic_field(f"sensors/bench/dev-{i:03d}/frame") for i in range(TOPICS)]
    payloads = [
        frame(f"dev-{i:03d}", i, base, [(m + 1, m * 1000, 0, 20.0 + m * 0.25 + i * 0.01) for m in range(READINGS)])
        for i in range(TOPICS)
    ]
    sent = acked = 0
    pid = 0
    pending = b""
    t0, c0 = time.monotonic(), time.process_time()
    deadline = t0 + timeout_s
    while acked < n and time.monotonic() < deadline:
        batch = []
        while sent < n and sent - acked < WINDOW and len(batch) < 512:
            pid = pid % 65535 + 1
            i = sent % TOPICS
            batch.append(encode_publish(topics[i], payloads[i], 1, pid))
            sent += 1
        if batch:
            s.sendall(b"".join(batch))
        more = sent < n and sent - acked < WINDOW
        if select.select([s], [], [], 0 if more else 1.0)[0]:
            data = s.recv(1 << 16)
            if not data:
                raise SystemExit("publisher: the broker closed the connection")
            pending += data
            k = len(pending) // 4  # PUBACKs only: 4 bytes each
            acked += k
            pending = pending[k * 4:]
    s.sendall(b"\xe0\x00")
    s.close()
    print(json.dumps({"acked": acked, "cpu_s": round(time.process_time() - c0, 3),
                      "elapsed_s": round(time.monotonic() - t0, 3), "payload_bytes": len(payloads[0])}))
    return 0 if acked == n else 1


def receiver(mode: str, port: int, ca_file: Path, password_file: Path, n: int, timeout_s: float) -> int:
    """The native driver and a loop that acknowledges every batch; prints "ready", then one JSON line."""
    from sensorhub import IMPLEMENTATION
    from sensorhub.config import load_settings
    from sensorhub.sources.mqtt.native import MqttNativeSource

    tls = mode == "tls"
    settings = load_settings(mqtt={
        "port": port, "tls": tls, "ca_file": str(ca_file) if tls else None,
        "username": INGEST, "password_file": str(password_file),
        "client_id": f"bench-tls-{uuid.uuid4().hex[:8]}", "sparkplug": False, "client": "native",
        "session_expiry_s": 0,
    })
    src = MqttNativeSource("bench", settings)
    src.start()
    deadline = time.monotonic() + 10
    while not src.ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not src.ready():
        raise SystemExit(f"receiver: not connected: {src.health.detail}")
    time.sleep(0.3)  # SUBACK
    print("ready", flush=True)
    got = first = 0
    c0 = t0 = 0.0
    batches = 0
    deadline = time.monotonic() + timeout_s
    while got < n and time.monotonic() < deadline:
        frames = src.get(4096, 0.5)
        if not frames:
            continue
        if not got:
            c0, t0, first = time.process_time(), time.perf_counter(), len(frames)
        got += len(frames)
        batches += 1
        src.ack([f.ack_token for f in frames])
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    src.stop()
    counted = got - first
    print(json.dumps({
        "mode": mode, "received": got, "counted": counted, "complete": got >= n,
        "cpu_s": round(cpu, 4), "elapsed_s": round(wall, 4),
        "cpu_us_per_message": round(cpu / counted * 1e6, 3) if counted > 0 else None,
        "messages_per_s": round(counted / wall) if wall > 0 else None,
        "batches": batches, "ack_writes": src.ack_writes, "implementation": IMPLEMENTATION,
    }))
    return 0


# ---------------------------------------------------------------- the run


def one_round(broker: Any, mode: str, n: int, files: dict[str, Path], timeout_s: float) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    port = broker.tls_port if mode == "tls" else broker.port
    rx = subprocess.Popen(
        [*me, "--receiver", mode, "--port", str(port), "--ca-file", str(broker.ca_file),
         "--password-file", str(files[INGEST]), "--messages", str(n), "--round-timeout", str(timeout_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert rx.stdout is not None
        line = rx.stdout.readline()
        if line.strip() != "ready":
            rx.kill()
            _, err = rx.communicate(timeout=10)
            return {"mode": mode, "error": (line + err).strip()[-800:]}
        bp = psutil.Process(broker.pid)
        b0 = sum(bp.cpu_times()[:2])
        pub = subprocess.run(
            [*me, "--publisher", "--port", str(broker.port), "--password-file", str(files[TOOLS]),
             "--messages", str(n), "--round-timeout", str(timeout_s)],
            capture_output=True, text=True, timeout=timeout_s + 30, cwd=ROOT,
        )
        out, err = rx.communicate(timeout=timeout_s + 30)
        b1 = sum(bp.cpu_times()[:2])
    except subprocess.TimeoutExpired:
        rx.kill()
        rx.communicate()
        return {"mode": mode, "error": "timed out"}
    if rx.returncode != 0 or pub.returncode != 0:
        return {"mode": mode, "error": (err + pub.stderr).strip()[-800:]}
    r: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    p = json.loads(pub.stdout.strip().splitlines()[-1])
    r["publisher"] = {k: p[k] for k in ("acked", "cpu_s", "elapsed_s")}
    r["payload_bytes"] = p["payload_bytes"]
    r["broker_cpu_us_per_message"] = round((b1 - b0) / n * 1e6, 3)
    return r


def reference() -> dict[str, Any]:
    """A fixed pure-Python loop (the interpreter's speed on this box now), and the TLS library."""
    t0 = time.process_time()
    x = 0
    for i in range(5_000_000):
        x += i & 7
    return {"ref_python_s": round(time.process_time() - t0, 3), "openssl": ssl.OPENSSL_VERSION}


def tls_session(broker: Any) -> dict[str, str]:
    """The protocol and cipher the broker's TLS listener negotiates with the project's context."""
    from sensorhub.security.tlsctx import client_context

    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw, \
            client_context(broker.ca_file).wrap_socket(raw, server_hostname="127.0.0.1") as s:
        cipher = s.cipher()
        return {"version": str(s.version()), "cipher": cipher[0] if cipher else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000, help="QoS 1 messages per round (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each case, alternating (default %(default)s)")
    ap.add_argument("--round-timeout", type=float, default=40.0, help="seconds a round may take at most")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON results file (default %(default)s)")
    ap.add_argument("--receiver", choices=("plain", "tls"), help=argparse.SUPPRESS)
    ap.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ca-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--password-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        return receiver(args.receiver, args.port, args.ca_file, args.password_file, args.messages, args.round_timeout)
    if args.publisher:
        return publisher(args.port, args.password_file, args.messages, args.round_timeout)

    ref = reference()
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-tls-") as d:
        broker = start_mosquitto(Path(d), secure=True)
        try:
            files = {}
            for account, password in broker.accounts.items():
                f = Path(d) / f"{account}.password"
                f.write_text(password + "\n")
                f.chmod(0o600)
                files[account] = f
            session = tls_session(broker)
            rounds: list[dict[str, Any]] = []
            for k in range(args.rounds):
                for mode in ("plain", "tls"):
                    r = one_round(broker, mode, args.messages, files, args.round_timeout)
                    r["round"] = k + 1
                    print(json.dumps(r), flush=True)
                    rounds.append(r)
        finally:
            broker.terminate()

    summary: dict[str, Any] = {}
    for mode in ("plain", "tls"):
        ok = [r for r in rounds if r["mode"] == mode and "error" not in r and r["complete"]]
        summary[mode] = {
            "rounds": len(ok),
            **{f"median_{key}": statistics.median(r[key] for r in ok) if ok else None
               for key in ("cpu_us_per_message", "messages_per_s", "broker_cpu_us_per_message")},
        }
    plain, tls = summary["plain"]["median_cpu_us_per_message"], summary["tls"]["median_cpu_us_per_message"]
    ratio = round(tls / plain, 3) if plain and tls else None
    summary["ratio_tls_to_plain"] = ratio
    summary["target_max_ratio"] = TARGET_RATIO
    summary["meets_target"] = ratio is not None and ratio <= TARGET_RATIO
    print(json.dumps(summary), flush=True)
    write_results(
        args.out, "mqtt-tls", rounds,
        case=f"native driver, {args.messages} QoS 1 messages per round of a {READINGS}-reading frame, "
             f"{TOPICS} topics, publisher in its own process on the plain port",
        messages_per_round=args.messages, rounds_per_case=args.rounds, tls=session, reference=ref,
        summary=summary,
    )
    return 0 if summary["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
