#!/usr/bin/env bash
# Installs what sensorhub needs from Debian, only when it is missing:
# mosquitto, redis-server, a C compiler and zlib headers for the Cython build.
# With the argument "test", also what the test suite drives: chromium (the alert page's test).
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v cc >/dev/null 2>&1 || need+=(gcc)
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
PY=${PYTHON:-python3.11}
if command -v "$PY" >/dev/null 2>&1; then
  "$PY" -c "import ensurepip" >/dev/null 2>&1 || need+=(python3.11-venv)
  "$PY" -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
    >/dev/null 2>&1 || need+=(python3.11-dev)
else
  need+=(python3.11 python3.11-venv python3.11-dev)
fi
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ "${1:-}" = test ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]}" >&2
  echo "run as root, or install them first: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing from Debian: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages' own services would take the standard ports; sensorhub runs
# its own instances on private ports, so leave theirs as Debian set them.
