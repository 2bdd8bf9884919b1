"""Weight pushes from the policy ModelGroup into the rollout engines, and their verification.

Weights travel one of two ways (`weight_transport`), chosen by device unless set: over a
collective channel, where rank 0 of the policy broadcasts each gathered bucket to every engine
worker (NCCL on GPU; gloo on CPU, which is how the path is tested without a GPU), or through the
object store, where rank 0 puts the full state dict (ZeRO-3 shards included) and every engine
fetches it (no copy through the driver). Either way the engine reloads in place. Then each
engine's teacher-forced log-probs on a fixed probe batch are compared with the trainer's for the
same tokens (rayllm.rollout.verify). A push that fails is retried once; a second failure raises
SyncMismatch, naming the engine and its statistics, instead of letting a run train on rollouts
from stale or broken weights. An engine or policy rank that dies or freezes during a push is
replaced and the push goes on to the engines alive (docs/elasticity.md).

`WeightPush` is mixed into RolloutPool, which owns the engines and their lifecycle.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import ray

from rayllm.env import cluster_has_gpus
from rayllm.remote import CallTimeout, gather
from rayllm.rollout import verify as check
from rayllm.rollout.errors import DEAD, PushInterrupted, SnapshotLost, SyncMismatch, cause, log


@dataclass
class Snapshot:
    """Policy weights taken for a later push (WeightPush.capture)."""

    ref: ray.ObjectRef  # the full state dict, held in the object store by policy rank 0
    lora: dict | None  # how the engines merge it (LoRA), None without
    want: list | None  # the trainer's probe log-probs of these weights (None: verify off)
    version: int  # the policy version: its updates so far
    capture_s: float


class WeightPush:
    """sync(group), capture(group) / apply(snapshot) and verify(group) for RolloutPool (see the
    module docstring)."""

    @property
    def transport(self) -> str:
        t = self.cfg.weight_transport
        return ("collective" if cluster_has_gpus() else "object_store") if t == "auto" else t

    def sync(self, group, version: int | None = None) -> dict:
        """Push the policy's current weights into every engine, then verify them; a push that
        fails verification is pushed and verified once more (a transfer can be corrupted once),
        and a second failure raises SyncMismatch. Returns the seconds taken by the gather, the
        push and the verification, the verification's statistics (worst engine) and `attempts`.
        `version` is the policy version the weights are (its updates so far; default: the count
        of pushes), recorded per engine and on every sample drawn from them.

        The trainer computes its probe log-probs while the engines reload (the ranks are idle
        then), and the engines compute theirs in parallel, so verification adds little more
        than one engine forward to the push."""
        lora = group.lora_merge_spec()  # peft's adapter and per-module scaling; None without LoRA
        self._source = (group, lora)

        def push() -> dict:
            push = self._sync_collective if self.transport == "collective" else self._sync_object_store
            return push(group, lora)
        return self._pushed(push, version, group)

    def capture(self, group, version: int) -> Snapshot:
        """The policy's weights as they are now, for a push applied later (async PPO,
        docs/async_ppo.md): the full state dict in the object store and the trainer's probe
        log-probs of the same weights, both taken before the policy's next update. The pool's
        own state is not touched, so the trainer's thread may call it while another thread
        generates."""
        t0 = time.perf_counter()
        lora = group.lora_merge_spec()
        ref = group.full_state_dict_ref()
        want = self._trainer_probe(group) if self.cfg.verify else None
        return Snapshot(ref, lora, want, version, time.perf_counter() - t0)

    def apply(self, snap: Snapshot) -> dict:
        """Load a snapshot into every engine and verify it against the snapshot's own probe
        log-probs (retried once, as sync is). Raises SnapshotLost when its object died with the
        policy rank that held it: the caller takes a new snapshot."""
        self._source = None  # replacements start from the snapshot (self._weights)

        def push() -> dict:
            t1 = time.perf_counter()
            before = self._weights, self._weights_version
            self._weights, self._weights_version = (snap.ref, snap.lora), self._version
            alive = self._alive()
            loads = [self.engines[i].load_weights.remote(snap.ref, snap.lora) for i in alive]
            try:
                self._push_gather(loads, alive, "load_weights")
            except ray.exceptions.ObjectLostError as e:
                # The engines keep the weights they had: this push is labelled with their version
                # (an engine that fetched the snapshot before it was lost is then labelled older
                # than it is, never newer), and replacements start from them.
                self._weights, self._weights_version = before
                self._push_versions[self._version] = self._push_versions[self._version - 1]
                raise SnapshotLost(f"{self.name}: the weights of policy version {snap.version} were lost with "
                                   f"the rank that held them: {cause(e)}") from None
            except DEAD as e:
                raise PushInterrupted(f"{self.name}: an engine died while loading weights: {cause(e)}", alive) from None
            t3 = time.perf_counter()
            out = {"transport": "snapshot", "gather_s": snap.capture_s, "push_s": t3 - t1, "engines": len(alive)}
            return self._verified(out, snap.want, 0.0, t3)
        return self._pushed(push, snap.version, None)

    def _pushed(self, push, version: int | None, group) -> dict:
        """Run `push` as one verified push (sync, apply): retried once after a failed
        verification, and again to the engines alive after an interruption (a death or a freeze
        of an engine, or of a policy rank when `group` takes part in it)."""
        self._calls["push"] += 1
        self._fire("push", self._calls["push"])
        self._version += 1
        self._push_versions[self._version] = self._version if version is None else version
        attempt, lost = 0, 0
        while True:
            attempt += 1
            # Replacements that are ready take part in this push (it loads and verifies them too);
            # with no engine left, wait for one.
            self._poll_started(check=False)
            if not self._alive():
                self._wait_started(self.cfg.start_timeout_s, check=False)
            for i in self._alive():
                self._loaded[i] = self._version
            try:
                return {**push(), "attempts": attempt, "engines_lost": lost}
            except SyncMismatch as e:
                if attempt - lost >= 2:
                    e.report["attempts"] = attempt
                    raise
                log.warning("%s; pushing again (attempt 2 of 2)", e)
                self._channel_key = None  # a broken channel is re-formed for the second try
            except PushInterrupted as e:
                # An engine (or a policy rank) died during the channel set-up, the push or the
                # verification: replace what died and push again to the engines alive. A
                # replacement loads the pushed weights and is verified when it joins.
                lost += 1
                if lost > len(self.engines) + 2:
                    raise RuntimeError(f"{self.name}: the weight push was interrupted {lost} times: {e}") from None
                log.warning("%s; pushing again", e)
                self._channel_key = None
                # Engines first: killing a frozen engine fails the broadcast it blocks on every
                # policy rank at once, which frees the ranks for their group's healing.
                for i in self._dead(e.engines):
                    self.events.append({"event": "fault", "kind": "death", "group": self.name, "rank": i,
                                        "call": "push", "step": self._calls["push"], "detect_s": None})
                    self._lost(i)
                if e.group_hit and group is not None:
                    # Evicts a frozen or dead rank (which releases engines blocked on it) and
                    # re-forms: the ranks tore down their process group when the channel broke.
                    group.heal()

    @property
    def policy_version(self) -> int:
        """The policy version of the latest push (0: the weights the engines started with)."""
        return self._push_versions[self._version]

    def engine_versions(self) -> dict[int, int]:
        """The policy version each engine up now holds."""
        return {i: self._push_versions[self._loaded[i]] for i in self._alive()}

    def _sync_object_store(self, group, lora: dict | None) -> dict:
        t0 = time.perf_counter()
        ref = group.full_state_dict_ref()
        t1 = time.perf_counter()
        self._weights, self._weights_version = (ref, lora), self._version
        alive = self._alive()
        loads = [self.engines[i].load_weights.remote(ref, lora) for i in alive]
        want = self._trainer_probe(group) if self.cfg.verify else None
        t2 = time.perf_counter()
        try:
            self._push_gather(loads, alive, "load_weights")
        except DEAD as e:
            raise PushInterrupted(f"{self.name}: an engine died while loading weights: {cause(e)}", alive) from None
        t3 = time.perf_counter()
        out = {"transport": "object_store", "gather_s": t1 - t0, "push_s": t3 - t1, "engines": len(alive)}
        return self._verified(out, want, t2 - t1, t3)

    def _sync_collective(self, group, lora: dict | None) -> dict:
        t0 = time.perf_counter()
        alive = self._alive()
        self._ensure_channel(group, alive)
        meta = group.weight_meta()
        t1 = time.perf_counter()
        self._weights = None  # a replacement engine fetches the weights from the group itself
        sends = group.broadcast_weights_refs()
        recvs = [self.engines[i].receive_weights.remote(meta, lora) for i in alive]
        names = {**{r: f"{group.name} rank {k}" for k, r in enumerate(sends)},
                 **{r: f"engine {i}" for r, i in zip(recvs, alive)}}
        pending, waiting = sends + recvs, set(sends)
        # The deadline of the whole broadcast (its probe included): elastic's factor x its median
        # time + grace once timed, call_timeout_s until then (rayllm.group.membership.Timings).
        budget, started = self._timings.deadline("broadcast"), time.monotonic()
        deadline = started + budget
        try:
            while waiting:  # fail at once on any error rather than wait on a dead peer
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise CallTimeout(f"{self.name}: weight broadcast: no answer within {budget:g} s from "
                                      f"{', '.join(names[r] for r in pending)} (rollout.call_timeout_s, rollout.elastic)")
                ray.get(done)
                waiting -= set(done)
            t2 = time.perf_counter()
            want = self._trainer_probe(group) if self.cfg.verify else None  # ranks free, engines reloading
            t3 = time.perf_counter()
            gather(pending, max(1.0, deadline - time.monotonic()), f"{self.name}: receive_weights",
                   [names[r] for r in pending])
            self._timings.add("broadcast", time.monotonic() - started)
        except CallTimeout as e:
            if not self.cfg.elastic.enabled:
                raise
            # A frozen engine or policy rank holds the broadcast: the sync loop kills the engines
            # that do not answer a ping, and the group evicts its ranks that do not.
            self._channel_key = None
            raise PushInterrupted(f"{e}; checking which engines and ranks answer", alive, group_hit=True) from None
        except DEAD as e:
            self._channel_key = None  # re-formed with the live engines at the next push
            raise PushInterrupted(f"{self.name}: an engine or a {group.name} rank died during the weight broadcast: "
                                   f"{cause(e)}", alive, group_hit=True) from None
        t4 = time.perf_counter()
        out = {"transport": "collective", "channel_s": t1 - t0, "gather_s": 0.0, "push_s": t4 - t1,
               "broadcast_s": t2 - t1, "engines": len(alive)}
        return self._verified(out, want, t3 - t2, t4)

    def _verified(self, out: dict, want, probe_s: float, t_loaded: float) -> dict:
        if want is not None:
            try:
                out.update(self._compare(want))
            except DEAD as e:
                raise PushInterrupted(f"{self.name}: an engine died during verification: {cause(e)}",
                                       self._alive()) from None
            self._want = want  # what a replacement engine is checked against when it joins
            out["verify_s"] = time.perf_counter() - t_loaded
            out["trainer_probe_s"] = probe_s
        return out

    def _ensure_channel(self, group, alive: list[int]) -> None:
        """(Re)form the weight channel when the policy group or the set of engines changed."""
        key = (group.formation, tuple((i, self._launches[i]) for i in alive))
        if key == self._channel_key:
            return
        # Every step of the channel's formation can meet a death: each is an interrupted push (the
        # sync loop replaces what died, heals the group and pushes again). Members already waiting
        # for a dead one give up after the channel's rendezvous timeout (rollout.elastic).
        rendezvous_s = self.cfg.elastic.rendezvous_timeout_s
        try:
            workers = self._gather([self.engines[i].num_workers.remote() for i in alive], alive, "num_workers")
            ep = group.channel_endpoint()
            spec = {"host": ep["host"], "port": ep["port"], "backend": ep["backend"], "world_size": 1 + sum(workers),
                    "wire_dtype": self.cfg.dtype, "rendezvous_timeout_s": rendezvous_s}
            firsts = np.cumsum([1] + workers[:-1]).tolist()
            gather([group.open_channel_ref(json.dumps(spec))] +
                   [self.engines[i].open_channel.remote(spec, f) for i, f in zip(alive, firsts)],
                   timeout_s=rendezvous_s + 30)
        except DEAD as e:
            raise PushInterrupted(f"{self.name}: an engine or a {group.name} rank died while the weight channel "
                                  f"formed: {cause(e)}", alive, group_hit=True) from None
        except CallTimeout as e:
            if not self.cfg.elastic.enabled:
                raise
            raise PushInterrupted(f"{e}; checking which engines and ranks answer", alive, group_hit=True) from None
        self._channel_key = key

    def probe(self) -> list[list[int]]:
        """The fixed probe batch of this pool's model (rayllm.rollout.verify.probe_rows)."""
        if self._probe_rows is None:
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(self.model_path).vocab_size
            self._probe_rows = check.probe_rows(vocab, self.cfg.probe_rows, self.cfg.probe_len)
        return self._probe_rows

    def _trainer_probe(self, group) -> list[np.ndarray]:
        rows = self.probe()
        return [np.asarray(x, dtype=np.float64) for x in group.logprobs([{"input_ids": r} for r in rows])]

    def verify(self, group) -> dict:
        """Compare every engine with the trainer on the probe batch; returns the statistics of
        the worst engine (see `_compare`) or raises SyncMismatch naming the first bad one."""
        try:
            return self._compare(self._trainer_probe(group))
        except PushInterrupted as e:  # outside a push there is nothing to retry
            raise CallTimeout(str(e)) from None

    def _compare(self, want: list[np.ndarray]) -> dict:
        """Every engine's probe log-probs against the trainer's `want` (rayllm.rollout.verify):
        the worst engine's statistics and "per_engine"; SyncMismatch names the first that fails."""
        alive = self._alive()
        refs = [self.engines[i].prompt_logprobs.remote(self.probe()) for i in alive]
        self._fire("verify", self._calls["push"])
        got = self._push_gather(refs, alive, "prompt_logprobs")
        per_engine = {i: check.gap_stats(g, want) for i, g in zip(alive, got)}
        worst = {k: max(st[k] for st in per_engine.values()) for k in ("mean_gap", "max_gap", "token_prob_error")}
        report = {**worst, "per_engine": per_engine}
        c = self.cfg
        bad = next((i for i, st in per_engine.items() if not check.passes(st, c.mean_tolerance, c.tolerance)), None)
        if bad is not None:
            raise SyncMismatch(f"{self.name}: engine {bad} log-probs differ from the trainer's after the weight push: "
                               f"{check.describe(per_engine[bad], c.mean_tolerance, c.tolerance)}", report)
        return report
