"""ModelGroup: one model role (policy, reference, reward, critic) hosted by N Ray actors, one
DeepSpeed rank each, placed with a Ray placement group that other groups may share, and elastic:
a rank that dies, hangs or fails is replaced without restarting the job (docs/elasticity.md)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayllm.chaos import Chaos
from rayllm.config import GroupConfig
from rayllm.data.stream import RowRefs
from rayllm.env import worker_env
from rayllm.group import batching
from rayllm.group.membership import (INPUT_ERRORS, PENDING, Member, Timings, cause, evict, is_comm_error, is_dead,
                                      settle, unresponsive)
from rayllm.group.shm import release_shm
from rayllm.group.worker import ModelWorker
from rayllm.io import write_json_atomic, write_text_atomic
from rayllm.remote import CallTimeout, gather


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


class StateLost(RuntimeError):
    """The ranks lost held state no survivor has a copy of (e.g. two neighbours at ZeRO-1/2/3
    before one commit): the stage must resume from its last disk checkpoint."""


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


class ModelGroup:
    """One role's ranks, elastic: a dead, hung or failing rank is evicted, the survivors re-form
    with state from each other's RAM and the call in flight is retried with the same global
    batch; a replacement joins at a later step boundary (docs/elasticity.md)."""

    def __init__(self, name: str, cfg: GroupConfig, model_path: str | Path, kind: str = "causal_lm",
                 trainable: bool = True, total_steps: int = 1000, placement: Placement | None = None,
                 pad_id: int = 0, setup_timeout_s: float = 600.0):
        self.name, self.cfg, self.kind, self.pad_id = name, cfg, kind, pad_id
        self.model_path = str(model_path)
        self._own_placement = placement is None
        self.placement = placement or Placement.create(cfg.num_ranks, cfg.cpus_per_rank, cfg.gpus_per_rank)
        if self.placement.num_bundles < cfg.num_ranks:
            raise ValueError(f"group {name!r}: {cfg.num_ranks} ranks but only {self.placement.num_bundles} bundles")
        self._trainable, self._total_steps, self._timeout_s = trainable, total_steps, setup_timeout_s
        self._member_ids = itertools.count()
        self.members: list[Member] = [self._spawn(i) for i in range(cfg.num_ranks)]
        self._joining: list[tuple[Member, ray.ObjectRef]] = []  # replacements starting up
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
        try:
            self.setup()
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, bundle: int) -> Member:
        p = self.placement
        mid = next(self._member_ids)
        actor = ModelWorker.options(
            num_cpus=p.cpus * p.share, num_gpus=p.gpus * p.share, name=None,
            runtime_env={"env_vars": worker_env()},
            scheduling_strategy=PlacementGroupSchedulingStrategy(p.pg, placement_group_bundle_index=bundle),
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
                # Redundancy for the new layout before the next step: every rank snapshots the
                # state it rebuilt and its neighbour copies it.
                refs = [w.snapshot_now.remote(self.epoch, self._share) for w in self.workers]
                self._commit(self.step, self._wait(refs, "snapshot"))

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

    def _all(self, method: str) -> list:
        return self._all_same(method)

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
                         **loss_kwargs) -> "Pending":
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

        def launch(_attempt: int) -> list:
            shards = batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id)
            refs = [m.actor.train_step.remote(s, global_count, loss, loss_kwargs, self.epoch, self.step, self._share,
                                              inject=(_attempt == 0 and faults.get(r) is not None
                                                      and faults[r].kind == "raise"))
                    for r, (m, s) in enumerate(zip(self.members, shards))]
            if _attempt == 0:
                self._fire(faults)
            return refs

        return Pending(self, "train_step", launch, _merge_steps, commit_step=target)

    def eval_loss(self, rows: list[dict] | RowRefs) -> float:
        def launch(_attempt: int) -> list:
            shards = batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id)
            return [w.call.remote("eval_loss", s) for w, s in zip(self.workers, shards)]

        res = self._call("eval_loss", launch, lambda r: r).result()
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
        plans: list = []

        def launch(_attempt: int) -> list:
            plans[:] = [batching.plan(rows, self.world_size, self.cfg.micro_batch_size, self.pad_id)]
            return [w.call.remote(method, s, **kwargs) for w, s in zip(self.workers, plans[0])]

        def per_row(res: list) -> list:
            flat = [row for rank_out, shard in zip(res, plans[0]) for t, mb in zip(rank_out, shard)
                    if not mb.get("filler") for row in t]
            if method == "scores":
                return [float(x) for x in flat[: len(rows)]]
            return [flat[i][: len(r["input_ids"]) - 1] for i, r in enumerate(rows)]

        return self._call(method, launch, per_row)

    def _call(self, method: str, launch, finish) -> "Pending":
        """A call on every rank, retried after a fault; `launch(attempt)` dispatches it over the
        members present (re-planning its batch)."""
        self._before_call()
        self._calls[method] += 1
        faults = {f.rank: f for f in self._chaos.due(method, self._calls[method])}

        def go(attempt: int) -> list:
            refs = launch(attempt)
            if attempt == 0:
                self._fire(faults)
            return refs

        return Pending(self, method, go, finish)

    def _fire(self, faults: dict) -> None:
        for rank, f in faults.items():
            if f.kind in ("kill", "hang") and rank < len(self.members):
                m = self.members[rank]
                self._chaos.fire(f, m.node_id, m.pid)

    # ---- faults (docs/elasticity.md) -----------------------------------------------------------
    def _resolve(self, p: "Pending"):
        e = self.cfg.elastic
        for attempt in range(e.max_retries + 1):
            if attempt > 0:
                p.refs = p.launch(attempt)
            t = time.monotonic()
            deadline = self._timings.deadline(p.method)
            # After a first failure the others get a second to fail too; those still running are
            # then told apart by a ping (blocked in a collective, or frozen), in _handle_fault.
            out = settle(p.refs, deadline, min(1.0, e.abort_timeout_s))
            if all(o is not PENDING and not isinstance(o, Exception) for o in out):
                self._timings.add(p.method, time.monotonic() - t)
                value = p.finish(out)
                if p.commit_step is None:
                    return value
                if self._share is None:  # no snapshots to exchange
                    self.step = p.commit_step
                    return value
                committed = self._try_commit(p.commit_step, [o["snapshot"] for o in out])
                if committed:
                    return value
                if self.step == p.commit_step:  # the fault came after every rank took the step
                    return value
                continue
            if not e.enabled:
                self._raise_first(p.method, out, deadline)
            self._handle_fault(p.method, p.refs, out, deadline, time.monotonic() - t)
        raise RuntimeError(f"group {self.name!r}: {p.method} failed {e.max_retries + 1} times; see the events "
                           f"({self.events[-3:]})")

    def _raise_first(self, method: str, out: list, deadline: float):
        for o in out:
            if isinstance(o, Exception):
                raise o
        late = [f"rank {r}" for r, o in enumerate(out) if o is PENDING]
        raise CallTimeout(f"group {self.name!r}: {method}: no answer within {deadline:g} s from "
                          f"{', '.join(late)} ({len(late)} of {len(out)} pending)")

    def _try_commit(self, step: int, snapshot_refs: list) -> bool:
        """Hand every rank its neighbour's snapshot of `step`; the step is committed when all have
        taken it. False after a fault (handled: the group re-formed at the last complete step)."""
        try:
            self._commit(step, snapshot_refs)
            return True
        except _CommitFailed as f:
            self._handle_fault("commit", f.refs, f.out, self.cfg.elastic.abort_timeout_s, upto=step)
            return False

    def _commit(self, step: int, snapshot_refs: list) -> None:
        n = len(self.members)
        refs = []
        for r, m in enumerate(self.members):
            peer = self.members[(r + 1) % n]
            share = snapshot_refs[(r + 1) % n] if n > 1 else None
            refs.append(m.actor.commit.remote(self.epoch, step, peer.id, share))
        out = settle(refs, self._timings.deadline("commit"), self.cfg.elastic.abort_timeout_s)
        if any(o is PENDING or isinstance(o, Exception) for o in out):
            if not self.cfg.elastic.enabled:
                raise next((o for o in out if isinstance(o, Exception)),
                           CallTimeout(f"group {self.name!r}: commit: no answer"))
            raise _CommitFailed(refs, out)
        self.step = step

    def _handle_fault(self, method: str, refs: list, out: list, deadline: float, waited_s: float | None = None,
                      upto: int | None = None) -> None:
        """Classify what happened to each rank's call, evict the faulty, re-form over the rest."""
        e = self.cfg.elastic
        t_detect = time.time()
        members = list(self.members)
        dead = [m for m, o in zip(members, out) if is_dead(o)]
        pending = [m for m, o in zip(members, out) if o is PENDING]
        errors = [(m, cause(o)) for m, o in zip(members, out) if isinstance(o, Exception) and not is_dead(o)]
        hung = unresponsive(pending, e.ping_timeout_s) if pending else []
        raised = []
        if not dead and not hung:
            if pending and not errors:  # every rank alive and answering, just late
                self._raise_first(method, out, deadline)
            own = [(m, err) for m, err in errors if not is_comm_error(err)]
            bad_input = [err for _, err in errors if isinstance(err, INPUT_ERRORS)]
            if bad_input or (own and len(own) == len(members)):
                # Wrong input, or every rank failing alike: the call's own error, which a retry on
                # other ranks would only repeat. The ranks tore their group down: the next call re-forms.
                self._broken = True
                raise (bad_input or [err for _, err in own])[0]
            raised = [m for m, _ in own]
        kinds = {**{m.id: "death" for m in dead}, **{m.id: "hang" for m in hung}, **{m.id: "raise" for m in raised}}
        evict(hung + raised)
        # Survivors blocked on an evicted peer now fail out of their collectives; one that still
        # has not answered after abort_timeout_s is evicted as well.
        rest = [(m, r) for m, r, o in zip(members, refs, out) if o is PENDING and m not in hung]
        if rest:
            late = settle([r for _, r in rest], e.abort_timeout_s, e.abort_timeout_s)
            stuck = [m for (m, _), o in zip(rest, late) if o is PENDING]
            kinds.update({m.id: "stuck" for m in stuck})
            evict(stuck)
        lost = [m for m in members if m.id in kinds]
        ranks = {m.id: r for r, m in enumerate(members)}
        why = {m.id: f"{type(err).__name__}: {' '.join(str(err).split())[:600]}" for m, err in errors}
        for m in lost:
            sent = self._chaos.sent_at(m.pid)
            self.events.append({
                "event": "fault", "kind": kinds[m.id], "group": self.name, "rank": ranks[m.id], "member": m.id,
                "pid": m.pid, "call": method, "step": self.step + 1, "epoch": self.epoch,
                "detect_s": round(t_detect - sent, 3) if sent else None,
                "waited_s": None if waited_s is None else round(waited_s, 3), **({"error": why[m.id]} if m.id in why else {}),
            })
        self._recover([m for m in members if m.id not in kinds], lost, t_detect, upto)

    def _recover(self, survivors: list[Member], lost: list[Member], t_detect: float, upto: int | None = None) -> None:
        """Re-form over the survivors with state from their snapshots; start replacements."""
        t0 = time.time()
        if self.cfg.elastic.replace:
            for m in lost:
                new = self._spawn(m.bundle)
                self._joining.append((new, new.actor.ready.remote(self.model_path, self.kind)))
        for attempt in range(self.cfg.elastic.max_retries + 1):
            if not survivors and not self._trainable and self._joining:
                # A frozen group keeps no state: its replacements rebuild from the weights files.
                refs = [r for _, r in self._joining]
                settle(refs, self._timeout_s, self._timeout_s)
                survivors = [m for m, _ in self._joining]
                self._joining = []
            if not survivors:
                raise StateLost(f"group {self.name!r}: every rank was lost; resume from the last disk checkpoint")
            self.members = survivors
            try:
                restore = self._sources(upto) if self._trainable else None
                self.setup(restore)
                break
            except StateLost:
                raise
            except Exception as err:  # noqa: BLE001 - a fault during recovery: find who, and go again
                gone = unresponsive(survivors, self.cfg.elastic.ping_timeout_s)
                if not gone:
                    raise
                # The others give up waiting for the lost rank within the rendezvous timeout.
                settle([m.actor.ready.remote() for m in survivors if m not in gone],
                       self.cfg.elastic.rendezvous_timeout_s + 30, 0)
                evict(gone)
                for m in gone:
                    self.events.append({"event": "fault", "kind": "death", "group": self.name, "member": m.id,
                                        "pid": m.pid, "call": "recovery", "step": self.step + 1,
                                        "epoch": self.epoch, "detect_s": None, "error": str(err)[:200]})
                    if self.cfg.elastic.replace:
                        new = self._spawn(m.bundle)
                        self._joining.append((new, new.actor.ready.remote(self.model_path, self.kind)))
                survivors = [m for m in survivors if m not in gone]
        for ev in self.events:
            if ev["event"] == "fault" and "recover_s" not in ev:
                ev["recover_s"] = round(time.time() - t_detect, 3)
                ev["world_size_after"] = self.world_size
        self.events.append({"event": "recovered", "group": self.name, "epoch": self.epoch, "step": self.step,
                            "world_size": self.world_size, "reform_s": round(time.time() - t0, 3)})

    def _sources(self, upto: int | None = None) -> list:
        """References to the snapshots of every member of one epoch at one step, held by the
        members now present: the latest complete set at or before step `upto` (default: the
        committed step; a commit that failed part-way passes its own step, whose results are in
        hand) (docs/elasticity.md). When each rank holds the whole state (ZeRO-0 in fp32), one
        snapshot is enough. Raises StateLost."""
        upto = self.step if upto is None else upto
        holdings = self._wait([m.actor.holdings.remote() for m in self.members], "holdings")
        held: dict[tuple[int, int, int], Member] = {}
        for m, keys in zip(self.members, holdings):
            for key in keys:
                held.setdefault(tuple(key), m)
        candidates = sorted({(ep, st) for ep, _, st in held if st <= upto}, reverse=True)
        for ep, st in candidates:
            need = self._epoch_members.get(ep, [])
            if getattr(self, "_replicated", False):
                need = [next(mid for e, mid, s in held if (e, s) == (ep, st))]
            if need and all((ep, mid, st) in held for mid in need):
                by_holder: dict[int, list] = {}
                for mid in need:
                    by_holder.setdefault(held[(ep, mid, st)].id, []).append((ep, mid, st))
                holders = {m.id: m for m in self.members}
                refs_of = {}
                for hid, keys in by_holder.items():
                    got = self._wait([holders[hid].actor.share.remote(keys)], "share")[0]
                    refs_of.update(zip(keys, got))
                return [refs_of[(ep, mid, st)] for mid in need]
        ep = max((e for e, _, _ in held), default=self.epoch)
        lost = sorted(set(self._epoch_members.get(ep, [])) - {m.id for m in self.members})
        orphans = [mid for mid in self._epoch_members.get(ep, []) if not any(k[:2] == (ep, mid) for k in held)]
        raise StateLost(f"group {self.name!r}: no survivor holds the state of member(s) {orphans or lost} at any "
                        f"committed step (members {lost} were lost together); resume from the last disk checkpoint")

    def admit(self) -> bool:
        """At a step boundary: replacements that are ready join, with state from their peers."""
        if not self._joining:
            return False
        ready = [(m, r) for m, r in self._joining if ray.wait([r], timeout=0)[0]]
        joined = []
        for m, r in ready:
            try:
                ray.get(r)
                joined.append(m)
            except Exception:  # noqa: BLE001 - a replacement that failed to start is dropped
                ray.kill(m.actor, no_restart=True)
        self._joining = [(m, r) for m, r in self._joining if all(m is not x for x, _ in ready)]
        if not joined:
            return False
        t0 = time.time()
        restore = self._sources() if self._trainable else None
        self.members = self.members + joined
        self.setup(restore)
        self.events.append({"event": "join", "group": self.name, "members": [m.id for m in joined],
                            "epoch": self.epoch, "step": self.step, "world_size": self.world_size,
                            "join_s": round(time.time() - t0, 3), "rank_setup_s": round(self.last_setup_s, 3)})
        return True

    def wait_for_replacements(self, timeout_s: float = 300.0) -> None:
        """Block until every replacement started so far has joined (tests, and a stage's end)."""
        end = time.monotonic() + timeout_s
        while self._joining and time.monotonic() < end:
            if not self.admit():
                time.sleep(0.2)
        if self._joining:
            raise CallTimeout(f"group {self.name!r}: replacements did not become ready within {timeout_s:g} s")

    def take_events(self) -> list[dict]:
        out, self.events = self.events, []
        return out

    def heal(self) -> None:
        """After a call outside the group's own calls failed (the weight channel to the rollout
        engines): evict members that died or hang, and re-form over the rest with their state."""
        t = time.time()
        gone = unresponsive(self.members, self.cfg.elastic.ping_timeout_s)
        if not gone:
            self.reform()
            return
        evict(gone)
        for m in gone:
            self.events.append({"event": "fault", "kind": "death", "group": self.name, "rank": self.members.index(m),
                                "member": m.id, "pid": m.pid, "call": "weight push", "step": self.step + 1,
                                "epoch": self.epoch, "detect_s": None})
        self._recover([m for m in self.members if m not in gone], gone, t)

    def reform(self) -> None:
        """Re-form the process group over the current members, what recovery does without a
        fault: a trainable group keeps its state (from the ranks' snapshots), a frozen one
        rebuilds from its files."""
        self.setup(self._sources() if self._share is not None else None)

    def _before_call(self) -> None:
        """A step boundary: re-form a group an input error broke; admit ready replacements."""
        if self._broken:
            self.setup(self._sources() if self._trainable else None)
        self.admit()

    # ---- state --------------------------------------------------------------------------------
    def save_hf(self, path: str | Path) -> Path:
        self._all_same("save_hf", str(path))
        return Path(path)

    def _all_same(self, method: str, *args) -> list:
        """A method with the same arguments on every rank (no batch to re-plan), retried after a fault."""
        return self._call(method, lambda _a: [w.call.remote(method, *args) for w in self.workers],
                          lambda res: res).result()

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
            refs = [w.snapshot_now.remote(self.epoch, self._share) for w in self.workers]
            self._commit(self.step, self._wait(refs, "snapshot"))
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
        if self._own_placement:
            remove_placement_group(self.placement.pg)


class Pending:
    """A call started on every rank: `.result()` waits, past a deadline derived from the call's
    measured times, and after a fault re-forms the group and runs the call again over the ranks
    then present (a train_step also commits), then post-processes the per-rank results."""

    def __init__(self, group: ModelGroup, method: str, launch, finish, commit_step: int | None = None):
        self.group, self.method, self.launch, self.finish, self.commit_step = group, method, launch, finish, commit_step
        self.refs = launch(0)

    def result(self):
        return self.group._resolve(self)


class _CommitFailed(Exception):
    def __init__(self, refs: list, out: list):
        self.refs, self.out = refs, out


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
