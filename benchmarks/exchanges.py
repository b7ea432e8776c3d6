"""Exchange feed benchmark: parse+normalize speed per venue, and a feed process's peak RSS.

For each venue: every recorded venue frame (HTX: gzip, inflated in the parse) of its capture is parsed by the
venue's adapter into a TradeBatch, repeated for about ``--seconds`` on one
core (frames/s and trades/s; the recent-id set drops repeats, so trades/s
counts the first pass's trades per pass). Then one child process per venue
runs the real ExchangeSource against a replay served by this process at
full speed and reports its peak RSS (VmHWM). Writes ``benchmarks/results/exchanges.json``.

    .venv/bin/python benchmarks/exchanges.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sensorhub.decoders.trade_batch import TradeBatch  # noqa: E402
from sensorhub.replay import ReplayServer, ReplayThread, read_capture  # noqa: E402
from sensorhub.replay.capture import default_capture_dir  # noqa: E402
from sensorhub.sources.exchanges import VENUES  # noqa: E402

CAPTURES = default_capture_dir()
FEEDS = {
    "binance": ("BINANCE", ["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"], {"stream": "aggTrade"}),
    "okx": ("OKX", ["BTC-USDT", "BTC-USD-220527", "UNI-USD-PERP"], {}),
    "coinbase": ("COINBASE", ["BTC-USD", "ETH-USD"], {}),
    "kraken": ("KRAKEN", ["KSM-BTC", "XMR-USD", "ETH-CHF", "OMG-USD", "GRT-ETH", "WAVES-EUR", "ADA-BTC", "BTC-CHF",
                          "SC-EUR", "OCEAN-BTC"], {}),
    "bybit": ("BYBIT", ["BTC-USDT-PERP", "ETH-USDT-PERP", "SOL-USDT-PERP", "DOGE-USDT-PERP"], {}),
    "bitfinex": ("BITFINEX", ["BFT-USD", "IOT-ETH", "DOG-USD", "MNA-BTC", "ODE-USD", "TESTBTC-TESTUSD", "SNG-USD"], {}),
    "bitstamp": ("BITSTAMP", ["SGB-EUR", "ETH-USD", "XRP-EUR", "BAT-EUR", "USDT-EUR", "USDT-USD", "XLM-GBP", "ADA-EUR",
                              "BAT-BTC", "GALA-EUR"], {}),
    "gemini": ("GEMINI", ["BTC-USD", "BTC-EUR", "BTC-GBP", "BTC-USDT", "ETH-USD", "ETH-USDT", "SOL-USD", "BTC-USDC-PERP",
                          "ETH-USDC-PERP", "SOL-USDC-PERP"], {}),
    "kucoin": ("KUCOIN", ["EQZ-BTC", "ANKR-BTC", "SNX-BTC", "FET-BTC", "BSV-USDT", "NRG-BTC", "CAPP-BTC", "DAPPT-BTC",
                          "COV-BTC", "LTX-USDT"], {}),
    "gateio": ("GATEIO", ["INK-USDT", "HAI-ETH", "BTC-USDC", "NANO-USDT", "QTUM3S-USDT", "DIS-USDT", "NEO-BTC",
                          "FAST-USDT", "ZKS-ETH", "OMG-USDT"], {}),
    "htx": ("HUOBI", ["TRIO-ETH", "BOR-USDT", "OMG-BTC", "XVG-ETH", "YFI-HUSD", "ZEN-ETH", "DOGE-ETH", "FIL3S-USDT",
                      "PROPY-ETH", "NEST-ETH"], {}),
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from sensorhub.config import SourceSettings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.sources.exchanges import ExchangeSource
venue, symbols, opts, url, n = {args!r}
src = ExchangeSource("bench", venue, SourceSettings(driver=venue, symbols=tuple(symbols), endpoint=url, options=opts))
dec = src.decoder
batch = TradeBatch()
src.start()
t0 = time.perf_counter(); frames = 0
# HTX pings are answered on the network thread and never reach the decoder: count them as seen.
while frames + src.server_pings_answered < n and time.perf_counter() - t0 < 30:
    for f in src.get(1024, 0.05):
        dec.decode(None, f.payload, f.recv_ns, batch); frames += 1
dt = time.perf_counter() - t0
src.stop()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"frames": frames, "trades": len(batch), "seconds": dt, "peak_rss_mb": int(hwm) / 1024}}))
"""


def parse_speed(venue: str, seconds: float) -> dict[str, float]:
    exchange, symbols, opts = FEEDS[venue]
    frames = [f if isinstance(f, bytes) else f.encode() for f in read_capture(CAPTURES / f"{exchange}.jsonl.zst").frames()]
    v = VENUES[venue](symbols, opts, recent_trade_ids=1 << 20)
    first = TradeBatch()
    now = time.time_ns()
    trades_per_pass = sum(v.parse(f, now, first) for f in frames)
    parse = v.parse
    passes = 0
    t0 = time.perf_counter()
    while True:
        # A fresh venue per pass so every pass emits its trades again (no dedup shortcut).
        v = VENUES[venue](symbols, opts, recent_trade_ids=1 << 20)
        parse = v.parse
        batch = TradeBatch()
        for f in frames:
            parse(f, now, batch)
        passes += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return {
        "frames": len(frames),
        "trades_per_pass": trades_per_pass,
        "frames_per_s": round(passes * len(frames) / dt),
        "trades_per_s": round(passes * trades_per_pass / dt),
        "bytes_per_frame": round(sum(map(len, frames)) / len(frames)),
    }


def feed_rss(venue: str) -> dict[str, float]:
    """Peak RSS (VmHWM) of a child process running the real source against a replay served from here."""
    exchange, symbols, opts = FEEDS[venue]
    cap = read_capture(CAPTURES / f"{exchange}.jsonl.zst")
    conn = next(
        (c for c in cap.connections if any('"trade"' in s for s in c.sends() if isinstance(s, str))), cap.connections[0]
    )
    server = ReplayServer(cap, VENUES[venue](symbols, opts))
    with ReplayThread(server):
        if "rest_url" in VENUES[venue].options:  # KuCoin's token comes from the replay too
            opts = {**opts, "rest_url": server.http_url}
        code = CHILD.format(root=str(ROOT), args=(venue, symbols, opts, server.ws_url, len(conn.frames())))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "exchanges.json")
    args = ap.parse_args()
    results: dict[str, dict[str, object]] = {}
    for venue in FEEDS:
        results[venue] = {"parse": parse_speed(venue, args.seconds), "feed": feed_rss(venue)}
        print(venue, json.dumps(results[venue]), flush=True)
    fps = [r["parse"]["frames_per_s"] for r in results.values()]  # type: ignore[index]
    summary = {
        "mean_frames_per_s": round(sum(fps) / len(fps)),  # type: ignore[arg-type]
        "max_peak_rss_mb": max(r["feed"]["peak_rss_mb"] for r in results.values()),  # type: ignore[index]
    }
    doc = {"benchmark": "exchanges", "python": sys.version.split()[0], "venues": results, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
