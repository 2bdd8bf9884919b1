"""ModelGroup: one model role (policy, reference, reward, critic) hosted by N Ray actors, one
DeepSpeed rank each, placed with a Ray placement group that other groups may share."""
from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayllm.config import GroupConfig
from rayllm.data.stream import RowRefs
from rayllm.env import worker_env
from rayllm.group import batching
from rayllm.group.shm import release_shm
from rayllm.group.worker import ModelWorker
from rayllm.io import write_json_atomic, write_text_atomic
from rayllm.remote import gather


@dataclass
class Placement:
    """Bundles ranks are placed on. Groups colocated on one Placement each take `share` of every
    bundle, so e.g. a policy and its reference model sit on the same devices."""

    pg: PlacementGroup
    cpus: float
    gpus: float
    share: float = 1.0

    @classmethod
    def create(cls, num_bundles: int, cpus: float, gpus: float = 0.0, share: float = 1.0,
               strategy: str = "PACK", timeout_s: float = 120.0) -> "Placement":
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([dict(bundle) for _ in range(num_bundles)], strategy=strategy)
        if not pg.wait(timeout_s):
            remove_placement_group(pg)
            raise RuntimeError(
                f"placement group of {num_bundles} x {bundle} not schedulable within {timeout_s:.0f} s; "
                f"cluster has {ray.cluster_resources()}"
            )
        return cls(pg, cpus, gpus, share)

    @property
    def num_bundles(self) -> int:
        return len(self.pg.bundle_specs)


_FORMATIONS = itertools.count()

CHECKPOINT_META = "rayllm.json"  # beside each checkpoint's DeepSpeed files: <dir>/<tag>/rayllm.json


class CheckpointRefused(ValueError):
    """A checkpoint rayllm will not load: not written by rayllm, or taken on other data."""


def checkpoint_meta(directory: str | Path, tag: str | None = None) -> tuple[str, dict] | None:
    """(tag, client state) of checkpoint `tag` in `directory` (default: the one `latest` names),
    read from the JSON rayllm writes beside it, without unpickling anything; None when there is
    no `latest`. DeepSpeed's files are pickles, which can run code when loaded: a tag that is not
    a plain name inside `directory`, or one without that JSON (not written by rayllm), is refused."""
    directory = Path(directory)
    if tag is None:
        latest = directory / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
    if not tag or tag in (".", "..") or Path(tag).name != tag:
        raise CheckpointRefused(f"checkpoint tag {tag!r} in {directory} is not a directory name; refusing to load it")
    meta = directory / tag / CHECKPOINT_META
    if not meta.is_file():
        raise CheckpointRefused(f"{directory / tag} has no {CHECKPOINT_META}: not a checkpoint rayllm wrote, so it "
                                "is not loaded (its pickles could run code); remove it to start over")
    return tag, json.loads(meta.read_text())


class ModelGroup:
    def __init__(self, name: str, cfg: GroupConfig, model_path: str | Path, kind: str = "causal_lm",
                 trainable: bool = True, total_steps: int = 1000, placement: Placement | None = None,
                 pad_id: int = 0, setup_timeout_s: float = 600.0):
        self.name, self.cfg, self.kind, self.pad_id = name, cfg, kind, pad_id
        self.model_path = str(model_path)
        self._own_placement = placement is None
        self.placement = placement or Placement.create(cfg.num_ranks, cfg.cpus_per_rank, cfg.gpus_per_rank)
        if self.placement.num_bundles < cfg.num_ranks:
            raise ValueError(f"group {name!r}: {cfg.num_ranks} ranks but only {self.placement.num_bundles} bundles")
        p = self.placement
        self.workers = [
            ModelWorker.options(
                num_cpus=p.cpus * p.share, num_gpus=p.gpus * p.share, name=None,
                runtime_env={"env_vars": worker_env()},
                scheduling_strategy=PlacementGroupSchedulingStrategy(p.pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(cfg.num_ranks)
        ]
        self._trainable, self._total_steps, self._timeout_s = trainable, total_steps, setup_timeout_s
        self._masters: list[tuple[str, int]] = []  # every group formed, for shm cleanup
        try:
            self.setup()
        except BaseException:
            self.shutdown()
            raise

    def setup(self) -> None:
        """(Re)form the process group and build each rank's engine. Safe to call again on the
        same actors, e.g. after a rank was replaced; state then comes from load_checkpoint."""
        trainable, total_steps, timeout_s = self._trainable, self._total_steps, self._timeout_s
        nodes = self._wait([w.node.remote() for w in self.workers], "node", timeout_s=timeout_s)
        per_node, seen = Counter(n for n, _ in nodes), Counter()
        local = []
        for node_id, _ in nodes:
            local.append((seen[node_id], per_node[node_id]))
            seen[node_id] += 1
        (port,) = self._wait([self.workers[0].free_port.remote()], "free_port", [0], timeout_s)
        master = (nodes[0][1], port)
        self._masters.append(master)
        # Identifies this formation of the ranks: a weight channel joined by an earlier one is stale.
        self.formation = next(_FORMATIONS)
        cfg_json = self.cfg.model_dump_json()
        self._wait([
            w.setup.remote(r, len(self.workers), master, local[r], self.name, self.model_path, self.kind,
                           cfg_json, trainable, total_steps)
            for r, w in enumerate(self.workers)
        ], "setup", timeout_s=timeout_s)

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def _wait(self, refs: list, method: str, ranks: list[int] | None = None, timeout_s: float | None = None) -> list:
        """gather with this group's deadline (cfg.call_timeout_s unless given); a timeout names
        the group, the method and the ranks that did not answer (refs[i] is ranks[i]'s call)."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        return gather(refs, timeout_s or self.cfg.call_timeout_s, what=f"group {self.name!r}: {method}",
                      names=[f"rank {r}" for r in ranks])

    def _all(self, method: str, per_rank_args: list[tuple] | None = None, **kwargs) -> list:
        args = per_rank_args or [()] * self.world_size
        return self._wait([w.call.remote(method, *a, **kwargs) for w, a in zip(self.workers, args)], method)

    # ---- compute ------------------------------------------------------------------------------
    def train_step(self, rows: list[dict] | RowRefs, loss: str = "sft", global_count: int | None = None,
                   **loss_kwargs) -> dict:
        """One optimizer step on a global batch: rows of token lists with loss masks (and, for
        the PPO losses, per-target fields), or references to rows of a packed dataset that the
        ranks read themselves. `global_count` is what the loss is a mean over (default: the
        batch's target tokens; pairs for "pairwise")."""
        return self.train_step_async(rows, loss, global_count, **loss_kwargs).result()

    def train_step_async(self, rows: list[dict] | RowRefs, loss: str = "sft", global_count: int | None = None,
                         **loss_kwargs) -> "Pending":
        """train_step started on the ranks; `.result()` waits. Lets two groups (policy and
        critic) train at once."""
        shards = batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id)
        if global_count is None and not isinstance(rows, RowRefs):
            global_count = batching.count_loss_tokens(rows)
        refs = [w.call.remote("train_step", s, global_count, loss=loss, **loss_kwargs)
                for w, s in zip(self.workers, shards)]
        return self._pending(refs, "train_step", _merge_steps)

    def eval_loss(self, rows: list[dict] | RowRefs) -> float:
        shards = batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id)
        res = self._all("eval_loss", [(s,) for s in shards])
        return sum(r["loss_sum"] for r in res) / max(1, sum(r["tokens"] for r in res))

    def logprobs(self, rows: list[dict], temperature: float = 1.0) -> list:
        """Per-row next-token log-probs (length len(input_ids) - 1), in the order given, under
        softmax(logits / temperature): the footing of the rollout engines' log-probs."""
        return self.forward_async("logprobs", rows, temperature=temperature).result()

    def values(self, rows: list[dict]) -> list:
        """Per-row critic values (length len(input_ids) - 1), aligned with the targets."""
        return self.forward_async("values", rows).result()

    def scores(self, rows: list[dict]) -> list[float]:
        """Per-row reward-model scores."""
        return self.forward_async("scores", rows).result()

    def forward_async(self, method: str, rows: list[dict], **kwargs) -> "Pending":
        """A forward-only rank method over rows, started on every rank; `.result()` gives its
        per-row outputs in the order given (trimmed to each row's length for per-token ones)."""
        shards = batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id)
        refs = [w.call.remote(method, s, **kwargs) for w, s in zip(self.workers, shards)]

        def per_row(res: list) -> list:
            flat = [row for rank_out, shard in zip(res, shards) for t, mb in zip(rank_out, shard)
                    if not mb.get("filler") for row in t]
            if method == "scores":
                return [float(x) for x in flat[: len(rows)]]
            return [flat[i][: len(r["input_ids"]) - 1] for i, r in enumerate(rows)]

        return self._pending(refs, method, per_row)

    def _pending(self, refs: list, method: str, finish) -> "Pending":
        return Pending(refs, finish, lambda: self._wait(refs, method))

    # ---- state --------------------------------------------------------------------------------
    def save_hf(self, path: str | Path) -> Path:
        self._all("save_hf", [(str(path),)] * self.world_size)
        return Path(path)

    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict | None = None) -> str:
        """DeepSpeed checkpoint of every rank, then the client state (JSON-serialisable) as
        <tag>/rayllm.json, which load_checkpoint checks before anything is unpickled. `latest`
        is written last, so a crash mid-save leaves the previous checkpoint as the one resumed from."""
        tag = f"step{step}"
        state = {**(client_state or {}), "step": step}
        self._all("save_checkpoint", [(str(directory), tag, state)] * self.world_size)
        write_json_atomic(Path(directory) / tag / CHECKPOINT_META, state)
        write_text_atomic(Path(directory) / "latest", tag)
        return tag

    def load_checkpoint(self, directory: str | Path, tag: str | None = None, data: str | None = None) -> dict | None:
        """Load checkpoint `tag` (default: the latest) and return its client state; None when
        there is none. Its rayllm.json is checked first (see checkpoint_meta), and with `data`
        given, a checkpoint whose "data" fingerprint differs is refused, all before any rank
        unpickles a file (which the ranks then do with weights_only=True)."""
        found = checkpoint_meta(directory, tag)
        if found is None:
            return None
        tag, meta = found
        if data is not None and meta.get("data") != data:
            raise CheckpointRefused(f"group {self.name!r}: the checkpoint {Path(directory) / tag} was taken on "
                                    f"other data ({meta.get('data')} != {data}); remove it to start over")
        self._all("load_checkpoint", [(str(directory), tag)] * self.world_size)
        return meta

    def full_state_dict(self, adapter_only: bool = False) -> dict:
        return self._wait([self.full_state_dict_ref(adapter_only)], "full_state_dict", [0])[0]

    def full_state_dict_ref(self, adapter_only: bool = False) -> ray.ObjectRef:
        """The gathered weights as an object-store reference held by rank 0: consumers (rollout
        engines) fetch them from there without a copy through the driver."""
        out = self._wait([w.put_state_dict.remote(adapter_only) for w in self.workers], "put_state_dict")
        return out[0][0]

    # ---- weight channel to rollout engines (rayllm.rollout.transport) --------------------------
    def channel_endpoint(self) -> dict:
        """Where rank 0 can host a weight channel: its node's address, a free port there, and
        the backend of its device (NCCL on GPU, gloo on CPU)."""
        w = self.workers[0]
        (_, host), port = self._wait([w.node.remote(), w.free_port.remote()], "channel_endpoint", [0, 0])
        return {"host": host, "port": port, "backend": "nccl" if self.placement.gpus > 0 else "gloo"}

    def open_channel_ref(self, spec_json: str) -> ray.ObjectRef:
        """Rank 0 joins the channel (returns at once; completes when every member has joined)."""
        return self.workers[0].call.remote("open_channel", spec_json)

    def weight_meta(self) -> list:
        return self._wait([self.workers[0].call.remote("weight_meta")], "weight_meta", [0])[0]

    def lora_merge_spec(self) -> dict | None:
        """How the engines merge this group's pushed LoRA weights (peft's adapter name and
        per-module scaling, read on rank 0: rayllm.rollout.weights); None without LoRA."""
        return self._wait([self.workers[0].call.remote("lora_merge_spec")], "lora_merge_spec", [0])[0]

    def broadcast_weights_refs(self) -> list[ray.ObjectRef]:
        """Every rank gathers, rank 0 broadcasts on the channel; the engines must be receiving."""
        return [w.call.remote("broadcast_weights") for w in self.workers]

    def param_stats(self) -> list[dict]:
        return self._all("param_stats")

    def shutdown(self) -> None:
        """Close every rank's process group (freeing its shared memory), then end the actors.
        Ranks that cannot answer are killed anyway; their local shm files are removed here."""
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=30)
        except Exception:  # noqa: BLE001 - a dead or hung rank must not block shutdown
            pass
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        for addr, port in self._masters:
            release_shm(addr, port)
        if self._own_placement:
            remove_placement_group(self.placement.pg)


class Pending:
    """Results of a call started on every rank: `.result()` waits (failing as soon as any rank
    fails, and past the group's deadline, like ModelGroup._all) and post-processes them."""

    def __init__(self, refs: list, finish, wait):
        self.refs, self.finish, self._wait = refs, finish, wait

    def result(self):
        return self.finish(self._wait())


def _merge_steps(res: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in res)
    out = {
        "loss": sum(r["loss_sum"] for r in res) / max(1, tokens),
        "tokens": tokens,
        "grad_norm": res[0]["grad_norm"],
        "lr": res[0]["lr"],
        "skipped": any(r["skipped"] for r in res),
        "compute_s": max(r["compute_s"] for r in res),  # the slowest rank's, on the rank itself
    }
    for key in res[0]["stats"]:  # diagnostic sums -> means over the same units as the loss
        out[key.removesuffix("_sum")] = sum(r["stats"][key] for r in res) / max(1, tokens)
    if "loss_scale" in res[0]:
        out["loss_scale"] = res[0]["loss_scale"]
    return out


def total_steps(num_rows: int, global_batch: int, epochs: int, max_steps: int | None) -> int:
    steps = (num_rows // global_batch) * epochs
    return min(steps, max_steps) if max_steps else steps
