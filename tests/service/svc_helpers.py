"""Helpers for the service-layer tests: a real NOTIFY_SOCKET listener and the test child's command line."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("service_child.py")
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Message:
    """One notification as the service manager sees it: sender PID, arrival time, lines."""

    pid: int
    at: float
    lines: tuple[str, ...]

    def has(self, line: str) -> bool:
        return line in self.lines

    def value(self, key: str) -> str | None:
        for line in self.lines:
            k, _, v = line.partition("=")
            if k == key:
                return v
        return None


class NotifyListener:
    """The receiving end of the sd_notify protocol, as systemd sets it up (SO_PASSCRED)."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is None:
            name = f"sensorhub-test-{os.getpid()}-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[Message] = []

    def receive(self, timeout: float) -> Message | None:
        """The next message, or ``None`` when none arrives within ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack_from(payload)[0]
        msg = Message(pid, time.monotonic(), tuple(data.decode().split("\n")))
        self.messages.append(msg)
        return msg

    def collect(self, seconds: float, until: str | None = None) -> list[Message]:
        """Messages arriving within ``seconds`` (stop early after one holding the line ``until``)."""
        got: list[Message] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            msg = self.receive(remaining)
            if msg is None:
                break
            got.append(msg)
            if until is not None and msg.has(until):
                break
        return got

    def close(self) -> None:
        self.sock.close()


def child_env() -> dict[str, str]:
    """Environment for a child process that imports sensorhub from this checkout, without inherited notify variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def child_argv(*args: str) -> list[str]:
    """The command line of the test service child (service_child.py) with ``args``."""
    return [sys.executable, str(CHILD), *args]
