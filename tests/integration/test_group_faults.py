"""Driver-side deadlines: a hung rank (a real one, its process frozen with SIGSTOP) or a slow
Ray call raises CallTimeout naming who did not answer, instead of hanging the driver."""
import os
import signal
import time

import pytest
import ray

from rayllm.config import GroupConfig
from rayllm.group import ModelGroup
from rayllm.remote import CallTimeout, gather

pytestmark = pytest.mark.usefixtures("ray_cluster")


@ray.remote(num_cpus=0.1)
def _sleep(seconds: float, value=None):
    time.sleep(seconds)
    return value


@ray.remote(num_cpus=0.1)
def _fail(message: str):
    raise ValueError(message)


def test_gather_timeout_names_the_call_every_pending_ref_and_the_timeout():
    refs = [ray.put("a"), _sleep.remote(60), _sleep.remote(60)]  # the first one is ready at once
    t = time.monotonic()
    try:
        with pytest.raises(CallTimeout) as e:
            gather(refs, timeout_s=2, what="ppo/rollout: generate", names=["engine 0", "engine 1", "engine 2"])
        assert 2 <= time.monotonic() - t < 20
        msg = str(e.value)
        assert msg.startswith("ppo/rollout: generate: no answer within 2 s from ")
        assert "engine 1" in msg and "engine 2" in msg and "engine 0" not in msg
        assert "(2 of 3 pending)" in msg
        assert isinstance(e.value, TimeoutError)
    finally:
        for r in refs[1:]:
            ray.cancel(r, force=True)


def test_gather_reraises_the_first_failure_without_waiting_for_the_rest():
    refs = [_sleep.remote(60), _fail.remote("rank 1 broke")]
    t = time.monotonic()
    try:
        with pytest.raises(ValueError, match="rank 1 broke"):
            gather(refs, timeout_s=30, what="step", names=["rank 0", "rank 1"])
        assert time.monotonic() - t < 20  # not the 60 s of the slow one, nor the 30 s deadline
    finally:
        ray.cancel(refs[0], force=True)


def test_gather_returns_results_in_order_and_none_timeout_waits_without_deadline():
    assert gather([_sleep.remote(0.5, 1), _sleep.remote(0, 2)], timeout_s=None) == [1, 2]


def test_a_frozen_rank_raises_call_timeout_naming_group_rank_and_method(tiny_path, random_rows):
    """The rank's process is stopped (SIGSTOP) from outside: it is alive but never answers, as a
    rank hung in a collective or a driver call would be. With elasticity off, the deadline is all
    there is (tests/integration/test_elastic.py has the eviction and recovery)."""
    rows = random_rows(8)
    g = ModelGroup("faults/policy", GroupConfig(num_ranks=1, zero_stage=0, call_timeout_s=4,
                                                elastic={"enabled": False}), tiny_path)
    pid = ray.get(g.workers[0].pid.remote(), timeout=60)
    try:
        g.train_step(rows)  # a live rank answers well within the deadline
        os.kill(pid, signal.SIGSTOP)
        for method, call in (("train_step", lambda: g.train_step(rows)),  # Pending.result
                             ("eval_loss", lambda: g.eval_loss(rows))):  # ModelGroup._all
            t = time.monotonic()
            with pytest.raises(CallTimeout) as e:
                call()
            assert 4 <= time.monotonic() - t < 30
            msg = str(e.value)
            assert "'faults/policy'" in msg and "rank 0" in msg and method in msg and "4 s" in msg, msg
    finally:
        os.kill(pid, signal.SIGCONT)
        g.shutdown()
