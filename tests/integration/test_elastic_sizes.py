"""Groups sized as ranges and nodes that come and go (docs/heterogeneous.md), on Ray's own multi-node
test cluster (`ray.cluster_utils.Cluster`): nodes are added as the autoscaler would add them and
drained as it (or `ray drain-node`) would take them away. Every rank asks for one CPU, so a 1-CPU
node holds one rank."""
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from rayllm.config import GroupConfig
from rayllm.group import BelowMinimum, ModelGroup

STEPS = 6


def rows_of(step: int) -> list[dict]:
    import random

    rng = random.Random(step)
    out = []
    for _ in range(16):
        ids = [rng.randrange(10, 1000) for _ in range(rng.randint(10, 40))]
        out.append({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (len(ids) - 5)})
    return out


@pytest.fixture
def cluster():
    """A fresh head node with one CPU; the session's local Ray is shut down for it and restored
    after."""
    from conftest import init_local_ray

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 256 * 1024**2})
    init_local_ray(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        init_local_ray()


def _add_node(c: Cluster):
    node = c.add_node(num_cpus=1, object_store_memory=256 * 1024**2)
    c.wait_for_nodes()
    return node


def _drain(node) -> None:
    """What the autoscaler does before taking a node away (a preemption), through the GCS."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "test: node preempted", 0)
    assert accepted, why


def _cfg(num_ranks, **elastic) -> GroupConfig:
    return GroupConfig(num_ranks=num_ranks, zero_stage=0, micro_batch_size=4, cpus_per_rank=1,
                       optimizer={"lr": 1e-3, "scheduler": "constant"}, elastic=elastic)


def _train(g: ModelGroup, steps) -> list[float]:
    return [g.train_step(rows_of(s))["loss"] for s in steps]


def test_group_sized_1_to_2_starts_with_one_rank_grows_to_two_when_a_node_is_added_and_keeps_the_trajectory(
        cluster, tiny_path):
    ref = ModelGroup("sft/policy", _cfg(1), tiny_path)  # the fixed-size run the trajectory must equal
    try:
        want = _train(ref, range(STEPS))
    finally:
        ref.shutdown()
    g = ModelGroup("sft/policy", _cfg([1, 2], start_timeout_s=30), tiny_path)
    try:
        assert g.world_size == 1  # the cluster has room for one
        got = _train(g, range(3))
        assert g.world_size == 1 and not g._joining  # the second slot is pending: nothing to start
        _add_node(cluster)
        end = time.monotonic() + 60
        while not g._joining and time.monotonic() < end:  # the slot is placed; the next boundary starts a rank
            g.admit()
            time.sleep(0.2)
        g.wait_for_replacements(180)  # it warms up in the background and joins at a boundary
        assert g.world_size == 2
        got += _train(g, range(3, STEPS))
        joins = [e for e in g.take_events() if e["event"] == "join"]
        assert len(joins) == 1 and joins[0]["world_size"] == 2 and joins[0]["step"] == 3
        assert len({m.node_id for m in g.members}) == 2  # one rank on each node
        assert got == pytest.approx(want, abs=1e-5)
        assert g.step == STEPS
    finally:
        g.shutdown()


def test_group_below_its_minimum_at_start_fails_after_start_timeout_naming_the_minimum_and_leaves_nothing_pending(
        cluster, tiny_path):
    t0 = time.monotonic()
    with pytest.raises(BelowMinimum, match=r"group 'sft/policy': 1 rank\(s\), fewer than its minimum of 2 "
                                           r"\(at start, after 2 s\).*2 of 3 slots of \{'CPU': 1"):
        ModelGroup("sft/policy", _cfg([2, 3], start_timeout_s=2), tiny_path)
    assert time.monotonic() - t0 >= 2
    table = ray.util.placement_group_table()
    assert table and all(pg["state"] == "REMOVED" for pg in table.values())


@pytest.mark.slow  # the drain's leave is also in the below-minimum test; this one adds the trajectory
def test_rank_on_a_drained_node_leaves_at_the_next_boundary_and_no_step_is_lost(cluster, tiny_path):
    ref = ModelGroup("sft/policy", _cfg(1), tiny_path)
    try:
        want = _train(ref, range(STEPS))
    finally:
        ref.shutdown()
    node = _add_node(cluster)
    g = ModelGroup("sft/policy", _cfg(2), tiny_path)  # fixed size: one rank per node
    try:
        got = _train(g, range(3))
        on_node = [r for r, m in enumerate(g.members) if m.node_id == node.node_id]
        assert len(on_node) == 1
        _drain(node)
        got += _train(g, range(3, STEPS))
        leaves = [e for e in g.take_events() if e["event"] == "leave"]
        assert [(e["reason"], e["rank"], e["step"], e["world_size"]) for e in leaves] == [("drained", on_node[0], 3, 1)]
        assert g.step == STEPS and g.world_size == 1
        assert got == pytest.approx(want, abs=1e-5)
    finally:
        g.shutdown()


def test_range_group_below_its_minimum_after_a_drain_waits_min_wait_s_then_fails_naming_why(cluster, tiny_path):
    node = _add_node(cluster)
    g = ModelGroup("sft/policy", _cfg([2, 3], start_timeout_s=30, min_wait_s=3), tiny_path)
    try:
        assert g.world_size == 2
        _train(g, range(2))
        _drain(node)
        t0 = time.monotonic()
        with pytest.raises(BelowMinimum, match=r"1 rank\(s\), fewer than its minimum of 2 \(after waiting 3 s "
                                               r"at step 2\)"):
            g.train_step(rows_of(2))
        assert time.monotonic() - t0 >= 3
        assert g.step == 2  # nothing committed is lost: the group is as step 2 left it
        events = g.take_events()
        assert [e["event"] for e in events][-2:] == ["leave", "below_min"]
        assert events[-2]["reason"] == "drained"
    finally:
        g.shutdown()


@pytest.mark.slow  # two vLLM engines and a cluster; the join and leave of an engine are in test_rollout.py
def test_engine_pool_sized_1_to_2_generates_with_one_and_takes_in_the_second_when_a_node_is_added(cluster, tiny_path):
    from rayllm.config import RolloutConfig, SamplingConfig
    from rayllm.rollout import RolloutPool

    pool = RolloutPool(RolloutConfig(num_engines=[1, 2], chunk_size=2, cpus_per_engine=1, start_timeout_s=300),
                       tiny_path)
    try:
        prompts = [[5 + i % 50, 6, 7 + i % 3] for i in range(16)]
        s = SamplingConfig(n=1, temperature=0, max_tokens=6)
        first = pool.generate(prompts, s)
        assert len(pool._alive()) == 1 and len(pool._starting) == 1  # the second is a pending actor
        _add_node(cluster)
        end = time.monotonic() + 300
        while pool._starting and time.monotonic() < end:
            pool._poll_started()
            time.sleep(0.5)
        assert len(pool._alive()) == 2
        out = pool.generate(prompts, s)
        assert [x.response_ids for x in out] == [x.response_ids for x in first]
        assert all(ray.get(pool.engines[i].chunks_served.remote()) > 0 for i in range(2))
    finally:
        pool.shutdown()
