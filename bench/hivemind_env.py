"""A separate virtual environment with hivemind 1.1.12, for the Hivemind baseline of heterogeneous peers.

    python bench/hivemind_env.py            # build it (once) and print its python

The baseline (`bench/_hivemind_arm.py`, which launches `bench/_hivemind_peer.py`, importing no rayllm)
runs two `hivemind.Optimizer` peers that accumulate a target batch at whatever speed each has. hivemind
is kept out of the project's venv: importing it switches multiprocessing to `fork`, and it brings its
own protobuf/grpcio-tools/pydantic stack. `ensure_hivemind_venv()` builds the venv under
`.cache/bench/hivemind-1.1.12` (git-ignored) with `python -m venv` + `pip install -c constraints`.

What is installed, and why:
- `hivemind==1.1.12` (with its `p2pd` binary in the wheel). Its own requirements are all lower bounds
  (`torch>=1.9.0`, `protobuf>=5.29.0`, `pydantic>=2`, numpy, scipy, uvloop, grpcio-tools, ...): none of
  them conflicts with the pins below, so no nearer set was needed.
- `torch==2.13.0`: the CPU build (`2.13.0+cpu`) on this machine's disk (pip's find-links); an unpinned
  torch would pull a multi-GB CUDA build. The pin is also in the constraints file passed to pip.
- `transformers==5.19.0`, `tokenizers==0.23.3`, `safetensors==0.8.0`: the versions of the project's
  own venv, so both arms of the benchmark run the same Llama modelling code on the same model dir.

Idempotent and safe to interrupt: a stamp file keyed by the pinned requirements and the base
interpreter is written only after the install, `pip check` and an import check (hivemind, torch,
transformers, and the presence of the `p2pd` daemon) succeed; without a matching stamp the directory
is wiped and rebuilt. A lock file serialises concurrent builders.
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

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / ".cache/bench/hivemind-1.1.12"

REQUIREMENTS = [
    "hivemind==1.1.12",
    "torch==2.13.0",
    "transformers==5.19.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
]
# Constraints (-c) for every pip call: the requirements (torch above all) pin anything pulled in later.
CONSTRAINTS = list(REQUIREMENTS)

STAMP = ".rayllm-bench-stamp"
_CHECK = (
    "import os, torch, transformers, hivemind; "
    "from hivemind.p2p.p2p_daemon import P2P; "
    "from transformers import AutoModelForCausalLM; "
    "p2pd = os.path.join(os.path.dirname(hivemind.__file__), 'hivemind_cli', 'p2pd'); "
    "assert os.access(p2pd, os.X_OK), 'no executable p2pd at ' + p2pd; "
    "assert torch.__version__.startswith('2.13.0'), torch.__version__; "
    "print(hivemind.__version__, torch.__version__, transformers.__version__)"
)


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
        raise RuntimeError(f"[bench] hivemind venv build failed (rc={rc}): {' '.join(cmd)}\n"
                           f"--- last lines of {log} ---\n{tail}")


def ensure_hivemind_venv(root: Path | None = None) -> Path:
    """Build (once) the hivemind 1.1.12 venv and return its python executable."""
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
        print(f"[bench] creating hivemind 1.1.12 venv at {root} (once, ~3 min)", flush=True)
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
        _run([py, "-c", _CHECK], log, dict(env, HF_HUB_OFFLINE="1"))
        (root / STAMP).write_text(key + "\n")  # last: marks the venv complete
        print(f"[bench] hivemind venv ready in {time.perf_counter() - t0:.0f} s: {py}", flush=True)
    return _python(root)


if __name__ == "__main__":
    print(ensure_hivemind_venv(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
