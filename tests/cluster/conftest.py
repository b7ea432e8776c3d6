"""A Redis Cluster (3 masters, 3 replicas) on loopback for the tests of this folder.

One cluster serves the folder (starting one costs a few seconds); each test
starts from an empty keyspace. The failover scenario kills a master, so it
gets a cluster of its own (``own_cluster``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.cluster import LocalCluster


@pytest.fixture(scope="session")
def session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield c
    c.stop()


@pytest.fixture
def cluster(session_cluster: LocalCluster) -> LocalCluster:
    session_cluster.flush()
    return session_cluster


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """``own_cluster(**kw)``: a cluster for this test alone (it may kill nodes)."""
    made: list[LocalCluster] = []

    def make(**kw: object) -> LocalCluster:
        c = LocalCluster(tmp_path / f"cluster-{len(made)}", **kw).start()  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
