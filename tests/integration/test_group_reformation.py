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


def test_reforming_removes_the_old_groups_shm_files_at_once_and_the_group_still_trains(tiny_path, random_rows):
    """init_process_group used to read the master it was replacing after overwriting it, so it
    released the new group's (nonexistent) files and left the old group's until shutdown."""
    rows = random_rows(8)
    g = ModelGroup("reform/policy", GroupConfig(num_ranks=2, zero_stage=1, micro_batch_size=4), tiny_path)
    try:
        g.train_step(rows)
        old = g._masters[0]
        old_files = _shm(*old)
        assert old_files  # DeepSpeed created them: 2 ranks on one node
        g.setup()  # re-form on the same actors: a new master port
        assert math.isfinite(g.train_step(rows)["loss"])
        new = g._masters[1]
        assert new != old
        assert _shm(*old) == []  # released when the old group was torn down, not at shutdown
        # The new group has no files to keep: DeepSpeed maps its shm buffers once per process
        # (shm_initialize returns early once initialised, csrc/cpu/comm/shm.cpp), so the re-formed
        # group creates none and the ranks keep their first mapping (used only by DeepSpeed's
        # inference_all_reduce, not by training).
        assert _shm(*new) == []
    finally:
        g.shutdown()
    assert _shm(*old) == [] and _shm(*new) == []
