"""Beyond one Redis: the store on a real 3-node Redis Cluster, a broker apart, and Sentinel.

The cluster (three masters on loopback, `redis-cli --cluster create`) is started once for the
module; Sentinel tests start their own master, sentinel and, for the failover, a replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
from pydantic import SecretStr
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import CrossSlotTransactionError, WatchError
from servers import RedisClusterServers, RedisSentinelServer, RedisServer, wait_for

from monitor.config import Settings
from monitor.pipeline.payload import encode_batch
from monitor.pipeline.queues import TASK_INGEST
from monitor.pipeline.runtime import Runtime, broker_client, redis_client
from monitor.pipeline.windows import compact_model, window_stats
from monitor.stats import CollapseStats
from monitor.worker.app import create_app

pytestmark = pytest.mark.timeout(180)

PASSWORD = "cluster-secret"
MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"
VOCAB, DIM = 200, 8
SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 1, ARGV[1])
return redis.call('ZCARD', KEYS[2])
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster"), password=PASSWORD)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cluster_settings(cluster: RedisClusterServers, broker: RedisServer, **extra: Any) -> Settings:
    models = [{"name": m, "vocab_size": VOCAB, "dim": DIM} for m in spread_models(cluster)]
    options: dict[str, Any] = {"redis_password": PASSWORD, **extra}
    return Settings(
        redis_url=cluster.url,
        redis_cluster=True,
        broker_url=broker.url,
        models=models,  # type: ignore[arg-type]
        **options,
    )


def slot_owner(cluster: RedisClusterServers, slot: int) -> int:
    """Port of the master serving `slot`, from CLUSTER SLOTS."""
    for start, end, primary, *_ in cluster.node_client(cluster.ports[0]).execute_command(
        "CLUSTER", "SLOTS"
    ):
        if int(start) <= slot <= int(end):
            return int(primary[1])
    raise AssertionError(f"slot {slot} is not served")


def model_slot(model: str) -> int:
    return int(key_slot(f"cm:{{{model}}}:pending".encode()))


def spread_models(cluster: RedisClusterServers) -> list[str]:
    """Two model names whose hash-tag slots live on different masters."""
    first = "model-0"
    owner = slot_owner(cluster, model_slot(first))
    for i in range(1, 100):
        name = f"model-{i}"
        if slot_owner(cluster, model_slot(name)) != owner:
            return [first, name]
    raise AssertionError("no two model names on different nodes")


def batches(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(VOCAB, DIM))
    out = []
    for _ in range(count):
        y = rng.integers(0, VOCAB, 40)
        out.append(((means[y] + 0.3 * rng.normal(size=(40, DIM))).astype(np.float32), y))
    return out


def reference(data: list[tuple[np.ndarray, np.ndarray]]) -> CollapseStats:
    ref = CollapseStats(VOCAB, DIM)
    for x, y in data:
        ref.update(x, y)
    return ref


def check_transactions(client: redis.Redis | RedisCluster, tag: str) -> None:
    """A Lua script and WATCH/MULTI/EXEC on the keys of one hash-tag slot, and a lost race."""
    a, b = f"test:{{{tag}}}:a", f"test:{{{tag}}}:b"
    script = client.register_script(SCRIPT)
    assert script(keys=[a, b], args=["x"]) == 1
    assert script(keys=[a, b], args=["y"]) == 2
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(a, b)
        assert pipe.get(a) == b"y"  # immediate mode while watching
        assert pipe.zmscore(b, ["x", "z"]) == [1.0, None]
        pipe.multi()
        pipe.set(a, b"z")
        pipe.zrem(b, "x")
        pipe.delete(f"test:{{{tag}}}:none")
        ok, removed, deleted = pipe.execute()
        # SET answers True on a plain client, b"OK" in a cluster transaction (redis-py 8.1).
        assert ok in (True, b"OK")
        assert (removed, deleted) == (1, 0)
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(a)
        pipe.get(a)
        client.set(a, b"someone else")  # a concurrent writer between WATCH and EXEC
        pipe.multi()
        pipe.set(a, b"mine")
        with pytest.raises(WatchError):
            pipe.execute()
    assert client.get(a) == b"someone else"


# --- Redis Cluster ------------------------------------------------------------------------


def test_cluster_client_scripts_and_transactions_in_one_slot(
    cluster: RedisClusterServers, broker: RedisServer
) -> None:
    client = redis_client(cluster_settings(cluster, broker))
    assert isinstance(client, RedisCluster)
    assert len(client.get_primaries()) == 3
    check_transactions(client, "m-tx")
    # Keys of two slots in one transaction are refused before anything is sent.
    pipe = client.pipeline(transaction=True)
    pipe.set("test:{m-a}:x", 1)
    pipe.set("test:{m-b}:x", 1)
    with pytest.raises(CrossSlotTransactionError):
        pipe.execute()
    # The global model set is one plain key, wherever its slot lives.
    assert client.sadd("test:models", "a") == 1


def test_cluster_with_acl_username(cluster: RedisClusterServers, broker: RedisServer) -> None:
    for port in cluster.ports:  # ACL users are per node: create it on every master
        cluster.node_client(port).acl_setuser(
            "collapse", enabled=True, passwords=["+user-secret"], keys=["*"], commands=["+@all"]
        )
    url = f"redis://collapse@127.0.0.1:{cluster.ports[1]}"
    settings = cluster_settings(cluster, broker, redis_password="user-secret")
    client = redis_client(settings.model_copy(update={"redis_url": url}))
    for port in cluster.ports:  # the username reaches every node the client talks to
        node = cast(RedisCluster, client).get_node(host="127.0.0.1", port=port)
        assert node is not None
        assert client.execute_command("ACL WHOAMI", target_nodes=node) in ("collapse", b"collapse")
    check_transactions(client, "m-acl")


def test_broker_is_separate_and_never_the_cluster(
    cluster: RedisClusterServers, broker: RedisServer
) -> None:
    settings = cluster_settings(cluster, broker)
    app = create_app(settings)
    assert app.conf.broker_url.startswith(f"redis://127.0.0.1:{broker.port}/")
    app.send_task(TASK_INGEST, args=[{"v": 1}], queue="ingest")
    depth = broker_client(settings, io_timeout=1.0)
    assert isinstance(depth, redis.Redis)
    assert depth.llen("ingest") == 1
    assert redis_client(settings).llen("ingest") == 0  # nothing queued in the store
    with pytest.raises(ValueError, match="broker cannot be a Redis Cluster"):
        Settings(redis_url=cluster.url, redis_cluster=True)


def test_pipeline_on_cluster_spreads_models_over_nodes(
    cluster: RedisClusterServers, broker: RedisServer
) -> None:
    """Ingest, a redelivery, compaction and a window for two models on two masters."""
    settings = cluster_settings(cluster, broker)
    models = [m.name for m in settings.models]
    runtime = Runtime(settings)
    now = time.time()
    data = {m: batches(4, seed=i) for i, m in enumerate(models)}
    for m, rows in data.items():
        for i, (x, y) in enumerate(rows):
            assert runtime.ingestor.ingest(encode_batch(m, x, y, batch_id=f"b{i}", ts=now)).stored
        x, y = rows[0]  # a redelivered task adds nothing
        assert not runtime.ingestor.ingest(encode_batch(m, x, y, batch_id="b0", ts=now)).stored
    for m, rows in data.items():
        compact_model(runtime.store, m)
        assert runtime.store.pending_count(m) == 0
        got = window_stats(runtime.store, m, "1h", 3600).stats
        assert got is not None
        want = reference(rows)
        assert got.sample_count == want.sample_count
        np.testing.assert_array_equal(got.classes().counts, want.classes().counts)
        np.testing.assert_allclose(got.classes().sums, want.classes().sums, rtol=1e-9)
    assert sorted(runtime.store.models()) == sorted(models)
    # Every key of a model lives on the master of its hash-tag slot, and only there.
    owners = {m: slot_owner(cluster, model_slot(m)) for m in models}
    assert len(set(owners.values())) == 2
    for m in models:
        for port in cluster.ports:
            keys = list(cluster.node_client(port).scan_iter(match=f"cm:{{{m}}}:*", count=500))
            assert bool(keys) == (port == owners[m]), (m, port, keys)
            assert {key_slot(k) for k in keys} <= {model_slot(m)}


# --- Sentinel -----------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[RedisSentinelServer]:
    master = RedisServer(tmp_path / "master", password=MASTER_PASSWORD)
    master.workdir.mkdir()
    master.start()
    watcher = RedisSentinelServer(tmp_path, master, sentinel_password=SENTINEL_PASSWORD)
    try:
        watcher.start()
        yield watcher
    finally:
        watcher.stop()
        master.stop()


def sentinel_settings(sentinel: RedisSentinelServer) -> Settings:
    return Settings(
        redis_url=f"redis://{sentinel.name}/0",
        redis_sentinels=[sentinel.address],
        redis_sentinel_master=sentinel.name,
        redis_password=MASTER_PASSWORD,
        redis_sentinel_password=SENTINEL_PASSWORD,
        models=[{"name": "m", "vocab_size": VOCAB, "dim": DIM}],  # type: ignore[list-item]
    )


def test_sentinel_store_and_broker(sentinel: RedisSentinelServer) -> None:
    settings = sentinel_settings(sentinel)
    client = redis_client(settings)
    assert isinstance(client, redis.Redis)
    client.set("probe", b"1")
    assert sentinel.master.client().get("probe") == b"1"  # it is the master's data
    check_transactions(client, "m")
    # Celery's sentinel:// transport finds the same master; queue depths read it too.
    app = create_app(settings)
    assert app.conf.broker_url.startswith("sentinel://")
    assert app.conf.broker_transport_options["master_name"] == sentinel.name
    app.send_task(TASK_INGEST, args=[{"v": 1}], queue="ingest")
    depth = broker_client(settings, io_timeout=1.0)
    assert depth is not None
    assert depth.llen("ingest") == 1
    assert sentinel.master.client().llen("ingest") == 1
    runtime = Runtime(settings)
    x, y = batches(1, seed=3)[0]
    assert runtime.ingestor.ingest(encode_batch("m", x, y, batch_id="s0", ts=time.time())).stored
    compact_model(runtime.store, "m")
    got = window_stats(runtime.store, "m", "1h", 3600).stats
    assert got is not None
    assert got.sample_count == len(y)


@pytest.mark.parametrize("password", [None, "wrong"])
def test_refused_sentinel_password_fails_at_once(
    sentinel: RedisSentinelServer, password: str | None
) -> None:
    settings = sentinel_settings(sentinel).model_copy(
        update={"redis_sentinel_password": password and SecretStr(password)}
    )
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="Authentication"):
        redis_client(settings).ping()
    assert time.monotonic() - started < 3


@pytest.mark.slow
def test_sentinel_failover_reaches_the_new_master(
    sentinel: RedisSentinelServer, tmp_path: Path
) -> None:
    """The master dies; the sentinel promotes its replica; the same client carries on."""
    replica = RedisServer(tmp_path / "replica", password=MASTER_PASSWORD)
    replica.workdir.mkdir()
    replica.start()
    try:
        node = replica.client()
        node.config_set("masterauth", MASTER_PASSWORD)
        node.replicaof("127.0.0.1", sentinel.master.port)
        wait_for(lambda: node.info("replication")["master_link_status"] == "up", 20, "replica")
        # The sentinel learns of replicas from the master's INFO (every 10 s).
        wait_for(
            lambda: bool(sentinel.client().execute_command("SENTINEL", "REPLICAS", sentinel.name)),
            30,
            "sentinel sees the replica",
        )
        client = redis_client(sentinel_settings(sentinel))
        client.set("before", b"kept")
        assert client.execute_command("WAIT", 1, 5000) == 1  # on the replica too
        sentinel.master.kill()
        wait_for(lambda: sentinel.master_address() == ("127.0.0.1", replica.port), 60, "failover")
        wait_for(lambda: node.info("replication")["role"] == "master", 30, "promotion")
        assert client.get("before") == b"kept"  # same client object, new master
        client.set("after", b"written")
        assert node.get("after") == b"written"
    finally:
        replica.stop()
