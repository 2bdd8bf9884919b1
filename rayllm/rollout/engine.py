"""One rollout engine: a Ray actor hosting a vLLM (or HF) backend.

The actor sets the engine's environment before vLLM is imported: in-process execution at
tensor parallelism 1 (no child processes to orphan), an explicit KV-cache size on CPU (vLLM
otherwise reserves most of the RAM), its compile cache under rayllm's cache directory (warm
after the first run), and a private TMPDIR that `close` removes, so runs leave nothing behind.

`ping` runs on its own thread (the "control" concurrency group), so the driver can tell an engine
blocked in a weight broadcast (answers) from one whose process is frozen (does not).
"""
from __future__ import annotations

import os
import shutil
import time

import ray


@ray.remote(concurrency_groups={"control": 1})
class RolloutEngine:
    def __init__(self, index: int, model_path: str, tokenizer_path: str, cfg_json: str):
        from rayllm.config import RolloutConfig
        from rayllm.env import apply_worker_env, cache_dir, has_cuda
        from rayllm.leave_notice import LeaveNotice

        apply_worker_env()
        cfg = RolloutConfig.model_validate_json(cfg_json)
        self.index, self.cfg = index, cfg
        _sweep(cache_dir() / "tmp")
        self.tmp = cache_dir() / "tmp" / f"rollout-{index}-{os.getpid()}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        os.environ.update({
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if cfg.tensor_parallel_size == 1 else "1",
            "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
            "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
            "TMPDIR": str(self.tmp),
        })
        on_gpu = has_cuda()
        if cfg.backend == "vllm":
            from rayllm.rollout.vllm_backend import VLLMBackend as Backend
        else:
            from rayllm.rollout.hf_backend import HFBackend as Backend
        try:
            self.backend = Backend(model_path, tokenizer_path, cfg, on_gpu)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.chunks = 0
        # SIGTERM: finish the chunks held, take no more, then go. Installed after the backend, so
        # that no handler the backend sets replaces it.
        self._leave = LeaveNotice()
        self._die_at: int | None = None
        self._corrupt_loads = 0

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="control")
    def chunks_served(self) -> int:
        return self.chunks

    @ray.method(concurrency_group="control")
    def leaving(self) -> bool:
        """Whether this engine was told to leave (SIGTERM)."""
        return self._leave.given

    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def generate(self, prompts: list[list[int]], first_index: int, sampling_json: str,
                 key: tuple[int, ...] = ()) -> list:
        from rayllm.config import SamplingConfig

        if self._die_at is not None and self.chunks >= self._die_at:
            os._exit(1)  # fault injection: the process dies mid-batch, as an OOM kill would
        self.chunks += 1
        samples = self.backend.generate(prompts, first_index, SamplingConfig.model_validate_json(sampling_json),
                                        tuple(key))
        for s in samples:
            s.engine = self.index
        return samples

    def load_weights(self, state: dict, lora: dict | None = None) -> float:
        """Load pushed weights (fetched from the object store by Ray); returns seconds taken."""
        t = time.perf_counter()
        if self._corrupt_loads > 0:
            self._corrupt_loads -= 1
            state = _corrupted(state)
        self.backend.load_weights(state, lora)
        return time.perf_counter() - t

    def num_workers(self) -> int:
        """Members this engine adds to the weight channel (its tensor-parallel workers)."""
        return self.backend.num_workers

    def open_channel(self, spec: dict, first_rank: int) -> list[int]:
        return self.backend.open_channel(spec, first_rank)

    def receive_weights(self, meta: list, lora: dict | None = None) -> float:
        """Receive a push on the collective channel and reload; returns seconds taken."""
        t = time.perf_counter()
        self.backend.receive(meta, lora)
        return time.perf_counter() - t

    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        return self.backend.prompt_logprobs(rows)

    def die_after(self, chunks: int) -> None:
        """Test hook: exit the process when asked for chunk number `chunks` (0-based)."""
        self._die_at = self.chunks + chunks

    def corrupt_next_loads(self, n: int) -> None:
        """Test hook: the next `n` object-store loads put noise into one weight matrix before
        loading, as a corrupted transfer would: the engine then really holds wrong weights."""
        self._corrupt_loads = n

    def close(self) -> None:
        self.backend = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _corrupted(state: dict) -> dict:
    import torch

    name = sorted(k for k, v in state.items() if v.dim() == 2 and "layers" in k)[-1]
    noise = torch.randn(state[name].shape, generator=torch.Generator().manual_seed(0), dtype=state[name].dtype)
    return {**state, name: state[name] + 0.05 * noise}


def _sweep(tmp_root) -> None:
    """Remove the TMPDIRs of engines whose process is gone (killed, or ended by ray.shutdown
    without close): a dead process cannot clean up after itself."""
    import psutil

    for d in tmp_root.glob("rollout-*-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
