"""ModelGroup: one model role (policy, reference, reward, critic) hosted by N Ray actors, one
DeepSpeed rank each, placed with a Ray placement group that other groups may share, and elastic:
a rank that dies, hangs or fails is replaced without restarting the job (docs/elasticity.md)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import ray

from rayllm.chaos import Chaos
from rayllm.config import GroupConfig
from rayllm.data.stream import RowRefs
from rayllm.env import remote_env
from rayllm.group import batching
from rayllm.group.membership import Member, Timings
from rayllm.group.placement import Placement, RankSlots
from rayllm.group.recovery import Pending, Recovery
from rayllm.group.shm import release_shm
from rayllm.group.speed import SpeedBook
from rayllm.group.worker import ModelWorker
from rayllm.io import write_json_atomic, write_text_atomic
from rayllm.remote import gather


_FORMATIONS = itertools.count()

CHECKPOINT_META = "rayllm.json"  # beside each checkpoint's rank files: <dir>/<tag>/rayllm.json
CHECKPOINT_FORMAT = "rayllm-snapshots-1"  # every rank's snapshot, safetensors + JSON (checkpoint_files.py)


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


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[str]:
    """Delete all but the `keep_last` newest checkpoints (by step) that rayllm wrote in
    `directory`, never the one `latest` names; returns the tags deleted."""
    directory = Path(directory)
    latest = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
    tags = []
    for d in directory.iterdir():
        meta = d / CHECKPOINT_META
        if d.is_dir() and meta.is_file() and not d.name.endswith(".partial"):
            tags.append((int(json.loads(meta.read_text()).get("step", 0)), d.name))
    doomed = [t for _, t in sorted(tags)[:-keep_last] if t != latest]
    for t in doomed:
        shutil.rmtree(directory / t, ignore_errors=True)
    return doomed


class ModelGroup(Recovery):
    """One role's ranks, elastic: a dead, hung or failing rank is evicted, the survivors re-form
    with state from each other's RAM and the call in flight is retried with the same global
    batch; a replacement joins at a later step boundary (docs/elasticity.md)."""

    def __init__(self, name: str, cfg: GroupConfig, model_path: str | Path, kind: str = "causal_lm",
                 trainable: bool = True, total_steps: int = 1000, placement: Placement | None = None,
                 pad_id: int = 0, setup_timeout_s: float = 600.0):
        self.name, self.cfg, self.kind, self.pad_id = name, cfg, kind, pad_id
        self.model_path = str(model_path)
        self._own_placement = placement is None
        least, most = cfg.size_range
        if placement is not None and cfg.per_slot_placement:
            raise ValueError(f"group {name!r}: num_ranks as a range, or rank_resources, needs the group's own "
                             "placement (a placement group per rank slot); a shared one is fixed")
        if cfg.per_slot_placement:
            self.placement = RankSlots.of(most, cfg.cpus_per_rank, cfg.gpus_per_rank, cfg.rank_resources)
            slots = self.placement.wait_for(least, cfg.elastic.start_timeout_s, name)
        else:
            self.placement = placement or Placement.create(most, cfg.cpus_per_rank, cfg.gpus_per_rank)
            if self.placement.num_bundles < most:
                raise ValueError(f"group {name!r}: {most} ranks but only {self.placement.num_bundles} bundles")
            slots = range(most)
        self._trainable, self._total_steps, self._timeout_s = trainable, total_steps, setup_timeout_s
        self._member_ids = itertools.count()
        self.members: list[Member] = [self._spawn(i) for i in slots]
        self._joining: list[tuple[Member, ray.ObjectRef]] = []  # replacements starting up
        self._leave_ids: dict[int, str] = {}  # member id -> why it was told to leave (it goes at a boundary)
        self._masters: list[tuple[str, int]] = []  # every group formed, for shm cleanup
        self.epoch = -1  # membership epoch: +1 at every (re-)formation
        self._epoch_members: dict[int, list[int]] = {}
        self.step = 0  # optimizer steps committed on every rank
        self.events: list[dict] = []  # faults, recoveries and joins, drained by take_events()
        self._calls: Counter = Counter()  # forward calls dispatched, per method (for chaos)
        self._broken = False  # a call failed on input: re-form before the next one
        self._chaos = Chaos(name, cfg.chaos)
        e = cfg.elastic
        self._timings = Timings(e.hang_factor, e.hang_grace_s, e.min_samples, cfg.call_timeout_s)
        self.speeds = SpeedBook(e.speed_ema, e.balance_deadband)  # per member, for shares of each call
        try:
            self.setup()
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, bundle: int) -> Member:
        p = self.placement
        mid = next(self._member_ids)
        actor = ModelWorker.options(
            **p.actor_options(bundle), name=None,
            runtime_env={"env_vars": remote_env()}, scheduling_strategy=p.strategy(bundle),
        ).remote(mid)
        return Member(mid, actor, bundle)

    @property
    def workers(self) -> list:
        return [m.actor for m in self.members]

    @property
    def world_size(self) -> int:
        return len(self.members)

    def setup(self, restore: list | None = None) -> None:
        """(Re)form the process group over the current members and build each rank's engine, its
        trainable state from `restore` (references to the snapshots of every rank of one
        committed step) when given, else from the model's files."""
        timeout_s = self._timeout_s
        self.members.sort(key=lambda m: m.bundle)
        nodes = self._wait([w.node.remote() for w in self.workers], "node", timeout_s=timeout_s)
        pids = self._wait([w.pid.remote() for w in self.workers], "pid", timeout_s=timeout_s)
        for m, (node_id, _), pid in zip(self.members, nodes, pids):
            m.node_id, m.pid = node_id, pid
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
        self.epoch += 1
        self._epoch_members[self.epoch] = [m.id for m in self.members]
        cfg_json = self.cfg.model_dump_json()
        refs = [w.setup.remote(r, len(self.workers), master, local[r], self.name, self.model_path, self.kind,
                               cfg_json, self._trainable, self._total_steps, [restore] if restore else None)
                for r, w in enumerate(self.workers)]
        self._fire({f.rank: f for f in self._chaos.due("setup", self.epoch + 1)})  # a fault during (re-)formation
        res = self._wait(refs, "setup", timeout_s=timeout_s)
        self._broken = False
        self.last_setup_s = max(r["setup_s"] for r in res)
        self._replicated = res[0]["replicated"]
        if self._trainable:
            self.step = res[0]["step"]
            if self._share is not None:
                self._snapshot_all()  # redundancy for the new layout before its first step

    @property
    def _share(self) -> bool | None:
        """Whether ranks keep snapshots (None: no, elasticity is off or the model is frozen) and
        hand them to a neighbour (over more than one rank; at ZeRO-0 in fp32 each snapshot is the
        whole state, but copying it is what lets any member's loss be covered the same way)."""
        if not (self._trainable and self.cfg.elastic.enabled):
            return None
        return self.world_size > 1

    def _wait(self, refs: list, method: str, ranks: list[int] | None = None, timeout_s: float | None = None) -> list:
        """gather with this group's deadline (cfg.call_timeout_s unless given); a timeout names
        the group, the method and the ranks that did not answer (refs[i] is ranks[i]'s call)."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        return gather(refs, timeout_s or self.cfg.call_timeout_s, what=f"group {self.name!r}: {method}",
                      names=[f"rank {r}" for r in ranks])

    # ---- compute ------------------------------------------------------------------------------
    def train_step(self, rows: list[dict] | RowRefs, loss: str = "sft", global_count: int | None = None,
                   **loss_kwargs) -> dict:
        """One optimizer step on a global batch: rows of token lists with loss masks (and, for
        the PPO losses, per-target fields), or references to rows of a packed dataset that the
        ranks read themselves. `global_count` is what the loss is a mean over (default: the
        batch's target tokens; pairs for "pairwise"). Returns once the step is committed on
        every rank; a fault retries it over the ranks then present."""
        return self.train_step_async(rows, loss, global_count, **loss_kwargs).result()

    def train_step_async(self, rows: list[dict] | RowRefs, loss: str = "sft", global_count: int | None = None,
                         **loss_kwargs) -> Pending:
        """train_step started on the ranks; `.result()` waits (and commits). Lets two groups
        (policy and critic) train at once. One step at a time per group: the next is started
        after this one's result."""
        if not self._trainable:
            raise RuntimeError(f"group {self.name!r} is frozen and cannot train")
        self._before_call()
        if global_count is None and not isinstance(rows, RowRefs):
            global_count = batching.count_loss_tokens(rows)
        target = self.step + 1
        faults = {f.rank: f for f in self._chaos.due("train_step", target)}

        planned: list = []

        def launch(_attempt: int) -> list:
            shards = self._plan("train_step", rows, lockstep=self.cfg.zero_stage >= 2,
                                unit=2 if loss == "pairwise" else 1, planned=planned)
            refs = [m.actor.train_step.remote(s, global_count, loss, loss_kwargs, self.epoch, self.step, self._peer(r),
                                              inject=(_attempt == 0 and faults.get(r) is not None
                                                      and faults[r].kind == "raise"))
                    for r, (m, s) in enumerate(zip(self.members, shards))]
            if _attempt == 0:
                self._fire(faults)
            return refs

        def finish(res: list) -> dict:
            return {**_merge_steps(res), **self._record_speeds("train_step", planned[0], res)}

        return Pending(self, "train_step", launch, finish, commit_step=target)

    def _plan(self, kind: str, rows, lockstep: bool, unit: int = 1, planned: list | None = None) -> list:
        """The batch cut over the members present, balancing their measured costs when
        elastic.balance is on (docs/heterogeneous.md); `planned` gets the members it was cut for."""
        ids = [m.id for m in self.members]
        costs = self.speeds.costs(kind, ids) if self.cfg.elastic.balance else None
        if planned is not None:
            planned[:] = [(ids, costs)]
        return batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id, costs=costs,
                             lockstep=lockstep, unit=unit, by_rows=self.cfg.elastic.lockstep_split == "rows")

    def _record_speeds(self, kind: str, planned: tuple, work: list[dict]) -> dict:
        """Each member's micro-batch timings into the speed book; the step's view of it: the
        world size, each rank's share of the tokens computed and its speed."""
        ids, _ = planned
        for mid, w in zip(ids, work):
            self.speeds.add(kind, mid, w["samples"])
        total = sum(w["work_tokens"] for w in work)
        return {"world_size": len(ids),
                "rank_shares": [round(w["work_tokens"] / max(1, total), 4) for w in work],
                "rank_tokens_per_s": [round(w["work_tokens"] / w["busy_s"], 1) if w["busy_s"] > 0 else None
                                      for w in work]}

    def eval_loss(self, rows: list[dict] | RowRefs) -> float:
        planned: list = []

        def launch(_attempt: int) -> list:
            shards = self._plan("eval_loss", rows, lockstep=self.cfg.zero_stage == 3, planned=planned)
            return [w.eval_loss.remote(s) for w, s in zip(self.workers, shards)]

        def finish(res: list) -> list:
            self._record_speeds("eval_loss", planned[0], [w for _, w in res])
            return [r for r, _ in res]

        res = self._call("eval_loss", launch, finish).result()
        return sum(r["loss_sum"] for r in res) / max(1, sum(r["tokens"] for r in res))

    def logprobs(self, rows: list[dict], temperature: float = 1.0) -> list:
        """Per-row next-token log-probs (length len(input_ids) - 1), in the order given, under
        softmax(logits / temperature): the footing of the rollout engines' log-probs."""
        return self.logprobs_async(rows, temperature).result()

    def values(self, rows: list[dict]) -> list:
        """Per-row critic values (length len(input_ids) - 1), aligned with the targets."""
        return self.values_async(rows).result()

    def scores(self, rows: list[dict]) -> list[float]:
        """Per-row reward-model scores."""
        return self.scores_async(rows).result()

    def logprobs_async(self, rows: list[dict], temperature: float = 1.0) -> Pending:
        """logprobs started on every rank (so several groups' forwards overlap); `.result()` waits."""
        return self._forward("logprobs", rows, lambda w, s: w.logprobs.remote(s, temperature))

    def values_async(self, rows: list[dict]) -> Pending:
        return self._forward("values", rows, lambda w, s: w.values.remote(s))

    def scores_async(self, rows: list[dict]) -> Pending:
        return self._forward("scores", rows, lambda w, s: w.scores.remote(s))

    def _forward(self, method: str, rows: list[dict], remote) -> Pending:
        """A forward-only call over rows, `remote(worker, shard)` on every rank; `.result()` gives
        its per-row outputs in the order given (trimmed to each row's length for per-token ones)."""
        plans: list = []
        planned: list = []

        def launch(_attempt: int) -> list:
            plans[:] = [self._plan(method, rows, lockstep=self.cfg.zero_stage == 3, planned=planned)]
            return [remote(w, s) for w, s in zip(self.workers, plans[0])]

        def per_row(res: list) -> list:
            self._record_speeds(method, planned[0], [w for _, w in res])
            flat = [row for (rank_out, _), shard in zip(res, plans[0]) for t, mb in zip(rank_out, shard)
                    if not mb.get("filler") for row in t]
            if method == "scores":
                return [float(x) for x in flat[: len(rows)]]
            return [flat[i][: len(r["input_ids"]) - 1] for i, r in enumerate(rows)]

        return self._call(method, launch, per_row)

    # ---- state --------------------------------------------------------------------------------
    def save_hf(self, path: str | Path) -> Path:
        self._on_every_rank("save_hf", lambda w: w.save_hf.remote(str(path)))
        return Path(path)

    def _on_every_rank(self, method: str, remote) -> list:
        """`remote(worker)` on every rank (no batch to re-plan), retried after a fault."""
        return self._call(method, lambda _a: [remote(w) for w in self.workers], lambda res: res).result()

    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict | None = None,
                        keep_last: int | None = None) -> str:
        """Every rank's snapshot as files (rayllm.group.checkpoint_files: safetensors and JSON, no
        pickle, loadable at any world size), then the client state (JSON-serialisable) as
        <tag>/rayllm.json. All of it is written under <tag>.partial, renamed to <tag> once complete,
        and `latest` is written last: a crash mid-save leaves the previous checkpoint as the one
        resumed from. `keep_last`: older checkpoints beyond that many are deleted."""
        if not self._trainable:
            raise RuntimeError(f"group {self.name!r} is frozen: it has nothing to checkpoint")
        directory = Path(directory)
        tag = f"step{step}"
        partial, final = directory / f"{tag}.partial", directory / tag
        shutil.rmtree(partial, ignore_errors=True)
        state = {**(client_state or {}), "step": step, "world_size": self.world_size, "format": CHECKPOINT_FORMAT}
        # a retry after a fault (over other ranks) starts the partial directory afresh
        self._call("save_snapshot_files",
                   lambda _a: (shutil.rmtree(partial, ignore_errors=True),
                               [w.save_snapshot_files.remote(str(partial)) for w in self.workers])[1],
                   lambda res: res).result()
        state["world_size"] = self.world_size
        write_json_atomic(partial / CHECKPOINT_META, state)
        if final.exists():  # the same step saved again (a rerun): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(directory / "latest", tag)
        if keep_last:
            prune_checkpoints(directory, keep_last)
        return tag

    def load_checkpoint(self, directory: str | Path, tag: str | None = None, data: str | None = None) -> dict | None:
        """Load checkpoint `tag` (default: the latest) and return its client state; None when
        there is none. Its rayllm.json is checked first (see checkpoint_meta), and with `data`
        given, a checkpoint whose "data" fingerprint differs is refused. The checkpoint may have
        been taken on any number of ranks."""
        found = checkpoint_meta(directory, tag)
        if found is None:
            return None
        tag, meta = found
        if data is not None and meta.get("data") != data:
            raise CheckpointRefused(f"group {self.name!r}: the checkpoint {Path(directory) / tag} was taken on "
                                    f"other data ({meta.get('data')} != {data}); remove it to start over")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointRefused(f"group {self.name!r}: {Path(directory) / tag} is in format "
                                    f"{meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}; remove it to start over")
        path, n = str(Path(directory) / tag), int(meta["world_size"])
        self._call("load_snapshot_files", lambda _a: [w.load_snapshot_files.remote(path, n) for w in self.workers],
                   lambda res: res).result()
        self.step = int(meta.get("step", 0))
        if self._share is not None:
            # The loaded state is the committed one now: snapshot it, so a fault before the next
            # step has it to recover to.
            self._snapshot_all()
        return meta

    def full_state_dict(self, adapter_only: bool = False) -> dict:
        return self._wait([self.full_state_dict_ref(adapter_only)], "full_state_dict", [0])[0]

    def full_state_dict_ref(self, adapter_only: bool = False) -> ray.ObjectRef:
        """The gathered weights as an object-store reference held by rank 0: consumers (rollout
        engines) fetch them from there without a copy through the driver."""
        self._before_call()
        out = self._call("put_state_dict", lambda _a: [w.put_state_dict.remote(adapter_only) for w in self.workers],
                         lambda res: res).result()
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
        return self.workers[0].open_channel.remote(spec_json)

    def weight_meta(self) -> list:
        return self._wait([self.workers[0].weight_meta.remote()], "weight_meta", [0])[0]

    def lora_merge_spec(self) -> dict | None:
        """How the engines merge this group's pushed LoRA weights (peft's adapter name and
        per-module scaling, read on rank 0: rayllm.rollout.weights); None without LoRA."""
        return self._wait([self.workers[0].lora_merge_spec.remote()], "lora_merge_spec", [0])[0]

    def broadcast_weights_refs(self) -> list[ray.ObjectRef]:
        """Every rank gathers, rank 0 broadcasts on the channel; the engines must be receiving."""
        return [w.broadcast_weights.remote() for w in self.workers]

    def param_stats(self) -> list[dict]:
        return self._on_every_rank("param_stats", lambda w: w.param_stats.remote())

    def shutdown(self) -> None:
        """Close every rank's process group (freeing its shared memory), then end the actors.
        Ranks that cannot answer are killed anyway; their local shm files are removed here."""
        actors = [m.actor for m in getattr(self, "members", [])] + [m.actor for m, _ in getattr(self, "_joining", [])]
        try:
            ray.get([w.close.remote() for w in actors], timeout=30)
        except Exception:  # noqa: BLE001 - a dead or hung rank must not block shutdown
            pass
        for w in actors:
            ray.kill(w, no_restart=True)
        self.members, self._joining = [], []
        for addr, port in self._masters:
            release_shm(addr, port)
        if self._own_placement and getattr(self, "placement", None) is not None:
            self.placement.remove()


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
    if any("snapshot_s" in r for r in res):  # the peer snapshot after the step: elasticity's cost per step
        out["snapshot_s"] = max(r.get("snapshot_s", 0.0) for r in res)
    return out


def total_steps(num_rows: int, global_batch: int, epochs: int, max_steps: int | None) -> int:
    steps = (num_rows // global_batch) * epochs
    return min(steps, max_steps) if max_steps else steps
