"""How fast firmware_sim publishes, and what each message costs in CPU.

Starts a private mosquitto (the project's configuration) on a free loopback
port and runs ``python -m firmware_sim run`` in a child process per case:

- maximum rate (target far above what can be reached) for per-device
  connections and a pool of 4, QoS 0 and 1, 1 and 10 readings per message;
- the best single-process case again with ``--procs 2`` (overall);
- a fixed operating point (40k readings/s as 4k messages of 10, and 20k
  single-reading messages/s) to measure CPU per message when not saturated,
  and how far the achieved rate lands from the target;
- the rate held: 5,000 readings/s from 200 devices for 10 s, in process, with
  the error of the whole run and of each full second against the target
  (the publisher tests only check that the rate is a ceiling);
- the client itself, side by side: the same N QoS 1 messages (200 topics,
  one-reading frames) through the simulator's own asyncio client
  (``firmware_sim.mqtt``) and through aiomqtt, each in a child process of its
  own with the same in-flight window. Recorded: the publishing process's CPU
  seconds per message (``time.process_time`` from the first PUBLISH to the
  last PUBACK, connect excluded), messages/s, and the broker's CPU per 1k
  messages. Bounded by ``--client-messages`` and, per client, by
  ``--client-timeout`` seconds; a client that runs out of time reports what
  was acknowledged by then.

Each case reports published messages/s and readings/s, the simulator's CPU
seconds per 1k messages (publishing phase, connects excluded) and the broker's
CPU seconds per 1k messages. No subscriber is attached: this measures the
publisher and the broker's accept path, not delivery. Results go to
``benchmarks/results/simulator.json``. Bounded: about a minute in all, plus at
most ``--client-timeout`` seconds per client for the side-by-side case.

Usage: ``.venv/bin/python benchmarks/simulator.py [--seconds 3] [--client-messages 50000]``;
``--clients-only`` runs the side-by-side case alone (write it elsewhere with ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kit.encoders import frame  # noqa: E402
from kit.results import write_results  # noqa: E402
from kit.services import start_mosquitto  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "simulator.json"
CLIENTS = ("firmware_sim", "aiomqtt")
WINDOW = 64  # QoS 1 messages in flight, for both clients (the simulator's default max_inflight)


def run_case(broker: Any, name: str, seconds: float, extra: list[str]) -> dict[str, Any]:
    broker_proc = psutil.Process(broker.pid)
    b0 = sum(broker_proc.cpu_times()[:2])
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable, "-m", "firmware_sim", "run",
            "--mqtt", f"{broker.host}:{broker.port}",
            "--duration", str(seconds), "--truth", f"{tmp}/t.truth", "--json",
            "--client-prefix", f"bench{time.monotonic_ns()}", "--ack-timeout", "10",
            *extra,
        ]
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, cwd=ROOT)
        wall = time.monotonic() - t0
    b1 = sum(broker_proc.cpu_times()[:2])
    if out.returncode != 0:
        return {"case": name, "error": out.stderr.strip()[-500:]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    msgs = r["published_messages"]
    target = float(extra[extra.index("--rate") + 1]) if "--rate" in extra else None
    res = {
        "case": name,
        "args": " ".join(extra),
        "messages_per_s": round(msgs / r["elapsed_s"]),
        "readings_per_s": round(r["achieved_rate"]),
        "sim_cpu_s_per_1k_messages": round(r["cpu_s"] / msgs * 1000, 4) if msgs else None,
        "sim_cpu_cores": round(r["cpu_s"] / r["elapsed_s"], 2),
        "broker_cpu_s_per_1k_messages": round((b1 - b0) / msgs * 1000, 4) if msgs else None,
        "unacked": r["unacked_messages"],
        "wall_s": round(wall, 1),
    }
    if target is not None and target < 1_000_000:  # an operating point, not a maximum-rate case
        res["target_readings_per_s"] = target
        res["rate_error_pct"] = round((r["achieved_rate"] - target) / target * 100, 2)
    print(json.dumps(res), flush=True)
    return res


def rate_held(broker: Any, rate: int = 5000, seconds: float = 10.0) -> dict[str, Any]:
    """The simulator in process, so that its per-second counts are at hand."""
    import asyncio

    from firmware_sim.sim import SimConfig, Simulator

    cfg = SimConfig(host=broker.host, port=broker.port, devices=200, rate=rate, duration_s=seconds,
                    truth_path=None, client_prefix=f"benchrate{time.monotonic_ns()}", device_prefix="rate")
    st = asyncio.run(Simulator(cfg).run())
    target = rate * seconds
    full = st.per_second[1:int(seconds)]  # the first second is cut by the start
    res = {
        "case": f"rate held {rate} readings/s, 200 devices, {seconds:g} s",
        "target_readings": target,
        "published": st.published,
        "rate_error_pct": round((st.published - target) / target * 100, 2),
        "per_second": st.per_second,
        "per_second_error_pct_max": round(max((abs(c - rate) / rate * 100 for c in full), default=0.0), 2),
        "unacked": st.unacked_messages,
    }
    print(json.dumps(res), flush=True)
    return res


def publisher_cases(broker: Any, s: float) -> list[dict[str, Any]]:
    """Maximum rates, operating points and the rate held: ``firmware_sim run`` as a whole."""
    results: list[dict[str, Any]] = []
    common = ["--devices", "200", "--rate", "2000000", "--format", "frame"]
    for mode in ("per-device", "pooled"):
        for qos in (0, 1):
            for n in (1, 10):
                results.append(run_case(
                    broker, f"max {mode} qos{qos} x{n}", s,
                    [*common, "--mode", mode, "--qos", str(qos), "--per-message", str(n)],
                ))
    ok = [r for r in results if "error" not in r and "qos1" in r["case"] and "x1" in r["case"]]
    best = max(ok, key=lambda r: r["messages_per_s"]) if ok else None
    if best is not None:
        results.append(run_case(broker, f"overall 2 procs: {best['case']}", s,
                                [*best["args"].split(), "--procs", "2"]))
    for mode in ("per-device", "pooled"):
        results.append(run_case(broker, f"operating point 40k readings/s, x10, qos1, {mode}", s,
                                ["--devices", "200", "--rate", "40000", "--per-message", "10", "--qos", "1",
                                 "--mode", mode]))
        results.append(run_case(broker, f"operating point 20k messages/s, x1, qos1, {mode}", s,
                                ["--devices", "200", "--rate", "20000", "--per-message", "1", "--qos", "1",
                                 "--mode", mode]))
    results.append(run_case(broker, "operating point 20k messages/s, x1, qos1, mixed formats, pooled", s,
                            ["--devices", "200", "--rate", "20000", "--per-message", "1", "--qos", "1",
                             "--format", "mixed"]))
    results.append(rate_held(broker))
    return results


# ---------------------------------------------------------------- the client itself, side by side


def client_messages(n: int) -> list[tuple[str, bytes]]:
    """``n`` messages over 200 device topics, each a one-reading firmware frame."""
    base = 1_764_072_000_000_000
    return [
        (f"sensors/bench/dev-{i % 200:03d}/frame",
         frame(f"dev-{i % 200:03d}", i // 200, base + i * 1000, [(1, 0, 0, 20.0 + (i % 1000) * 0.01)]))
        for i in range(n)
    ]


async def _publish_firmware_sim(host: str, port: int, msgs: list[tuple[str, bytes]], timeout_s: float) -> dict[str, Any]:
    """The simulator's client as the simulator drives it: publish while the window has room, flush, wait."""
    from firmware_sim.mqtt import MqttConnection, topic_field

    acked = 0
    progress = asyncio.Event()

    def on_ack(_token: Any) -> None:
        nonlocal acked
        acked += 1
        progress.set()

    conn = MqttConnection(host, port, f"bench-fw-{os.getpid()}", on_ack=on_ack, max_inflight=WINDOW)
    await conn.connect()
    fields = {t: topic_field(t) for t in dict.fromkeys(t for t, _ in msgs)}
    t0, c0 = time.monotonic(), time.process_time()
    deadline = t0 + timeout_s
    sent = 0
    while acked < len(msgs) and conn.connected:
        while sent < len(msgs) and conn.can_publish():
            topic, payload = msgs[sent]
            conn.publish(fields[topic], payload, 1, sent)
            sent += 1
        conn.flush()
        progress.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            await asyncio.wait_for(progress.wait(), remaining)
        except TimeoutError:
            break
    cpu, elapsed = time.process_time() - c0, time.monotonic() - t0
    await conn.disconnect()
    return {"acked": acked, "cpu_s": cpu, "elapsed_s": elapsed}


async def _publish_aiomqtt(host: str, port: int, msgs: list[tuple[str, bytes]], timeout_s: float) -> dict[str, Any]:
    """aiomqtt as its documentation shows it: ``await client.publish(...)``, WINDOW publishers at a time."""
    import aiomqtt

    acked = 0
    pending = iter(msgs)

    async def publisher(client: aiomqtt.Client) -> None:
        nonlocal acked
        for topic, payload in pending:
            await client.publish(topic, payload, qos=1)
            acked += 1

    async with aiomqtt.Client(host, port, identifier=f"bench-aio-{os.getpid()}", clean_session=True,
                              max_inflight_messages=WINDOW) as client:
        t0, c0 = time.monotonic(), time.process_time()
        try:
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as tg:
                for k in range(WINDOW):
                    tg.create_task(publisher(client), name=f"aiomqtt-publisher-{k}")
        except TimeoutError:
            pass
        cpu, elapsed = time.process_time() - c0, time.monotonic() - t0
    return {"acked": acked, "cpu_s": cpu, "elapsed_s": elapsed}


def publisher_child(client: str, host: str, port: int, n: int, timeout_s: float) -> int:
    """Run in the child process: publish ``n`` messages with ``client``, print one JSON line."""
    msgs = client_messages(n)
    run = _publish_firmware_sim if client == "firmware_sim" else _publish_aiomqtt
    r = asyncio.run(run(host, port, msgs, timeout_s))
    acked = r["acked"]
    print(json.dumps({
        "client": client,
        "messages": n,
        "acked": acked,
        "complete": acked == n,
        "elapsed_s": round(r["elapsed_s"], 3),
        "cpu_s": round(r["cpu_s"], 3),
        "messages_per_s": round(acked / r["elapsed_s"]) if r["elapsed_s"] > 0 else None,
        "cpu_us_per_message": round(r["cpu_s"] / acked * 1e6, 2) if acked else None,
    }))
    return 0


def clients_side_by_side(broker: Any, n: int, timeout_s: float) -> list[dict[str, Any]]:
    """The same ``n`` QoS 1 messages through each client of :data:`CLIENTS`, one child process each."""
    out = []
    broker_proc = psutil.Process(broker.pid)
    for client in CLIENTS:
        b0 = sum(broker_proc.cpu_times()[:2])
        argv = [sys.executable, str(Path(__file__).resolve()), "--publisher", client,
                "--mqtt", f"{broker.host}:{broker.port}", "--client-messages", str(n),
                "--client-timeout", str(timeout_s)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 60, cwd=ROOT)
        b1 = sum(broker_proc.cpu_times()[:2])
        case = f"client {client}: {n} QoS 1 messages, window {WINDOW}"
        if proc.returncode != 0:
            res: dict[str, Any] = {"case": case, "client": client, "error": proc.stderr.strip()[-500:]}
        else:
            res = {"case": case, **json.loads(proc.stdout.strip().splitlines()[-1])}
            # the broker's share includes the child's connect and disconnect; both are tiny next to n messages
            res["broker_cpu_s_per_1k_messages"] = round((b1 - b0) / res["acked"] * 1000, 4) if res["acked"] else None
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="publishing time per case")
    ap.add_argument("--client-messages", type=int, default=50_000,
                    help="QoS 1 messages per client in the side-by-side case (default %(default)s)")
    ap.add_argument("--client-timeout", type=float, default=30.0,
                    help="seconds each client may take for them (default %(default)s)")
    ap.add_argument("--clients-only", action="store_true", help="run only the side-by-side client case")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON results file (default %(default)s)")
    ap.add_argument("--publisher", choices=CLIENTS, help=argparse.SUPPRESS)  # the child of the client case
    ap.add_argument("--mqtt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publisher:
        host, _, port = args.mqtt.rpartition(":")
        return publisher_child(args.publisher, host, int(port), args.client_messages, args.client_timeout)
    s = args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    broker = start_mosquitto(tmp)
    results: list[dict[str, Any]] = []
    try:
        if not args.clients_only:
            results += publisher_cases(broker, s)
        results += clients_side_by_side(broker, args.client_messages, args.client_timeout)
    finally:
        broker.terminate()
    write_results(args.out, "simulator", results, seconds_per_case=s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
