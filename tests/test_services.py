"""The service fixtures start real processes that can be killed, stopped and restarted."""

from __future__ import annotations

import socket

import redis
from kit.services import ManagedProcess


def test_redis_runs_with_aof_and_noeviction(redis_client: redis.Redis) -> None:
    cfg = redis_client.config_get("*")
    assert cfg["appendonly"] == "yes"
    assert cfg["appendfsync"] == "always"
    assert cfg["maxmemory-policy"] == "noeviction"
    assert redis_client.connection_pool.connection_kwargs["port"] != 6379


def test_redis_kill_and_restart_keeps_acknowledged_writes(spawn) -> None:  # type: ignore[no-untyped-def]
    r = spawn.redis()
    c = redis.Redis.from_url(r.url)
    for i in range(100):
        c.xadd("s", {"i": i})
    c.close()
    r.kill()  # at once: with appendfsync always, what Redis acknowledged is on disk
    assert not r.alive()
    r.start()
    c = redis.Redis.from_url(r.url)
    assert c.xlen("s") == 100
    c.close()


def test_mosquitto_private_port_and_sigstop(mosquitto: ManagedProcess) -> None:
    assert mosquitto.port not in (0, 1883)
    mosquitto.stop()
    try:
        s = socket.create_connection((mosquitto.host, mosquitto.port), timeout=1)
        s.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")  # CONNECT, client id ""
        s.settimeout(0.5)
        try:
            got = s.recv(4)
        except TimeoutError:
            got = b""
        assert got == b""  # a stopped broker answers nothing
        mosquitto.cont()
        s.settimeout(5)
        assert s.recv(4)[:1] == b"\x20"  # CONNACK once it runs again
        s.close()
    finally:
        mosquitto.cont()
