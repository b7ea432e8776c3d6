#!/usr/bin/env bash
# make demo-exchanges: the whole appliance on private ports, all eleven recorded exchange captures
# replayed at once at their recorded pace, each venue through its own ingest process, then the
# stored trade counts per venue and symbol; the stack is stopped at the end whatever happens.
set -euo pipefail
DIR=${1:-run/demo-exchanges}
SPEED=${DEMO_EXCHANGES_SPEED:-1}
CAPTURES=${CAPTURES:-$(.venv/bin/python -c "from sensorhub.replay.capture import default_capture_dir; print(default_capture_dir())")}
PY=.venv/bin/python
SH=.venv/bin/sensorhub

$SH stack down --dir "$DIR" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR/replays"
echo "starting mosquitto, redis-server, chdb-server, ingest and writer under $DIR ..."
$SH stack up --dir "$DIR" --json > "$DIR/stack-info.json"
trap '$SH stack down --dir "$DIR" >/dev/null 2>&1 || true' EXIT

# capture  driver  symbols (normalized spelling, as each venue's source is configured)
VENUES=(
  "BINANCE binance NKN-USDT,BLZ-ETH,LRC-BTC,RUNE-EUR"
  "OKX okx BTC-USDT,BTC-USD-220527,UNI-USD-PERP"
  "COINBASE coinbase BTC-USD,ETH-USD"
  "KRAKEN kraken KSM-BTC,XMR-USD,ETH-CHF,OMG-USD,GRT-ETH,WAVES-EUR,ADA-BTC,BTC-CHF,SC-EUR,OCEAN-BTC"
  "BYBIT bybit BTC-USDT-PERP,ETH-USDT-PERP,SOL-USDT-PERP,DOGE-USDT-PERP"
  "BITFINEX bitfinex BFT-USD,IOT-ETH,DOG-USD,MNA-BTC,ODE-USD,TESTBTC-TESTUSD,SNG-USD"
  "BITSTAMP bitstamp SGB-EUR,ETH-USD,XRP-EUR,BAT-EUR,USDT-EUR,USDT-USD,XLM-GBP,ADA-EUR,BAT-BTC,GALA-EUR"
  "GEMINI gemini BTC-USD,BTC-EUR,BTC-GBP,BTC-USDT,ETH-USD,ETH-USDT,SOL-USD,BTC-USDC-PERP,ETH-USDC-PERP,SOL-USDC-PERP"
  "KUCOIN kucoin EQZ-BTC,ANKR-BTC,SNX-BTC,FET-BTC,BSV-USDT,NRG-BTC,CAPP-BTC,DAPPT-BTC,COV-BTC,LTX-USDT"
  "GATEIO gateio INK-USDT,HAI-ETH,BTC-USDC,NANO-USDT,QTUM3S-USDT,DIS-USDT,NEO-BTC,FAST-USDT,ZKS-ETH,OMG-USDT"
  "HUOBI htx TRIO-ETH,BOR-USDT,OMG-BTC,XVG-ETH,YFI-HUSD,ZEN-ETH,DOGE-ETH,FIL3S-USDT,PROPY-ETH,NEST-ETH"
)
echo "replaying ${#VENUES[@]} captures at ${SPEED}x the recorded pace, one ingest process per venue ..."
PIDS=()
for line in "${VENUES[@]}"; do
  read -r cap venue symbols <<< "$line"
  $SH replay "$CAPTURES/$cap.jsonl.zst" --venue "$venue" --symbols "$symbols" --speed "$SPEED" \
    --stack "$DIR" --stack-timeout 90 \
    > "$DIR/replays/$venue.json" 2> "$DIR/replays/$venue.log" &
  PIDS+=($!)
done
FAILED=0
for pid in "${PIDS[@]}"; do
  wait "$pid" || FAILED=$((FAILED + 1))
done

$PY - "$DIR/replays" <<'EOF'
import json, sys
from pathlib import Path
total_stored = total_expected = 0
print(f"{'venue':<10} {'frames':>7} {'stored':>7} {'expected':>9}  per symbol (stored)")
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    lines = [ln for ln in f.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        print(f"{f.stem:<10} no result; see {f.with_suffix('.log')}")
        continue
    r = json.loads(lines[-1])
    stored = sum(t["stored"] for t in r["trades"].values())
    expected = sum(t["expected"] for t in r["trades"].values())
    total_stored += stored
    total_expected += expected
    per = ", ".join(f"{s} {t['stored']}" for s, t in r["trades"].items())
    mark = "" if r["complete"] else "  INCOMPLETE"
    print(f"{r['venue']:<10} {r['frames_sent']:>7} {stored:>7} {expected:>9}  {per}{mark}")
print(f"{'all':<10} {'':>7} {total_stored:>7} {total_expected:>9}")
EOF
if [ "$FAILED" -ne 0 ]; then
  echo "$FAILED venue replays did not complete; logs in $DIR/replays" >&2
  exit 1
fi
