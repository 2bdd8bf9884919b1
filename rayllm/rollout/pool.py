"""A pool of rollout engines: load-balanced generation that survives engine deaths, and weight
pushes from the policy ModelGroup that are verified before generation goes on.

Generation: prompts are cut into chunks of `chunk_size`; every live engine holds up to two
chunks at a time and gets the next one as soon as it returns one, so fast engines take more.
A chunk whose engine dies is requeued to the others, and a replacement engine is started (with
the latest pushed weights) while they work. Each chunk's result is accepted once, so no prompt
is lost or generated twice into a batch. Sampling seeds are per prompt, not per engine.

Weights travel one of two ways (`weight_transport`), chosen by device unless set: over a
collective channel, where rank 0 of the policy broadcasts each gathered bucket to every engine
worker (NCCL on GPU; gloo on CPU, which is how the path is tested without a GPU), or through the
object store, where rank 0 puts the full state dict (ZeRO-3 shards included) and every engine
fetches it (no copy through the driver). Either way the engine reloads in place. Then each
engine's teacher-forced log-probs on a fixed probe batch are compared with the trainer's for the
same tokens. A push is judged by the mean |delta log p| over the probe's tokens (and the token
probability error exp(mean |delta log p|) derived from it), with a looser bound on the largest
gap: the largest gap of two correct fp32 implementations grows with the logits as the policy
sharpens, while a bad push moves the mean by orders of magnitude (docs/weight_sync.md). A push
that fails is retried once; a second failure raises SyncMismatch, naming the engine and its
statistics, instead of letting a run train on rollouts from stale or broken weights.

Every wait on an engine has a deadline (`call_timeout_s`, `start_timeout_s`): a hung engine
fails the call with an error naming the engine and the call, instead of hanging the driver.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rayllm.chaos import Chaos, send_signal
from rayllm.config import RolloutConfig, SamplingConfig
from rayllm.group.membership import Timings
from rayllm.env import cache_dir, has_cuda, worker_env
from rayllm.rollout.engine import RolloutEngine
from rayllm.remote import CallTimeout, gather
from rayllm.rollout.sample import Sample

_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)
log = logging.getLogger("rayllm.rollout")


class SyncMismatch(RuntimeError):
    """An engine's log-probs disagree with the trainer's after a weight push; `report` holds the
    push's statistics (per engine under "per_engine")."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class _PushInterrupted(RuntimeError):
    """A weight push stopped by a death: `engines` to check, and whether the policy group's ranks
    were in a collective with them (the channel), so the group must heal before the next push."""

    def __init__(self, message: str, engines: list[int], group_hit: bool = False):
        super().__init__(message)
        self.engines, self.group_hit = engines, group_hit


class EngineStartError(RuntimeError):
    """An engine could not start; the message gives the cause."""


class RolloutPool:
    def __init__(self, cfg: RolloutConfig, model_path: str | Path, tokenizer_path: str | Path | None = None,
                 name: str = "rollout"):
        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise EngineStartError(f"{name}: model path {model_path} has no config.json")
        self.cfg, self.name = cfg, name
        self.model_path, self.tokenizer_path = str(model_path), str(tokenizer_path or model_path)
        self._weights: tuple[ray.ObjectRef, dict | None] | None = None  # latest push, for restarts
        self._source: tuple[object, dict | None] | None = None  # (policy group, LoRA merge spec) of it
        self._channel_key: tuple | None = None  # (group formation, engine launches) the open channel joins
        self._launches = [0] * cfg.num_engines  # how often each engine slot was (re)started
        self.restarts = 0
        self.requeued = 0
        self._probe_rows: list[list[int]] | None = None
        self._want: list | None = None  # the trainer's probe log-probs of the last verified push
        self._version = 0  # weight pushes begun; _loaded[i]: the one engine i started with
        self._loaded = [0] * cfg.num_engines
        self._weights_version = 0  # the push whose weights self._weights holds
        self._chaos = Chaos(name, cfg.chaos)
        e = cfg.elastic
        self._timings = Timings(e.hang_factor, e.hang_grace_s, e.min_samples, cfg.call_timeout_s)
        self.events: list[dict] = []  # engine faults, drained with take_events()
        self._calls = {"generate": 0, "push": 0}
        self.verified_replacements = 0
        self.engines: list = [None] * cfg.num_engines
        self._info: list[dict | None] = [None] * cfg.num_engines
        self._starting: dict[ray.ObjectRef, int] = {}
        for i in range(cfg.num_engines):
            self._start(i)
        self._wait_started(cfg.start_timeout_s)

    # ---- engines ------------------------------------------------------------------------------
    def _start(self, i: int) -> None:
        gpus = self.cfg.tensor_parallel_size if has_cuda() else 0
        handle = RolloutEngine.options(
            num_cpus=self.cfg.cpus_per_engine, num_gpus=gpus, max_restarts=0,
            runtime_env={"env_vars": worker_env()}, name=None,
        ).remote(i, self.model_path, self.tokenizer_path, self.cfg.model_dump_json())
        self.engines[i] = handle
        self._launches[i] += 1
        self._loaded[i] = self._weights_version
        ready = handle.info.remote()
        if self._weights is None and self._source is not None:  # last push was collective
            group, lora = self._source
            self._weights = (group.full_state_dict_ref(), lora)
            self._loaded[i] = self._weights_version = self._version
        if self._weights is not None:  # a replacement starts from the latest pushed weights
            ref, lora = self._weights
            ready = _after(handle.load_weights.remote(ref, lora), handle)
        self._starting[ready] = i

    def _wait_started(self, timeout_s: float | None, check: bool = True) -> None:
        """Wait for starting engines; a start-up failure is raised with its cause."""
        for ref, i in list(self._starting.items()):
            try:
                self._info[i] = ray.get(ref, timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - the cause is reported
                self.shutdown()
                raise EngineStartError(f"{self.name}: engine {i} failed to start: {_cause(e)}") from None
            del self._starting[ref]
            if check:
                self._check_joined(i)

    def _poll_started(self, check: bool = True) -> None:
        """Engines started to replace dead ones join once ready (without blocking)."""
        if not self._starting:
            return
        ready, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=0)
        for ref in ready:
            i = self._starting.pop(ref)
            try:
                self._info[i] = ray.get(ref)
            except Exception:  # noqa: BLE001 - a replacement that cannot start stays down
                self.engines[i] = None
                continue
            if check:
                self._check_joined(i)

    def take_events(self) -> list[dict]:
        out, self.events = self.events, []
        return out

    def _fire(self, call: str, n: int) -> None:
        """Chaos faults due at the n-th `call` (docs/elasticity.md): a signal to the engine's process."""
        for f in self._chaos.due(call, n):
            info = self._info[f.rank] if f.rank < len(self._info) else None
            if info is not None:
                self._chaos.fire(f, info["node"], info["pid"])

    def _dead(self, engines: list[int], timeout_s: float = 30.0) -> list[int]:
        """Which of these engines no longer answer an info call within timeout_s (an engine answers
        once its current call returns: after a failed push, the others' calls fail within seconds)."""
        refs = [self.engines[i].info.remote() for i in engines if self.engines[i] is not None]
        out = []
        for i, r in zip([i for i in engines if self.engines[i] is not None], refs):
            try:
                ray.get(r, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - dead or hung: replaced either way
                info = self._info[i]
                if info is not None:  # SIGKILL ends a frozen process too (ray.kill leaves it stopped)
                    try:
                        send_signal(info["node"], info["pid"], signal.SIGKILL)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                ray.kill(self.engines[i], no_restart=True)
                out.append(i)
        return out

    def _check_joined(self, i: int) -> None:
        """A replacement that joins after a verified push is verified against the same trainer
        log-probs: every engine that generates has passed verification of the weights it holds."""
        if self._loaded[i] != self._version and self._version > 0:
            # Started before the latest push (its weights are older): load the latest first.
            if self._weights is None and self._source is not None:
                self._weights = (self._source[0].full_state_dict_ref(), self._source[1])
                self._weights_version = self._version
            ref, lora = self._weights
            self._gather([self.engines[i].load_weights.remote(ref, lora)], [i], "load_weights")
            self._loaded[i] = self._weights_version
        if self._want is None or not self.cfg.verify:
            return
        got = self._gather([self.engines[i].prompt_logprobs.remote(self.probe())], [i], "prompt_logprobs")[0]
        gap = np.abs(np.concatenate([np.asarray(x, dtype=np.float64) for x in got]) - np.concatenate(self._want))
        if not (float(np.mean(gap)) <= self.cfg.mean_tolerance and float(np.max(gap)) <= self.cfg.tolerance):
            raise SyncMismatch(f"{self.name}: replacement engine {i} log-probs differ from the trainer's: mean "
                               f"|delta| {float(np.mean(gap)):.3g}, largest {float(np.max(gap)):.3g}")
        self.verified_replacements += 1

    def _alive(self) -> list[int]:
        return [i for i, e in enumerate(self.engines) if e is not None and self._info[i] is not None]

    def _lost(self, i: int) -> None:
        info, self.engines[i], self._info[i] = self._info[i], None, None
        if info:
            shutil.rmtree(cache_dir() / "tmp" / f"rollout-{i}-{info['pid']}", ignore_errors=True)
        if self.cfg.restart_dead:
            self.restarts += 1
            self._start(i)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | None = None,
                 key: tuple[int, ...] = ()) -> list[Sample]:
        """n samples for every prompt, ordered by (prompt_index, sample_index). Prompt i is
        sampled with the stream stream_seed(sampling.seed, key, i): callers give each batch its
        own key (PPO: the pipeline seed and the iteration), so batches draw fresh noise, and a
        chunk requeued after an engine death reproduces what the dead engine would have drawn."""
        s = sampling or self.cfg.sampling
        s_json, key = s.model_dump_json(), tuple(int(k) for k in key)
        c = self.cfg.chunk_size
        todo = deque(range(0, len(prompts), c))
        # ref -> (slot, chunk start, engine, deadline)
        inflight: dict[ray.ObjectRef, tuple[int, int, object, float]] = {}
        started: dict[ray.ObjectRef, float] = {}
        done: dict[int, list[Sample]] = {}

        def dispatch(i: int) -> None:
            if todo:
                start = todo.popleft()
                ref = self.engines[i].generate.remote(prompts[start:start + c], start, s_json, key)
                # The deadline runs from when the engine can start it (it holds up to two chunks).
                queued = sum(1 for e, _, _, _ in inflight.values() if e == i)
                due = time.monotonic() + (1 + queued) * self._timings.deadline("generate")
                inflight[ref] = (i, start, self.engines[i], due)
                started[ref] = time.monotonic()

        self._poll_started()
        for _ in range(2):
            for i in self._alive():
                dispatch(i)
        self._calls["generate"] += 1
        self._fire("generate", self._calls["generate"])
        while inflight or todo:
            if not inflight:  # every engine is down: wait for a replacement
                if not self._starting:
                    raise RuntimeError(f"{self.name}: every rollout engine died; {len(todo)} chunk(s) left")
                self._wait_started(self.cfg.start_timeout_s)
                for i in self._alive():
                    dispatch(i)
                continue
            waits = list(inflight) + list(self._starting)
            first_due = min(v[3] for v in inflight.values())
            ready, _ = ray.wait(waits, num_returns=1, timeout=max(0.0, first_due - time.monotonic()))
            if not ready:
                i, start, handle, due = min(inflight.values(), key=lambda v: v[3])
                # An engine that does not answer a ping either is frozen: _dead kills it; requeue its chunks.
                if self.cfg.elastic.enabled and self._dead([i], self.cfg.elastic.ping_timeout_s):
                    self.events.append({"event": "fault", "kind": "hang", "group": self.name, "rank": i,
                                        "call": "generate", "step": self._calls["generate"], "detect_s": None})
                    for ref in [r for r, v in inflight.items() if v[2] is handle]:
                        todo.appendleft(inflight.pop(ref)[1])
                        self.requeued += 1
                    self._lost(i)
                    for j in self._alive():
                        dispatch(j)
                    continue
                raise CallTimeout(f"{self.name}: engine {i}: generate (the chunk of prompts {start}.."
                                  f"{min(start + c, len(prompts)) - 1}) did not answer within "
                                  f"{self._timings.deadline('generate'):g} s (rollout.call_timeout_s, "
                                  "rollout.elastic)")
            if ready[0] in self._starting:
                self._poll_started()
                for i in self._alive():
                    if sum(1 for e, _, _, _ in inflight.values() if e == i) < 2:
                        dispatch(i)
                continue
            i, start, handle, _ = inflight.pop(ready[0])
            try:
                samples = ray.get(ready[0])
                self._timings.add("generate", time.monotonic() - started.pop(ready[0]))
            except _DEAD:
                self.events.append({"event": "fault", "kind": "death", "group": self.name, "rank": i,
                                    "call": "generate", "step": self._calls["generate"], "detect_s": None})
                todo.appendleft(start)
                self.requeued += 1
                if self.engines[i] is handle:  # not yet replaced (its other chunks fail too)
                    self._lost(i)
                for j in self._alive():
                    dispatch(j)
                continue
            if start not in done:
                done[start] = samples
            dispatch(i)
        return [x for start in sorted(done) for x in done[start]]

    # ---- weights ------------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        t = self.cfg.weight_transport
        return ("collective" if has_cuda() else "object_store") if t == "auto" else t

    def sync(self, group) -> dict:
        """Push the policy's current weights into every engine, then verify them; a push that
        fails verification is pushed and verified once more (a transfer can be corrupted once),
        and a second failure raises SyncMismatch. Returns the seconds taken by the gather, the
        push and the verification, the verification's statistics (worst engine) and `attempts`.

        The trainer computes its probe log-probs while the engines reload (the ranks are idle
        then), and the engines compute theirs in parallel, so verification adds little more
        than one engine forward to the push."""
        lora = group.lora_merge_spec()  # peft's adapter and per-module scaling; None without LoRA
        self._source = (group, lora)
        self._calls["push"] += 1
        self._fire("push", self._calls["push"])
        self._version += 1
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
                push = self._sync_collective if self.transport == "collective" else self._sync_object_store
                return {**push(group, lora), "attempts": attempt, "engines_lost": lost}
            except SyncMismatch as e:
                if attempt - lost >= 2:
                    e.report["attempts"] = attempt
                    raise
                log.warning("%s; pushing again (attempt 2 of 2)", e)
                self._channel_key = None  # a broken channel is re-formed for the second try
            except _PushInterrupted as e:
                # An engine (or a policy rank) died during the channel set-up, the push or the
                # verification: replace what died and push again to the engines alive. A
                # replacement loads the pushed weights and is verified when it joins.
                lost += 1
                if lost > self.cfg.num_engines + 2:
                    raise RuntimeError(f"{self.name}: the weight push was interrupted {lost} times: {e}") from None
                log.warning("%s; pushing again", e)
                self._channel_key = None
                if e.group_hit:
                    group.heal()  # its ranks tore down their process group when the channel broke
                for i in self._dead(e.engines):
                    self.events.append({"event": "fault", "kind": "death", "group": self.name, "rank": i,
                                        "call": "push", "step": self._calls["push"], "detect_s": None})
                    self._lost(i)

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
        except _DEAD as e:
            raise _PushInterrupted(f"{self.name}: an engine died while loading weights: {_cause(e)}", alive) from None
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
        deadline = time.monotonic() + self.cfg.call_timeout_s
        try:
            while waiting:  # fail at once on any error rather than wait on a dead peer
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise CallTimeout(f"{self.name}: weight broadcast: no answer within {self.cfg.call_timeout_s:g} s "
                                      f"from {', '.join(names[r] for r in pending)} (rollout.call_timeout_s)")
                ray.get(done)
                waiting -= set(done)
            t2 = time.perf_counter()
            want = self._trainer_probe(group) if self.cfg.verify else None  # ranks free, engines reloading
            t3 = time.perf_counter()
            gather(pending, max(1.0, deadline - time.monotonic()), f"{self.name}: receive_weights",
                   [names[r] for r in pending])
        except _DEAD as e:
            self._channel_key = None  # re-formed with the live engines at the next push
            raise _PushInterrupted(f"{self.name}: an engine or a {group.name} rank died during the weight broadcast: "
                                   f"{_cause(e)}", alive, group_hit=True) from None
        t4 = time.perf_counter()
        out = {"transport": "collective", "channel_s": t1 - t0, "gather_s": 0.0, "push_s": t4 - t1,
               "broadcast_s": t2 - t1, "engines": len(alive)}
        return self._verified(out, want, t3 - t2, t4)

    def _verified(self, out: dict, want, probe_s: float, t_loaded: float) -> dict:
        if want is not None:
            try:
                out.update(self._compare(want))
            except _DEAD as e:
                raise _PushInterrupted(f"{self.name}: an engine died during verification: {_cause(e)}",
                                       self._alive()) from None
            self._want = want  # what a replacement engine is checked against when it joins
            out["verify_s"] = time.perf_counter() - t_loaded
            out["trainer_probe_s"] = probe_s
        return out

    def _gather(self, refs: list, engines: list[int], call: str) -> list:
        """gather with the call's deadline: rollout.elastic's factor x its median time + grace,
        or call_timeout_s until it has been timed enough (rayllm.group.membership.Timings)."""
        t = time.monotonic()
        out = gather(refs, self._timings.deadline(call), f"{self.name}: {call}", [f"engine {i}" for i in engines])
        self._timings.add(call, time.monotonic() - t)
        return out

    def _push_gather(self, refs: list, engines: list[int], call: str) -> list:
        """_gather inside a weight push: an engine frozen past the deadline interrupts the push
        (the sync loop kills and replaces the engines that do not answer, then pushes again)."""
        try:
            return self._gather(refs, engines, call)
        except CallTimeout as e:
            if not self.cfg.elastic.enabled:
                raise
            raise _PushInterrupted(f"{e}; checking which engines answer", engines) from None

    def _ensure_channel(self, group, alive: list[int]) -> None:
        """(Re)form the weight channel when the policy group or the set of engines changed."""
        key = (group.formation, tuple((i, self._launches[i]) for i in alive))
        if key == self._channel_key:
            return
        workers = self._gather([self.engines[i].num_workers.remote() for i in alive], alive, "num_workers")
        ep = group.channel_endpoint()
        spec = {"host": ep["host"], "port": ep["port"], "backend": ep["backend"],
                "world_size": 1 + sum(workers), "wire_dtype": self.cfg.dtype}
        firsts = np.cumsum([1] + workers[:-1]).tolist()
        try:
            gather([group.open_channel_ref(json.dumps(spec))] +
                   [self.engines[i].open_channel.remote(spec, f) for i, f in zip(alive, firsts)], timeout_s=180)
        except _DEAD as e:
            raise _PushInterrupted(f"{self.name}: an engine died while joining the weight channel: {_cause(e)}",
                                   alive, group_hit=True) from None
        self._channel_key = key

    def probe(self, vocab_size: int | None = None) -> list[list[int]]:
        """The fixed probe batch: random token ids (the same every time) across the vocabulary."""
        if vocab_size is None:
            if self._probe_rows is None:
                from transformers import AutoConfig

                self._probe_rows = self.probe(AutoConfig.from_pretrained(self.model_path).vocab_size)
            return self._probe_rows
        rng = np.random.default_rng(12345)
        return rng.integers(3, vocab_size, size=(self.cfg.probe_rows, self.cfg.probe_len)).tolist()

    def _trainer_probe(self, group) -> list[np.ndarray]:
        rows = self.probe()
        return [np.asarray(x, dtype=np.float64) for x in group.logprobs([{"input_ids": r} for r in rows])]

    def verify(self, group) -> dict:
        """Compare every engine with the trainer on the probe batch; returns the statistics of
        the worst engine (see `_compare`) or raises SyncMismatch naming the first bad one."""
        try:
            return self._compare(self._trainer_probe(group))
        except _PushInterrupted as e:  # outside a push there is nothing to retry
            raise CallTimeout(str(e)) from None

    def _compare(self, want: list[np.ndarray]) -> dict:
        """Per engine, over every probe token: mean |delta log p|, the token probability error
        exp(mean |delta log p|) (NeMo-RL's alarm is 1.01), and the largest |delta log p|. Judged
        by the mean against `mean_tolerance` and the largest against the looser `tolerance`."""
        rows = self.probe()
        alive = self._alive()
        refs = [self.engines[i].prompt_logprobs.remote(rows) for i in alive]
        self._fire("verify", self._calls["push"])
        got = self._push_gather(refs, alive, "prompt_logprobs")
        want_flat = np.concatenate(want)
        per_engine, bad = {}, None
        for i, g in zip(alive, got):
            gap = np.abs(np.concatenate([np.asarray(x, dtype=np.float64) for x in g]) - want_flat)
            st = {"mean_gap": float(np.mean(gap)), "max_gap": float(np.max(gap))}
            st["token_prob_error"] = math.exp(st["mean_gap"])
            per_engine[i] = st
            # `not x <= bound`: a NaN fails too.
            if bad is None and not (st["mean_gap"] <= self.cfg.mean_tolerance and st["max_gap"] <= self.cfg.tolerance):
                bad = i
        worst = {k: max(st[k] for st in per_engine.values()) for k in ("mean_gap", "max_gap", "token_prob_error")}
        report = {**worst, "per_engine": per_engine}
        if bad is not None:
            st = per_engine[bad]
            raise SyncMismatch(
                f"{self.name}: engine {bad} log-probs differ from the trainer's after the weight push: "
                f"mean |delta| {st['mean_gap']:.3g} (tolerance {self.cfg.mean_tolerance:g}), largest "
                f"{st['max_gap']:.3g} (tolerance {self.cfg.tolerance:g}), token probability error "
                f"{st['token_prob_error']:.6f}", report)
        return report

    def shutdown(self) -> None:
        for i, e in enumerate(self.engines):
            if e is None:
                continue
            try:
                ray.get(e.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead engine must not block shutdown
                if self._info[i]:
                    shutil.rmtree(cache_dir() / "tmp" / f"rollout-{i}-{self._info[i]['pid']}", ignore_errors=True)
            ray.kill(e, no_restart=True)
        self.engines = [None] * len(self.engines)
        self._starting.clear()


@ray.remote(num_cpus=0)
def _info_after(_loaded: float, info: dict) -> dict:
    return info


def _after(load_ref: ray.ObjectRef, handle) -> ray.ObjectRef:
    """A reference that resolves to the engine's info once its weights are loaded."""
    return _info_after.remote(load_ref, handle.info.remote())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_FRAME = re.compile(r",?\s*ray::[\w.]+\(\)\s*\(pid=[^)]*\)")  # Ray's "ray::Actor.method() (pid=..)"
_CHAINING = ("During handling of the above exception", "The above exception was the direct cause")


def _cause(e: BaseException, max_lines: int = 3) -> str:
    """The error type, the first meaningful lines and the final one of an engine's error
    (vLLM's last line alone is often only "See root cause above"; a Ray actor's error starts
    with Ray's own words). Traceback frames and Ray's process tags are left out; the full text
    goes to the log."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    log.error("%s: %s", type(cause).__name__, text)
    meaningful, frame = [], False
    for ln in (_RAY_FRAME.sub("", _ANSI.sub("", x)).strip() for x in text.splitlines()):
        if frame or ln.startswith('File "'):  # a traceback frame and its source line
            frame = ln.startswith('File "')
            continue
        if ln and not ln.startswith(("Traceback",) + _CHAINING) and not set(ln) <= set("^~ -="):
            meaningful.append(ln[:300])
    keep = meaningful[:max_lines] + [ln for ln in meaningful[-1:] if ln not in meaningful[:max_lines]]
    more = "" if len(keep) >= len(meaningful) else " [... full error in the log]"
    return f"{type(cause).__name__}: {' | '.join(keep)}{more}"
