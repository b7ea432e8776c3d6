"""Alert latency: MQTT receive of a crossing reading to the WebSocket send, under load, with 100 clients.

A fresh ``sensorhub stack`` with alert rules; ``sensorhub-sim loadtest``
publishes the background load (40,000 readings/s in frames of 10, 200
devices, QoS 1), every reading of which the evaluator evaluates against two
rules that never fire (a threshold and a rate over 10 s). ``--clients``
WebSocket clients (a process of their own) are connected to the gateway. A
probe device publishes a JSON reading every ``--probe-interval`` seconds,
alternately over and under its rule's limit, so each one opens or closes an
alert. Per event and per client the result holds:

- ``recv_to_sent``: the reading's MQTT receive time (ingest's ``recv``) to
  the gateway's send to that client (``sent``) — the figure with the 50 ms target;
- ``recv_to_client``: to the client's receive;
- ``recv_to_last_sent``: per event, to the send to the last of the clients;
- ``recv_to_evaluated``: to the evaluator's emit (once per event);
- ``evaluated_to_sent``: the gateway's share.

Bounded: ``--seconds`` of load (default 60, the probes in its middle), at
most ``--max-probes`` probes; the whole run stays under 2 minutes. Writes
benchmarks/results/alerts.json.

    python benchmarks/alerts.py
    python benchmarks/alerts.py --seconds 30 --clients 20       # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))

from kit.results import write_results  # noqa: E402
from kit.services import mqtt_login  # noqa: E402

RULES = """
[[alerts.rules]]
name = "probe"
device = "bench-*"
metric = "temp_c"
above = 80.0
clear_at = 70.0
severity = "critical"

# every reading of the load is evaluated against these two; they never fire
[[alerts.rules]]
name = "load-threshold"
device = "*"
metric = "m*"
above = 1e300

[[alerts.rules]]
name = "load-rate"
device = "*"
metric = "m*"
rate_above = 1e300
window_s = 10
"""


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    v = sorted(values)

    def at(p: float) -> float:
        return round(v[min(len(v) - 1, int(p / 100 * len(v)))], 2)

    return {"count": len(v), "p50_ms": at(50), "p90_ms": at(90), "p99_ms": at(99), "max_ms": round(v[-1], 2)}


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


# ---- the client process ----
async def _clients(url: str, n: int, out: str, ready: str, token_file: str | None = None) -> None:
    import websockets

    samples: list[list[float]] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"} if token_file else {}
    conns = [await websockets.connect(url + "?device=bench-*", open_timeout=30, max_queue=None, compression=None,
                                      additional_headers=headers)
             for _ in range(n)]
    Path(ready).write_text("ok")

    async def read(i: int, ws: Any) -> None:
        try:
            async for msg in ws:
                now = time.time()
                ev = json.loads(msg)
                if ev.get("type") == "alert" and not ev.get("history"):
                    samples.append([i, ev["recv"], ev["evaluated"], ev["sent"], now, 1.0 if ev["state"] == "open" else 0.0])
        except websockets.ConnectionClosed:
            pass

    tasks = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(conns)]
    await stop.wait()
    for ws in conns:
        await ws.close()
    for t in tasks:
        t.cancel()
    Path(out).write_text(json.dumps({"clients": n, "closed_early": sum(1 for ws in conns if ws.close_code not in (None, 1000)),
                                     "samples": samples}))


# ---- the run ----
def run(args: argparse.Namespace) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    sh = [sys.executable, "-m", "sensorhub"]
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="sh-bench-alerts-") as tmp:
        d = Path(tmp)
        cfg = d / "sensorhub.toml"
        cfg.write_text(RULES)
        up = subprocess.run([*sh, "--config", str(cfg), "stack", "up", "--dir", str(d / "stack"), "--json"],
                            capture_output=True, text=True, timeout=120)
        if up.returncode != 0:
            raise SystemExit(f"stack up failed: {up.stderr[-2000:]}")
        info = json.loads(up.stdout)
        clients = None
        load = None
        try:
            ready = d / "clients.ready"
            clients = subprocess.Popen([sys.executable, __file__, "_clients", "--url", info["alerts_url"],
                                        "--clients", str(args.clients), "--out", str(d / "clients.json"),
                                        "--ready", str(ready),
                                        *(["--token-file", str(Path(info["dir"]) / "secrets" / "alerts-token")]
                                          if info.get("alerts_token") else [])])
            deadline = time.monotonic() + 60
            while not ready.exists():
                if clients.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the WebSocket clients did not connect")
                time.sleep(0.1)
            pids = {k: v for k, v in info["pids"].items() if v}
            pids["ws-clients"] = clients.pid
            load = subprocess.Popen(
                [sys.executable, "-m", "firmware_sim", "loadtest", "--stack", info["dir"], "--rate", str(args.rate), "--per-message", "10",
                 "--duration", str(args.seconds), "--devices", "200", "--format", "frame", "--qos", "1",
                 "--drain-timeout", "30", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            t_load = time.monotonic()
            time.sleep(args.warmup)
            cpu0 = _cpu(pids)
            t_cpu0 = time.monotonic()
            pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-probe-{os.getpid()}")
            mqtt_login(pub, info)
            pub.connect("127.0.0.1", info["mqtt"]["port"])
            pub.loop_start()
            probes = 0
            probe_until = t_load + args.seconds - 3
            while time.monotonic() < probe_until and probes < args.max_probes:
                value = 90.0 if probes % 2 == 0 else 60.0
                pub.publish("sensors/line1/bench-1/json", json.dumps({"metric": "temp_c", "value": value}), qos=1)
                probes += 1
                time.sleep(args.probe_interval)
            cpu1 = _cpu(pids)
            cpu_wall = time.monotonic() - t_cpu0
            pub.loop_stop()
            pub.disconnect()
            r = redis.Redis.from_url(info["redis_url"])
            # wait until the last probe's event is out (bounded), then stop the clients
            deadline = time.monotonic() + 20
            n = 0
            while time.monotonic() < deadline:
                n = sum(1 for _id, f in r.xrange("sh:{alerts}:events") if b'"rule": "probe"' in f[b"e"])
                if n >= probes:
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            events_out = n
            snaps = {}
            for key in r.scan_iter("sh:metrics:*"):
                raw = r.hget(key, "state")
                if raw:
                    s = json.loads(raw)
                    snaps[s["role"]] = s
            r.close()
            clients.send_signal(signal.SIGTERM)
            clients.wait(30)
            lt_out, lt_err = load.communicate(timeout=args.seconds + 120)
        finally:
            if clients is not None and clients.poll() is None:
                clients.kill()
            if load is not None and load.poll() is None:
                load.kill()
            subprocess.run([*sh, "stack", "down", "--dir", str(d / "stack")], capture_output=True, timeout=120)
        got = json.loads((d / "clients.json").read_text())
    lines = [ln for ln in lt_out.splitlines() if ln.startswith("{")]
    loadtest = json.loads(lines[-1]) if lines else {"error": lt_err[-2000:]}
    samples = got["samples"]
    per_event: dict[float, list[float]] = {}
    for _i, recv, evaluated, sent, _now, _open in samples:
        e = per_event.setdefault(recv, [evaluated, sent])
        e[1] = max(e[1], sent)
    delivered_per_client: dict[int, int] = {}
    for i, *_ in samples:
        delivered_per_client[int(i)] = delivered_per_client.get(int(i), 0) + 1
    return {
        "load_avg_1m_before": load_before,
        "clients": args.clients,
        "load_rate": args.rate,
        "per_message": 10,
        "seconds": args.seconds,
        "probes_published": probes,
        "probe_events_emitted": events_out,
        "messages_received": len(samples),
        "min_messages_per_client": min(delivered_per_client.values(), default=0),
        "clients_closed_early": got["closed_early"],
        "recv_to_sent": _pct([(s[3] - s[1]) * 1000 for s in samples]),
        "recv_to_client": _pct([(s[4] - s[1]) * 1000 for s in samples]),
        "recv_to_evaluated": _pct([(v[0] - recv) * 1000 for recv, v in per_event.items()]),
        "recv_to_last_sent": _pct([(v[1] - recv) * 1000 for recv, v in per_event.items()]),
        "evaluated_to_sent": _pct([(s[3] - s[2]) * 1000 for s in samples]),
        "target_p99_ms": 50.0,
        "cpu_cores": {k: round((cpu1[k] - cpu0[k]) / cpu_wall, 2) for k in pids},
        "evaluator_readings_per_s": (snaps.get("alerts") or {}).get("rates", {}).get("readings"),
        "evaluator_hops": (snaps.get("alerts") or {}).get("latency"),
        "gateway_hops": (snaps.get("gateway") or {}).get("latency"),
        "ingest_hops": {k: v for k, v in ((snaps.get("ingest") or {}).get("latency") or {}).items()
                        if k in ("recv_to_xadd", "decode_to_xadd")},
        "loadtest": {k: loadtest.get(k) for k in ("published", "stored", "lost", "duplicated", "achieved_rate",
                                                  "p50_ms", "p99_ms", "error")},
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        p = argparse.ArgumentParser()
        p.add_argument("_clients")
        p.add_argument("--url", required=True)
        p.add_argument("--clients", type=int, required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--ready", required=True)
        p.add_argument("--token-file")
        a = p.parse_args()
        asyncio.run(_clients(a.url, a.clients, a.out, a.ready, a.token_file))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rate", type=int, default=40_000, help="background readings per second")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of background load")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds of load before the first probe")
    p.add_argument("--probe-interval", type=float, default=0.1)
    p.add_argument("--max-probes", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3, help="runs, one after the other; the summary takes medians")
    p.add_argument("--out", default=str(RESULTS / "alerts.json"))
    args = p.parse_args()
    if args.seconds > 90:
        raise SystemExit("--seconds: at most 90 (each run is bounded to 2 minutes)")
    runs = []
    for i in range(args.repeat):
        res = run(args)
        res["run"] = i + 1
        print(json.dumps({k: res[k] for k in ("probes_published", "probe_events_emitted", "messages_received",
                                              "recv_to_sent", "recv_to_client", "recv_to_evaluated")}, indent=1))
        runs.append(res)
    summary = {
        "runs": len(runs),
        "median_recv_to_sent_p99_ms": statistics.median(r["recv_to_sent"]["p99_ms"] for r in runs),
        "median_recv_to_sent_p50_ms": statistics.median(r["recv_to_sent"]["p50_ms"] for r in runs),
        "target_p99_ms": runs[0]["target_p99_ms"],
    }
    write_results(Path(args.out), "alerts", runs, summary=summary)
    return 0 if summary["median_recv_to_sent_p99_ms"] <= summary["target_p99_ms"] else 1


if __name__ == "__main__":
    sys.exit(main())
