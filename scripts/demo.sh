#!/usr/bin/env bash
# make demo: the whole appliance on private ports, 200 simulated devices, the
# monitor on screen, a verification summary, then everything stopped again.
set -euo pipefail
DIR=${1:-run/demo}
RATE=${DEMO_RATE:-40000}
SECONDS_=${DEMO_SECONDS:-60}
DEVICES=${DEMO_DEVICES:-200}
FORMAT=${DEMO_FORMAT:-frame}
PER=${DEMO_PER_MESSAGE:-10}
SH=.venv/bin/sensorhub
SIM=.venv/bin/sensorhub-sim

$SH stack down --dir "$DIR" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR"
echo "starting mosquitto, redis-server, chdb-server, ingest and writer under $DIR ..."
# stack-info.json holds the stack's credentials: readable by us alone
(umask 077 && $SH stack up --dir "$DIR" --json > "$DIR/stack-info.json")
trap '$SH stack down --dir "$DIR" >/dev/null 2>&1 || true' EXIT
.venv/bin/python -c "
import json, sys
st = json.load(open(sys.argv[1]))
m = st['mqtt']
print(f\"stack up, secured: MQTT 127.0.0.1:{m['port']} (TLS on {m['tls_port']}, CA {m['ca_file']}), \"
      f\"every account's password under {st['dir']}/secrets\")" "$DIR/stack-info.json"
echo "driving $DEVICES devices at $RATE readings/s for $SECONDS_ s (format $FORMAT, $PER readings/message, QoS 1)"

$SIM loadtest --stack "$DIR" --rate "$RATE" --duration "$SECONDS_" \
  --devices "$DEVICES" --format "$FORMAT" --per-message "$PER" --qos 1 --json > "$DIR/result.json" 2> "$DIR/sim.log" &
SIM_PID=$!

if [ -t 1 ] && $SH monitor --help >/dev/null 2>&1; then
  # the monitor until the load test has finished (q quits it early)
  ( while kill -0 $SIM_PID 2>/dev/null; do sleep 1; done; pkill -INT -f "sensorhub monitor --stack $DIR" ) &
  $SH monitor --stack "$DIR" || true
else
  while kill -0 $SIM_PID 2>/dev/null; do
    sleep 5
    $SH monitor --stack "$DIR" --once 2>/dev/null | head -40 || echo "... publishing"
  done
fi
wait $SIM_PID || true

.venv/bin/python - "$DIR/result.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    print(f"the load test produced no result ({exc}); see the logs in run/demo/")
    sys.exit(1)
print()
print("=" * 64)
print("sensorhub demo summary")
print("=" * 64)
for k in ("published", "stored", "lost", "duplicated", "mismatched", "achieved_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms"):
    v = r.get(k)
    print(f"  {k:<14} {v:,.1f}" if isinstance(v, float) else f"  {k:<14} {v}")
ok = r.get("lost") == 0 and r.get("duplicated") == 0 and r.get("mismatched") == 0
print("  verdict        " + ("every published reading stored exactly once" if ok else "MISMATCH: see run/demo/"))
print()
print("the data stays in run/demo/chdb/data; query it, e.g.:")
print('  .venv/bin/sensorhub query --data run/demo/chdb/data "SELECT device, count(), avg(value) FROM sensorhub.readings GROUP BY device ORDER BY device LIMIT 5"')
print("or run the stack again (.venv/bin/sensorhub stack up --dir run/demo) and use clickhouse-connect or")
print('  .venv/bin/sensorhub query --stack run/demo "SELECT count() FROM readings"')
PY
echo "stopping the stack"
