"""``sensorhub device add|remove|list``: the broker accounts of devices.

``add NAME`` makes a new random password for device NAME (its MQTT user name; it may then publish
only under topics whose device level is NAME), prints it once, and keeps only its hash in the
broker's password file; ``remove NAME`` deletes the account, and the broker, told to reload,
disconnects the device and refuses it from then on.

With ``--stack DIR`` the files are the stack's and its broker is signalled (SIGHUP). With
``--password-file FILE`` (an installed broker's, e.g. ``/etc/mosquitto/sensorhub.passwd``) the
file is changed and the broker is reloaded by ``--reload-pid PID`` or by the operator
(``systemctl reload mosquitto``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from sensorhub.errors import ConfigError, SensorhubError
from sensorhub.security import broker
from sensorhub.security.credentials import Credentials

__all__ = ["run"]


def _reload(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    if (args.stack is None) == (args.password_file is None):
        raise ConfigError("--stack / --password-file", "exactly one of them")
    pid: int | None = args.reload_pid
    if args.stack is not None:
        from sensorhub.service.stack import stack_status

        st = stack_status(Path(args.stack))
        if not st.get("secure"):
            raise SensorhubError(f"the stack in {args.stack} runs --insecure: its broker has no accounts")
        creds = Credentials(Path(st["dir"]))
        path = creds.mqtt_password_file
        pid = pid or st["pids"].get("mosquitto")
    else:
        path = Path(args.password_file)
    if args.action == "list":
        names = broker.list_devices(path)
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    if not args.name:
        raise ConfigError("NAME", "a device id")
    if args.action == "add":
        password = broker.add_device(path, args.name)
        reloaded = _reload(pid)
        if args.json:
            print(json.dumps({"username": args.name, "password": password}))
        else:
            print(f"device {args.name}: user name {args.name}, password {password} (shown once; only its hash is kept)")
        if not reloaded:
            print("reload the broker so it reads the new account (systemctl reload mosquitto, or SIGHUP)",
                  file=sys.stderr)
        return 0
    if not broker.remove_device(path, args.name):
        raise SensorhubError(f"no device {args.name} in {path}")
    reloaded = _reload(pid)
    print(json.dumps({"removed": args.name, "reloaded": reloaded}) if args.json else f"device {args.name} removed")
    return 0
