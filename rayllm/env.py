"""Process environment and device selection.

The CPU and GPU paths differ only in what is chosen here, from the device found: DeepSpeed's
accelerator, the torch.distributed backend, and the defaults every Ray worker inherits.
"""
from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where built tokenizers/models and compiled ops live: $RAYLLM_CACHE, else the project's
    .cache/ for a source checkout, else ~/.cache/rayllm."""
    env = os.environ.get("RAYLLM_CACHE")
    if env:
        return Path(env)
    if (_REPO / "pyproject.toml").is_file() and os.access(_REPO, os.W_OK):
        return _REPO / ".cache"
    return Path.home() / ".cache" / "rayllm"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def dist_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def worker_env() -> dict[str, str]:
    """Environment for every process rayllm starts (Ray workers included), set before torch or
    DeepSpeed import. Existing values win, so users can override any of them."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(cache_dir() / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    if not _nvidia_present():
        env["DS_ACCELERATOR"] = "cpu"
    for k in list(env):
        env[k] = os.environ.get(k, env[k])
    return env


# Decided by each process from its own devices (apply_worker_env), never sent from the driver:
# a driver on a GPU-less head node must not make GPU ranks use DeepSpeed's CPU accelerator, nor
# point them at a cache path of its own machine.
_DECIDED_LOCALLY = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")


def remote_env() -> dict[str, str]:
    """The part of worker_env the driver hands to Ray workers (runtime_env env_vars)."""
    return {k: v for k, v in worker_env().items() if k not in _DECIDED_LOCALLY}


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster has GPUs: engines ask for them and weights go over NCCL then,
    wherever the driver itself runs (a CPU head included)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _nvidia_present() -> bool:
    # Decided without importing torch, so the choice can be made before DeepSpeed is imported.
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip(" -1"))


def apply_worker_env() -> dict[str, str]:
    env = worker_env()
    os.environ.update(env)
    return env
