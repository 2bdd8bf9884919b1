"""A pool of rollout engines: load-balanced generation that survives engine deaths, and weight
pushes from the policy ModelGroup that are verified before generation goes on.

Generation: prompts are cut into chunks of `chunk_size`; every live engine holds up to two
chunks at a time and gets the next one as soon as it returns one, so fast engines take more.
A chunk whose engine dies is requeued to the others, and a replacement engine is started (with
the latest pushed weights) while they work. Each chunk's result is accepted once, so no prompt
is lost or generated twice into a batch. Sampling seeds are per prompt, not per engine.

Weight pushes and their verification are rayllm.rollout.push (mixed in here), the judgement of
a push is rayllm.rollout.verify, and the errors are rayllm.rollout.errors.

Every wait on an engine has a deadline (`call_timeout_s`, `start_timeout_s`): a hung engine
fails the call with an error naming the engine and the call, instead of hanging the driver.
"""
from __future__ import annotations

import shutil
import signal
import time
from collections import deque
from pathlib import Path

import ray

from rayllm.chaos import Chaos, send_signal
from rayllm.config import RolloutConfig, SamplingConfig
from rayllm.env import cache_dir, cluster_has_gpus, remote_env
from rayllm.group.membership import Timings, settle
from rayllm.remote import CallTimeout, gather
from rayllm.rollout import verify as check
from rayllm.rollout.engine import RolloutEngine
from rayllm.rollout.errors import DEAD, EngineStartError, PushInterrupted, SyncMismatch, cause
from rayllm.rollout.push import WeightPush
from rayllm.rollout.sample import Sample

__all__ = ["EngineStartError", "RolloutPool", "SyncMismatch"]


class RolloutPool(WeightPush):
    """Rollout engines in Ray actors: their lifecycle (start, join verified, replace), load-balanced
    generation, and (WeightPush) verified weight pushes from the policy."""

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
        least, most = cfg.engine_range
        self._launches = [0] * most  # how often each engine slot was (re)started
        self.restarts = 0
        self.requeued = 0
        self._probe_rows: list[list[int]] | None = None
        self._want: list | None = None  # the trainer's probe log-probs of the last verified push
        self._version = 0  # weight pushes begun; _loaded[i]: the one engine i started with
        self._loaded = [0] * most
        self._weights_version = 0  # the push whose weights self._weights holds
        self._push_versions = {0: 0}  # push -> the policy version it carried (async PPO: per sample)
        self._chaos = Chaos(name, cfg.chaos)
        e = cfg.elastic
        self._timings = Timings(e.hang_factor, e.hang_grace_s, e.min_samples, cfg.call_timeout_s)
        self.events: list[dict] = []  # engine faults, drained with take_events()
        self._calls = {"generate": 0, "push": 0}
        self.verified_replacements = 0
        self.engines: list = [None] * most
        self._info: list[dict | None] = [None] * most
        self._starting: dict[ray.ObjectRef, int] = {}
        self._leaving: dict[int, str] = {}  # engine -> why it goes once its chunks are back
        for i in range(most):
            self._start(i)
        self._wait_started(cfg.start_timeout_s, least=least)

    # ---- engines ------------------------------------------------------------------------------
    def _start(self, i: int) -> None:
        gpus = self.cfg.tensor_parallel_size if cluster_has_gpus() else 0
        handle = RolloutEngine.options(
            num_cpus=self.cfg.cpus_per_engine, num_gpus=gpus, max_restarts=0,
            runtime_env={"env_vars": remote_env()}, name=None,
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

    def _wait_started(self, timeout_s: float | None, check: bool = True, least: int | None = None) -> None:
        """Wait until `least` engines are up (default: every one starting), taking in each that
        is; a start-up failure is raised with its cause. Engines not yet placed (a range's beyond
        its min, on a cluster without room yet) stay starting and join when they are up."""
        refs = list(self._starting)
        need = len(self._alive()) + len(refs) if least is None else least
        short = need - len(self._alive())
        if short > 0 and refs:
            ray.wait(refs, num_returns=min(short, len(refs)), timeout=timeout_s)
        ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        for ref in ready:
            i = self._starting[ref]
            try:
                self._info[i] = ray.get(ref, timeout=0)
            except Exception as e:  # noqa: BLE001 - the cause is reported
                self.shutdown()
                raise EngineStartError(f"{self.name}: engine {i} failed to start: {cause(e)}") from None
            del self._starting[ref]
            if check:
                self._check_joined(i)
        if len(self._alive()) < need:
            pending = sorted(self._starting.values())
            up = len(self._alive())
            self.shutdown()
            raise EngineStartError(
                f"{self.name}: engine(s) {pending} not up within {timeout_s:g} s (rollout.start_timeout_s): {up} up, "
                f"{need} needed. Each asks for {self.cfg.cpus_per_engine:g} CPU; the cluster has "
                f"{ray.available_resources()} free")

    def add_engine(self) -> int:
        """Start one more engine (a node was added, or more rollout throughput is wanted): it joins
        the pool once up, with the latest pushed weights, verified, and takes chunks from then on,
        even in the middle of a generate call. Returns its index."""
        i = len(self.engines)
        self.engines.append(None)
        self._info.append(None)
        self._launches.append(0)
        self._loaded.append(0)
        self._start(i)
        return i

    def leave(self, i: int, reason: str = "driver") -> None:
        """Tell engine i to go: it takes no new chunk, the ones it holds come back (none is lost),
        then it is closed and not replaced."""
        if not 0 <= i < len(self.engines) or self.engines[i] is None:
            raise ValueError(f"{self.name}: no engine {i}")
        self._leaving.setdefault(i, reason)

    def _notices(self, engines: list[int]) -> None:
        """Engines whose process got SIGTERM (a preemption notice) are told to leave: asked on
        their control thread, within elastic.ping_timeout_s (one that does not answer is left to
        the fault path)."""
        engines = [i for i in engines if self.engines[i] is not None and i not in self._leaving]
        if not engines:
            return
        for i, told in zip(engines, settle([self.engines[i].leaving.remote() for i in engines],
                                           self.cfg.elastic.ping_timeout_s, 0.0)):
            if told is True:
                self._leaving[i] = "sigterm"

    def _retire(self, i: int) -> None:
        """An engine told to leave, with none of its chunks out: closed, ended, not replaced."""
        handle, info = self.engines[i], self._info[i]
        self.engines[i], self._info[i] = None, None
        settle([handle.close.remote()], self.cfg.elastic.ping_timeout_s, 0.0)
        ray.kill(handle, no_restart=True)
        if info:
            shutil.rmtree(cache_dir() / "tmp" / f"rollout-{i}-{info['pid']}", ignore_errors=True)
        self.events.append({"event": "leave", "group": self.name, "rank": i, "reason": self._leaving.pop(i),
                            "pid": info and info["pid"], "call": "generate", "step": self._calls["generate"],
                            "engines": len(self._alive())})

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
        # Popped one at a time, not swapped for a new list: in async PPO another thread may
        # append while the stage log drains (list.pop and append are atomic), and none is lost.
        out = []
        while self.events:
            out.append(self.events.pop(0))
        return out

    def _fire(self, call: str, n: int) -> None:
        """Chaos faults due at the n-th `call` (docs/elasticity.md): a signal to the engine's process."""
        for f in self._chaos.due(call, n):
            info = self._info[f.rank] if f.rank < len(self._info) else None
            if info is not None:
                self._chaos.fire(f, info["node"], info["pid"])

    def _dead(self, engines: list[int], timeout_s: float | None = None) -> list[int]:
        """Which of these engines do not answer a ping within timeout_s (default
        elastic.ping_timeout_s). The ping runs on the engine's control thread, so an engine busy
        in a call (a broadcast that waits on a frozen peer) answers; a dead or frozen one is
        killed (SIGKILL on its node: that ends a frozen process too, which ray.kill leaves stopped)."""
        timeout_s = self.cfg.elastic.ping_timeout_s if timeout_s is None else timeout_s
        live = [i for i in engines if self.engines[i] is not None]
        refs = [self.engines[i].ping.remote() for i in live]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for i, r in zip(live, refs):
            try:
                ray.get(r, timeout=0)
            except Exception:  # noqa: BLE001 - dead or frozen: replaced either way
                info = self._info[i]
                if info is not None:
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
        st, c = check.gap_stats(got, self._want), self.cfg
        if not check.passes(st, c.mean_tolerance, c.tolerance):
            raise SyncMismatch(f"{self.name}: replacement engine {i} log-probs differ from the trainer's: "
                               f"{check.describe(st, c.mean_tolerance, c.tolerance)}")
        self.verified_replacements += 1

    def _alive(self) -> list[int]:
        return [i for i, e in enumerate(self.engines) if e is not None and self._info[i] is not None]

    def live_engines(self) -> list:
        """Handles of the engines up now. `engines` is indexed by engine slot and holds None for
        a slot whose engine left, died or is still starting."""
        return [self.engines[i] for i in self._alive()]

    def _lost(self, i: int) -> None:
        info, self.engines[i], self._info[i] = self._info[i], None, None
        if info:
            shutil.rmtree(cache_dir() / "tmp" / f"rollout-{i}-{info['pid']}", ignore_errors=True)
        if self._leaving.pop(i, None) is None and self.cfg.restart_dead:  # a leaver is not replaced
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
            if i in self._leaving:
                if not any(e == i for e, _, _, _ in inflight.values()):
                    self._retire(i)  # its chunks are all back: nothing of it is lost
                return
            if todo:
                start = todo.popleft()
                ref = self.engines[i].generate.remote(prompts[start:start + c], start, s_json, key)
                # The deadline runs from when the engine can start it (it holds up to two chunks).
                queued = sum(1 for e, _, _, _ in inflight.values() if e == i)
                due = time.monotonic() + (1 + queued) * self._timings.deadline("generate")
                inflight[ref] = (i, start, self.engines[i], due)
                started[ref] = time.monotonic()

        self._poll_started()
        self._notices(self._alive())
        if self._alive() and all(i in self._leaving for i in self._alive()) and not self._starting:
            raise RuntimeError(f"{self.name}: every rollout engine was told to leave {sorted(self._leaving)}; "
                               "generation cannot go on without one")
        for _ in range(2):
            for i in self._alive():
                dispatch(i)
        self._calls["generate"] += 1
        self._fire("generate", self._calls["generate"])
        while inflight or todo:
            if not inflight:  # every engine is down: wait for a replacement
                if not self._starting:
                    raise RuntimeError(f"{self.name}: every rollout engine died or left; {len(todo)} chunk(s) left")
                self._wait_started(self.cfg.start_timeout_s, least=1)
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
            except DEAD:
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
                version = self._push_versions[self._loaded[i]]  # pushes never land inside a generate call
                for x in samples:
                    x.version = version
                done[start] = samples
            self._notices([i])  # a SIGTERM since its last chunk: it takes no more
            dispatch(i)
        return [x for start in sorted(done) for x in done[start]]

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
            raise PushInterrupted(f"{e}; checking which engines answer", engines) from None

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




