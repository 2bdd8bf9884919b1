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


def _nvidia_present() -> bool:
    # Decided without importing torch, so the choice can be made before DeepSpeed is imported.
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip(" -1"))


def apply_worker_env() -> dict[str, str]:
    env = worker_env()
    os.environ.update(env)
    return env
