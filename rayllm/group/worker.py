"""The Ray actor that hosts one rank of a ModelGroup: a thin shell around RankEngine."""
from __future__ import annotations

import os
import socket
from typing import Any

import ray

from rayllm.env import apply_worker_env


@ray.remote
class ModelWorker:
    def __init__(self) -> None:
        apply_worker_env()
        self.engine = None

    def node(self) -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def pid(self) -> int:
        """This rank's process id (tests freeze a rank with SIGSTOP to make it hang)."""
        return os.getpid()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, rank: int, world_size: int, master: tuple[str, int], local: tuple[int, int],
              name: str, model_path: str, kind: str, cfg_json: str, trainable: bool, total_steps: int) -> None:
        from rayllm.config import GroupConfig
        from rayllm.group.engine import RankEngine, init_process_group

        self.engine = None  # a rebuild drops the old engine before the old group goes
        init_process_group(rank, world_size, master[0], master[1], local[0], local[1])
        cfg = GroupConfig.model_validate_json(cfg_json)
        self.engine = RankEngine(name, model_path, kind, cfg, trainable, total_steps)

    def close(self) -> None:
        from rayllm.group.engine import close_process_group

        self.engine = None
        close_process_group()

    def put_state_dict(self, adapter_only: bool = False) -> list | None:
        """Gather the full weights and keep them in the object store, owned by this rank; rank
        0 answers with [reference] (a list, so Ray hands back the reference, not the tensors)."""
        sd = self.engine.full_state_dict(adapter_only)
        return None if sd is None else [ray.put(sd)]

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.engine, method)(*args, **kwargs)
