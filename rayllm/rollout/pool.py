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
fetches it (no copy through the driver). Either way the engine reloads in place. Then each engine's teacher-forced log-probs on a fixed probe batch are compared with
the trainer's for the same tokens: a gap above tolerance raises SyncMismatch, naming the
engine and the gap, instead of letting a run train on rollouts from stale or broken weights.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rayllm.config import LoraConfig, RolloutConfig, SamplingConfig
from rayllm.env import cache_dir, has_cuda, worker_env
from rayllm.rollout.engine import RolloutEngine
from rayllm.rollout.sample import Sample
from rayllm.group import gather

_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class SyncMismatch(RuntimeError):
    """An engine's log-probs disagree with the trainer's after a weight push."""


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
        self._weights: tuple[ray.ObjectRef, float | None] | None = None  # latest push, for restarts
        self._source: tuple[object, float | None] | None = None  # (policy group, LoRA scaling) of it
        self._channel_key: tuple | None = None  # (group formation, engine launches) the open channel joins
        self._launches = [0] * cfg.num_engines  # how often each engine slot was (re)started
        self.restarts = 0
        self.requeued = 0
        self._probe_rows: list[list[int]] | None = None
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
        ready = handle.info.remote()
        if self._weights is None and self._source is not None:  # last push was collective
            group, scaling = self._source
            self._weights = (group.full_state_dict_ref(), scaling)
        if self._weights is not None:  # a replacement starts from the latest pushed weights
            ref, scaling = self._weights
            ready = _after(handle.load_weights.remote(ref, scaling), handle)
        self._starting[ready] = i

    def _wait_started(self, timeout_s: float | None) -> None:
        """Wait for starting engines; a start-up failure is raised with its cause."""
        for ref, i in list(self._starting.items()):
            try:
                self._info[i] = ray.get(ref, timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - the cause is reported
                self.shutdown()
                raise EngineStartError(f"{self.name}: engine {i} failed to start: {_cause(e)}") from None
            del self._starting[ref]

    def _poll_started(self) -> None:
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
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | None = None) -> list[Sample]:
        """n samples for every prompt, ordered by (prompt_index, sample_index)."""
        s = sampling or self.cfg.sampling
        s_json = s.model_dump_json()
        c = self.cfg.chunk_size
        todo = deque(range(0, len(prompts), c))
        inflight: dict[ray.ObjectRef, tuple[int, int, object]] = {}  # ref -> (slot, chunk start, engine)
        done: dict[int, list[Sample]] = {}

        def dispatch(i: int) -> None:
            if todo:
                start = todo.popleft()
                ref = self.engines[i].generate.remote(prompts[start:start + c], start, s_json)
                inflight[ref] = (i, start, self.engines[i])

        self._poll_started()
        for _ in range(2):
            for i in self._alive():
                dispatch(i)
        while inflight or todo:
            if not inflight:  # every engine is down: wait for a replacement
                if not self._starting:
                    raise RuntimeError(f"{self.name}: every rollout engine died; {len(todo)} chunk(s) left")
                self._wait_started(self.cfg.start_timeout_s)
                for i in self._alive():
                    dispatch(i)
                continue
            waits = list(inflight) + list(self._starting)
            ready, _ = ray.wait(waits, num_returns=1)
            if ready[0] in self._starting:
                self._poll_started()
                for i in self._alive():
                    if sum(1 for e, _, _ in inflight.values() if e == i) < 2:
                        dispatch(i)
                continue
            i, start, handle = inflight.pop(ready[0])
            try:
                samples = ray.get(ready[0])
            except _DEAD:
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

    def sync(self, group, lora: LoraConfig | None = None) -> dict[str, float]:
        """Push the policy's current weights into every engine, then verify them. Returns the
        seconds taken by the gather, the push and the verification, and the largest gap.

        The trainer computes its probe log-probs while the engines reload (the ranks are idle
        then), and the engines compute theirs in parallel, so verification adds little more
        than one engine forward to the push."""
        scaling = lora.alpha / lora.r if lora is not None and lora.enabled else None
        self._source = (group, scaling)
        if self.transport == "collective":
            return self._sync_collective(group, scaling)
        t0 = time.perf_counter()
        ref = group.full_state_dict_ref()
        t1 = time.perf_counter()
        self._weights = (ref, scaling)
        alive = self._alive()
        loads = [self.engines[i].load_weights.remote(ref, scaling) for i in alive]
        want = self._trainer_probe(group) if self.cfg.verify else None
        t2 = time.perf_counter()
        try:
            ray.get(loads)
        except _DEAD as e:
            raise RuntimeError(f"{self.name}: an engine died while loading weights: {_cause(e)}") from None
        t3 = time.perf_counter()
        out = {"transport": "object_store", "gather_s": t1 - t0, "push_s": t3 - t1, "engines": len(alive)}
        return self._verified(out, want, t2 - t1, t3)

    def _sync_collective(self, group, scaling: float | None) -> dict[str, float]:
        t0 = time.perf_counter()
        alive = self._alive()
        self._ensure_channel(group, alive)
        meta = group.weight_meta()
        t1 = time.perf_counter()
        self._weights = None  # a replacement engine fetches the weights from the group itself
        sends = group.broadcast_weights_refs()
        recvs = [self.engines[i].receive_weights.remote(meta, scaling) for i in alive]
        pending, waiting = sends + recvs, set(sends)
        try:
            while waiting:  # fail at once on any error rather than wait on a dead peer
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                waiting -= set(done)
            t2 = time.perf_counter()
            want = self._trainer_probe(group) if self.cfg.verify else None  # ranks free, engines reloading
            t3 = time.perf_counter()
            ray.get(pending)
        except _DEAD as e:
            self._channel_key = None  # re-formed with the live engines at the next push
            raise RuntimeError(f"{self.name}: an engine died while receiving weights: {_cause(e)}") from None
        t4 = time.perf_counter()
        out = {"transport": "collective", "channel_s": t1 - t0, "gather_s": 0.0, "push_s": t4 - t1,
               "broadcast_s": t2 - t1, "engines": len(alive)}
        return self._verified(out, want, t3 - t2, t4)

    def _verified(self, out: dict, want, probe_s: float, t_loaded: float) -> dict:
        if want is not None:
            out["max_gap"] = self._compare(want)
            out["verify_s"] = time.perf_counter() - t_loaded
            out["trainer_probe_s"] = probe_s  # overlapped with the engines' reload
        return out

    def _ensure_channel(self, group, alive: list[int]) -> None:
        """(Re)form the weight channel when the policy group or the set of engines changed."""
        key = (group.formation, tuple((i, self._launches[i]) for i in alive))
        if key == self._channel_key:
            return
        workers = ray.get([self.engines[i].num_workers.remote() for i in alive])
        ep = group.channel_endpoint()
        spec = {"host": ep["host"], "port": ep["port"], "backend": ep["backend"],
                "world_size": 1 + sum(workers), "wire_dtype": self.cfg.dtype}
        firsts = np.cumsum([1] + workers[:-1]).tolist()
        try:
            gather([group.open_channel_ref(json.dumps(spec))] +
                   [self.engines[i].open_channel.remote(spec, f) for i, f in zip(alive, firsts)], timeout_s=180)
        except _DEAD as e:
            raise RuntimeError(f"{self.name}: an engine died while joining the weight channel: {_cause(e)}") from None
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

    def verify(self, group) -> float:
        """Largest |engine - trainer| log-prob over the probe batch, across engines; raises
        SyncMismatch naming the first engine beyond tolerance."""
        return self._compare(self._trainer_probe(group))

    def _compare(self, want: list[np.ndarray]) -> float:
        rows = self.probe()
        alive = self._alive()
        got = ray.get([self.engines[i].prompt_logprobs.remote(rows) for i in alive])
        worst = 0.0
        for i, g in zip(alive, got):
            gap = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(g, want))
            if not gap <= self.cfg.tolerance:  # NaN fails too
                raise SyncMismatch(f"{self.name}: engine {i} log-probs differ from the trainer's by {gap:.3g} "
                                   f"(tolerance {self.cfg.tolerance:g}) after the weight push")
            worst = max(worst, gap)
        return worst

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


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
