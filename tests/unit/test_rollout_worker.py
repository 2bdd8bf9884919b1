"""The async PPO rollout worker (rayllm.trainer.rollout_worker, docs/async_ppo.md) on plain
Python callables: the order it takes work in, the version gate, and the window metrics."""
import threading
import time

import pytest

from rayllm.config import PPO, PPOAlgoConfig
from rayllm.trainer.ppo import window_metrics
from rayllm.trainer.rollout_worker import RolloutWorker, busy_seconds, overlap_seconds


def _worker(version, log, k, last=6):
    def make(j):
        log.append(("batch", j, version[0]))
        return {"j": j, "version": version[0], "generate_s": 0.0}
    return RolloutWorker(make, 1, last, lambda j: version[0] >= (j - 1) - k, poll_s=0.01)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_no_batch_starts_before_the_engines_hold_version_j_minus_1_minus_k(k):
    version, log = [0], []
    w = _worker(version, log, k)
    try:
        for j in range(1, 7):
            b = w.batch(j)
            assert b["version"] >= (j - 1) - k
            # the trainer "trains" batch j, then pushes version j through the worker
            w.call(lambda j=j: version.__setitem__(0, j))
        drawn = {j: v for kind, j, v in log if kind == "batch"}
        assert drawn == {j: max(0, j - 1 - k) if k else j - 1 for j in range(1, 7)}
    finally:
        w.stop()


def test_a_job_runs_before_the_next_batch_and_a_failed_batch_is_raised_to_the_trainer():
    gate, order = threading.Event(), []

    def make(j):
        order.append(f"batch{j}")
        if j == 2:
            raise RuntimeError("every rollout engine died")
        return {"generate_s": 0.0}
    w = RolloutWorker(make, 1, 3, lambda j: gate.is_set() or j == 1, poll_s=0.01)
    try:
        w.batch(1)
        fut = w.submit(lambda: order.append("push"))
        gate.set()
        fut.result(timeout=5)
        with pytest.raises(RuntimeError, match="every rollout engine died"):
            w.batch(2)
        with pytest.raises(RuntimeError, match="every rollout engine died"):
            w.batch(3)  # the worker stopped: batch 3 is never made
        assert order == ["batch1", "push", "batch2"]
    finally:
        w.stop()


def test_the_trainer_answers_requests_while_it_waits_for_a_batch():
    version, polls = [0], []

    def poll():  # the trainer side, on its own thread: takes a lost snapshot again
        polls.append(threading.current_thread().name)
        version[0] = 1
    w = RolloutWorker(lambda j: {"generate_s": 0.0}, 1, 1, lambda j: version[0] >= 1, poll_s=0.01)
    try:
        w.batch(1, poll)
        assert polls and all(n == threading.current_thread().name for n in polls)
    finally:
        w.stop()


def test_busy_and_overlap_seconds_of_a_window():
    gen = [(0.0, 4.0), (3.0, 6.0), (8.0, 12.0)]
    train = [(5.0, 9.0)]
    assert busy_seconds(gen, 0.0, 10.0) == pytest.approx(8.0)  # [0, 6] and [8, 10]
    assert busy_seconds(gen, 2.0, 5.0) == pytest.approx(3.0)
    assert overlap_seconds(gen, train, 0.0, 10.0) == pytest.approx(2.0)  # [5, 6] and [8, 9]
    m = window_metrics(gen, train, 0.0, 10.0)
    assert m == pytest.approx({"iteration_s": 10.0, "trainer_idle_s": 6.0, "engine_idle_s": 2.0, "overlap_share": 0.2})
    assert window_metrics([(0.0, 2.0)], [(2.0, 5.0)], 0.0, 5.0)["overlap_share"] == 0.0  # sync: none


def test_async_with_trainer_logprobs_needs_the_truncated_is_weight():
    with pytest.raises(ValueError, match="tis_cap"):
        PPO(algo=PPOAlgoConfig(max_staleness=1, tis_cap=None))
    PPO(algo=PPOAlgoConfig(max_staleness=1))  # tis_cap's default
    PPO(algo=PPOAlgoConfig(max_staleness=2, behavior_logprobs="engine", tis_cap=None))
    with pytest.raises(ValueError, match="max_staleness"):
        PPOAlgoConfig(max_staleness=-1)
