"""Cleanup of DeepSpeed's CPU shared-memory collective buffers."""
from __future__ import annotations

import glob
import os


def release_shm(master_addr: str, master_port: int | str) -> int:
    """Remove the shared-memory files of a process group. DeepSpeed's CPU shm allreduce creates
    /dev/shm/deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank> (69 MB each here) and never
    unlinks them; left alone they filled a 24 GB machine's memory within a few test runs."""
    n = 0
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_addr}_{master_port}_*"):
        try:
            os.unlink(f)
            n += 1
        except FileNotFoundError:
            pass
    return n
