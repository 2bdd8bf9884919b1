"""Re-forming a ModelGroup's process group on the same actors (ModelGroup.setup again)."""
import glob
import math

import pytest

from rayllm.config import GroupConfig
from rayllm.group import ModelGroup

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _shm(addr: str, port: int) -> list[str]:
    """DeepSpeed's CPU shm allreduce buffers of the process group whose master is addr:port."""
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_*"))


def test_ranks_map_no_shm_and_a_reformed_group_trains_over_a_new_master(tiny_path, random_rows):
    """DeepSpeed maps its CPU shm all-reduce buffers once per process (shm_initialize returns early
    once initialised, csrc/cpu/comm/shm.cpp): after a re-formation a new rank would spin waiting for
    files its surviving peers never create. rayllm keeps that path off (LOCAL_SIZE=1; training's
    collectives are gloo's), so no buffer files exist for either formation, and re-forming works."""
    rows = random_rows(8)
    g = ModelGroup("reform/policy", GroupConfig(num_ranks=2, zero_stage=1, micro_batch_size=4), tiny_path)
    try:
        g.train_step(rows)
        trained = g.eval_loss(rows)
        old = g._masters[0]
        g.reform()  # re-form on the same actors: a new master port, the state from the snapshots
        new = g._masters[1]
        assert new != old and g.epoch == 1
        assert g.eval_loss(rows) == pytest.approx(trained, abs=1e-6)
        assert math.isfinite(g.train_step(rows)["loss"])
        assert _shm(*old) == [] and _shm(*new) == []
    finally:
        g.shutdown()
