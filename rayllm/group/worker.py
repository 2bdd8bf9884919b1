"""The Ray actor that hosts one rank of a ModelGroup: a thin shell around RankEngine that also
keeps the rank's snapshots (its own and its neighbour's) for elastic recovery.

`ping` and `pid` run on their own thread (the "control" concurrency group), so the driver can
tell a rank blocked in a collective (answers) from one whose process is frozen (does not).
"""
from __future__ import annotations

import os
import socket
import time
import ray

from rayllm.env import apply_worker_env
from rayllm.leave_notice import LeaveNotice


@ray.remote(concurrency_groups={"control": 1})
class ModelWorker:
    def __init__(self, member_id: int = 0) -> None:
        apply_worker_env()
        self.engine = None
        self._exchange = None  # the snapshot swap with the neighbours (rayllm.group.state.Exchange)
        self.member_id = member_id
        # (epoch, member id, step) -> snapshot: this rank's own (its member id) and its neighbour's copy
        self._snapshots: dict[tuple[int, int, int], dict] = {}
        self._leave = LeaveNotice()  # SIGTERM: leave at the next step boundary

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="control")
    def leaving(self) -> bool:
        """Whether this rank was told to leave (SIGTERM)."""
        return self._leave.given

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """This rank's process id (tests and the chaos hook signal it from outside)."""
        return os.getpid()

    def ready(self, model_path: str | None = None, kind: str = "causal_lm") -> bool:
        """Import what a rank needs (DeepSpeed, and the model's transformers classes, built once
        on the meta device), so a replacement is warm when it joins: a fresh process otherwise
        spends seconds on imports inside the re-formation, where every rank waits for it."""
        import torch

        import rayllm.group.engine  # noqa: F401

        try:  # DeepSpeed imports this in ZeRO's first optimizer check: it compiles Muon's kernels
            # with torch.compile, pulling in inductor (1.6 s on this machine's core, inside the join)
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
        except ImportError:
            pass
        if model_path:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

            cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
            with torch.device("meta"):
                cls.from_config(AutoConfig.from_pretrained(model_path, local_files_only=True))
        return True

    def node(self) -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, rank: int, world_size: int, master: tuple[str, int], local: tuple[int, int],
              name: str, model_path: str, kind: str, cfg_json: str, trainable: bool, total_steps: int,
              restore: list | None = None) -> dict:
        """(Re)join the group and build the engine; with `restore` (references to the snapshots
        of every rank of the last committed step), its trainable state comes from them."""
        from rayllm.config import GroupConfig
        from rayllm.group.engine import RankEngine, init_process_group

        self.engine, self._exchange = None, None  # a rebuild drops the old engine before the old group goes
        t = time.perf_counter()
        from rayllm.group.state import from_wire

        snaps = [from_wire(x) for x in ray.get(restore[0], timeout=600)] if restore else None
        cfg = GroupConfig.model_validate_json(cfg_json)
        init_process_group(rank, world_size, master[0], master[1], local[0], local[1],
                           rendezvous_timeout_s=cfg.elastic.rendezvous_timeout_s)
        try:
            self.engine = RankEngine(name, model_path, kind, cfg, trainable, total_steps, restore=snaps)
        except BaseException:
            self._teardown()
            raise
        del snaps
        self._exchange = None
        if trainable and cfg.elastic.enabled:
            import torch.distributed as dist

            from rayllm.group.state import Exchange

            # A gloo group on every device: snapshots live in host memory (NCCL would need them on GPU).
            group = dist.new_group(backend="gloo") if world_size > 1 else None
            self._exchange = Exchange(group, rank, world_size)
        from rayllm.group.state import is_replicated

        return {"step": self.engine.step_count, "setup_s": time.perf_counter() - t,
                "replicated": bool(trainable and is_replicated(self.engine.engine))}

    def close(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Drop the engine and leave the process group. Closing this rank's sockets makes peers
        still waiting on it in a collective fail at once, instead of at the collective timeout."""
        from rayllm.group.engine import close_process_group

        self.engine = None
        self._exchange = None
        try:
            close_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a dead peer may not close cleanly
            pass

    def put_state_dict(self, adapter_only: bool = False) -> list | None:
        """Gather the full weights and keep them in the object store, owned by this rank; rank
        0 answers with [reference] (a list, so Ray hands back the reference, not the tensors)."""
        sd = self._guarded(self.engine.full_state_dict, adapter_only)
        return None if sd is None else [ray.put(sd)]

    # ---- the rank's calls, typed: a misspelt method fails at the driver's call site --------------
    # Forwards answer (outputs, work): work is {"busy_s", "work_tokens"}, the rank's speed (speed.py).
    def eval_loss(self, shards: list) -> tuple[dict[str, float], dict]:
        return self._guarded(self.engine.eval_loss, shards), self.engine.last_work

    def logprobs(self, shards: list, temperature: float = 1.0) -> tuple[list, dict]:
        return self._guarded(self.engine.logprobs, shards, temperature), self.engine.last_work

    def values(self, shards: list) -> tuple[list, dict]:
        return self._guarded(self.engine.values, shards), self.engine.last_work

    def scores(self, shards: list) -> tuple[list, dict]:
        return self._guarded(self.engine.scores, shards), self.engine.last_work

    def save_hf(self, path: str) -> None:
        return self._guarded(self.engine.save_hf, path)

    def param_stats(self) -> dict[str, int]:
        return self._guarded(self.engine.param_stats)

    def weight_meta(self) -> list:
        return self._guarded(self.engine.weight_meta)

    def lora_merge_spec(self) -> dict | None:
        return self._guarded(self.engine.lora_merge_spec)

    def open_channel(self, spec_json: str) -> None:
        return self._guarded(self.engine.open_channel, spec_json)

    def broadcast_weights(self) -> dict[str, float]:
        return self._guarded(self.engine.broadcast_weights)

    def _guarded(self, fn, *args, **kwargs):
        if self.engine is None:
            raise RuntimeError("rank has no engine (its group is being re-formed)")
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self._teardown()  # the group cannot go on after a failed call: see _teardown
            raise

    # ---- elastic steps (docs/elasticity.md) ---------------------------------------------------
    def train_step(self, shards: list, global_count: int | None, loss: str, loss_kwargs: dict,
                   epoch: int, committed: int, peer: int | None, inject: bool = False) -> dict:
        """One optimizer step, then (with elasticity on) a snapshot of the new state kept here and
        swapped with the neighbours: this rank's goes to rank r-1, and rank r+1's (member `peer`;
        None over one rank) is kept here. A rank that returns holds both, so a step every rank
        returned from is committed. Every rank has committed step `committed` of membership
        `epoch`: older snapshots are dropped."""
        self._prune(epoch, committed)
        if inject:
            from rayllm.chaos import InjectedFault

            rank = self.engine_rank()
            self._teardown()
            raise InjectedFault(f"chaos: injected into rank {rank} (member {self.member_id})")
        out = self._guarded(self.engine.train_step, shards, global_count, loss=loss, **loss_kwargs)
        if self._exchange is not None:
            t = time.perf_counter()
            self.snapshot_now(epoch, peer)
            out["snapshot_s"] = time.perf_counter() - t
        return out

    def engine_rank(self) -> int | None:
        return None if self.engine is None else self.engine.rank

    def snapshot_now(self, epoch: int, peer: int | None) -> None:
        """A snapshot of the current state, kept here and swapped with the neighbours: this rank's
        goes to rank r-1, and rank r+1's (member `peer`; None over one rank) is kept here. Every
        rank calls it together (the swap is point to point between them)."""
        snap = self.engine.snapshot()
        step = self.engine.step_count
        self._snapshots[(epoch, self.member_id, step)] = snap
        if peer is not None:
            self._snapshots[(epoch, peer, step)] = self._guarded(self._exchange.swap, snap)

    def _prune(self, epoch: int, committed: int) -> None:
        """Every rank holds its own and its neighbour's snapshot of (epoch, committed): drop the rest."""
        for key in [k for k in self._snapshots if k[0] < epoch or k[2] < committed]:
            del self._snapshots[key]

    def save_snapshot_files(self, directory: str) -> None:
        """This rank's current state into a disk checkpoint (rayllm.group.checkpoint_files)."""
        from rayllm.group.checkpoint_files import write_snapshot

        write_snapshot(self.engine.snapshot(), directory, self.engine.rank)

    def load_snapshot_files(self, directory: str, world_size: int) -> int:
        """Restore the state a disk checkpoint of `world_size` ranks holds, whatever this group's
        size; returns its step count."""
        from rayllm.group.checkpoint_files import read_snapshots
        from rayllm.group.state import restore

        snaps = read_snapshots(directory, world_size)
        self.engine.step_count = self._guarded(restore, self.engine.engine, snaps)
        return self.engine.step_count

    def holdings(self) -> list[tuple[int, int, int]]:
        """(epoch, member id, step) of every snapshot this rank holds."""
        return sorted(self._snapshots)

    def share(self, keys: list[tuple[int, int, int]]) -> list:
        """The snapshots named, put in the object store (owned by this live rank), in order."""
        from rayllm.group.state import to_wire

        return [ray.put(to_wire(self._snapshots[tuple(k)])) for k in keys]
