#!/bin/sh
# Make sure systemd-analyze is present, for the unit-file tests
# (tests/service/test_systemd_units.py). On Debian 12 it ships in the
# "systemd" package; installing the package does not boot systemd or start
# anything in a container, it only provides the tools.
set -eu

if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-systemd: systemd-analyze is missing and apt-get is not available; install systemd by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure-systemd: need root (or sudo) to install the systemd package" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends systemd
command -v systemd-analyze >/dev/null
