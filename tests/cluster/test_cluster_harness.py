"""The command lines of a Redis Cluster's nodes: cluster mode, AOF, and no secret in argv."""

from __future__ import annotations

import stat
from pathlib import Path

from sensorhub.service import redis_cluster


def test_a_node_runs_in_cluster_mode_with_its_own_files(tmp_path: Path) -> None:
    argv = redis_cluster.node_argv(tmp_path, 30001, maxmemory="64mb")
    opts = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert opts["--port"] == "30001" and opts["--cluster-enabled"] == "yes"
    assert opts["--cluster-config-file"] == "nodes-30001.conf"
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "always"
    assert opts["--maxmemory-policy"] == "noeviction" and opts["--maxmemory"] == "64mb"
    assert opts["--dir"] == str(redis_cluster.node_dir(tmp_path, 30001))
    assert "--aclfile" not in opts


def test_the_admin_password_is_in_a_private_file_not_in_argv(tmp_path: Path) -> None:
    acl = tmp_path / "users.acl"
    argv = redis_cluster.node_argv(tmp_path, 30002, aclfile=acl, admin_password="pa55-word")
    assert "pa55-word" not in " ".join(argv)
    assert argv[argv.index("--aclfile") + 1] == str(acl)
    conf = Path(argv[1])
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert conf.read_text().splitlines()[1:] == ["masteruser admin", 'masterauth "pa55-word"']
    create = redis_cluster.create_argv([("127.0.0.1", 30002), ("127.0.0.1", 30003)], 1, user="admin")
    assert "pa55-word" not in " ".join(create) and create[-3:] == ["--cluster-replicas", "1", "--cluster-yes"]
    assert redis_cluster.create_env("pa55-word", {})["REDISCLI_AUTH"] == "pa55-word"


def test_ports_leave_room_for_the_cluster_bus() -> None:
    ports = redis_cluster.free_ports(6)
    assert len(set(ports)) == 6
    assert all(p + redis_cluster.BUS_OFFSET <= 65535 for p in ports)
    assert not {p + redis_cluster.BUS_OFFSET for p in ports} & set(ports)


def test_a_cluster_is_chosen_by_the_setting_or_the_url() -> None:
    import pytest

    from sensorhub.config import RedisSettings
    from sensorhub.errors import ConfigError
    from sensorhub.pipeline.redisconn import cluster_target

    single = RedisSettings()
    assert cluster_target(single, "redis://127.0.0.1:6379/0") == (False, "redis://127.0.0.1:6379/0", [])
    assert cluster_target(single, "unix:///run/redis.sock?db=0") == (False, "unix:///run/redis.sock?db=0", [])
    assert cluster_target(RedisSettings(cluster=True), "redis://10.0.0.1:7000/0") == (True, "redis://10.0.0.1:7000/0", [])
    assert cluster_target(single, "redis://10.0.0.1:7000/0?cluster=true") == (True, "redis://10.0.0.1:7000/0", [])
    assert cluster_target(single, "rediss://u:p@a:7000,b:7001/0") == (True, "rediss://u:p@a:7000/0", [("b", 7001)])
    with pytest.raises(ConfigError):
        cluster_target(single, "redis://a:7000,b/0")
