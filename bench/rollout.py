"""Rollout throughput (vLLM engine vs the HF `generate` fallback) and weight-sync latency, in one run.

    python bench/rollout.py [--size tiny-30m] [--prompts 64] [--max-tokens 64] [--json out.json]

Throughput: one engine of each backend in its own Ray actor, the same model, prompts and sampling
settings, alternating rounds; generated tokens per second (median over rounds) and the ratio
vLLM / HF (goal >= 1.3).

Sync: for ~1M, ~30M and ~100M parameter models, a 2-rank policy group (ZeRO-3, and ZeRO-2 at
~30M) pushes its weights into a vLLM engine, through the object store and over the collective
channel (gloo here, NCCL on GPU), and the push is verified against the trainer's log-probs; the gather, push and verification times (medians over repeats) and their sum (goal
<= 0.5 s at ~30M).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def throughput(size: str, n_prompts: int, max_tokens: int, rounds: int) -> dict:
    import numpy as np

    from rayllm.config import RolloutConfig, SamplingConfig
    from rayllm.models import count_parameters, tiny_model_path
    from rayllm.rollout import RolloutPool

    path = tiny_model_path(size)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1200, size=int(rng.integers(16, 48))).tolist() for _ in range(n_prompts)]
    # Sampling with a fixed length (no EOS stop would make the two backends do different work).
    s = SamplingConfig(n=1, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    pools = {b: RolloutPool(RolloutConfig(backend=b, num_engines=1, chunk_size=n_prompts, sampling=s,
                                          max_model_len=256), path) for b in ("vllm", "hf")}
    rates: dict[str, list[float]] = {b: [] for b in pools}
    try:
        for b, p in pools.items():
            p.generate(prompts[:4])  # warm-up
        for _ in range(rounds):
            for b, p in pools.items():
                t = time.perf_counter()
                out = p.generate(prompts)
                rates[b].append(sum(len(x.response_ids) for x in out) / (time.perf_counter() - t))
    finally:
        for p in pools.values():
            p.shutdown()
    v, h = statistics.median(rates["vllm"]), statistics.median(rates["hf"])
    return {"throughput_model": size, "throughput_model_params": count_parameters(path),
            "throughput_prompts": n_prompts, "throughput_max_tokens": max_tokens,
            "vllm_tokens_per_s": v, "hf_tokens_per_s": h, "vllm_over_hf_tokens_per_s_ratio": v / h}


def sync_latency(size: str, zero: int, repeats: int, transport: str = "object_store") -> dict:
    from rayllm.config import GroupConfig, RolloutConfig
    from rayllm.group import ModelGroup
    from rayllm.models import count_parameters, tiny_model_path
    from rayllm.rollout import RolloutPool

    path = tiny_model_path(size)
    group = ModelGroup(f"policy-{size}", GroupConfig(num_ranks=2, zero_stage=zero, micro_batch_size=2), path,
                       trainable=zero in (1, 2), total_steps=1)  # ZeRO-1/2 exist only with an optimizer
    pool = RolloutPool(RolloutConfig(num_engines=1, max_model_len=256, weight_transport=transport), path)
    try:
        pool.sync(group)  # first push: warms both sides (and forms the collective channel)
        runs = [pool.sync(group) for _ in range(repeats)]
    finally:
        pool.shutdown()
        group.shutdown()
    med = {k: statistics.median(r[k] for r in runs) for k in ("gather_s", "push_s", "verify_s")}
    tag = _tag(size, zero, transport)
    return {f"sync_{tag}_params": count_parameters(path), **{f"sync_{tag}_{k}": v for k, v in med.items()},
            f"sync_{tag}_total_s": sum(med.values()), f"sync_{tag}_max_gap": max(r["max_gap"] for r in runs)}


def _tag(size: str, zero: int, transport: str) -> str:
    return f"{size.replace('tiny-', '')}_zero{zero}" + ("_collective" if transport == "collective" else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny-30m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sync", default="tiny-1m:3,tiny-30m:2,tiny-30m:3,tiny-30m:2:collective,tiny-30m:3:collective,"
                                      "tiny-100m:3,tiny-100m:3:collective",
                    help="model:zero_stage[:collective] of the policy group the weights come from and the "
                         "transport (default: the object store)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from rayllm.env import worker_env

    ray.init(num_cpus=4, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    res = throughput(a.size, a.prompts, a.max_tokens, a.rounds)
    pairs = [(x.split(":")[0], int(x.split(":")[1]), "collective" if x.endswith(":collective") else "object_store")
             for x in a.sync.split(",")]
    for size, zero, transport in pairs:
        res.update(sync_latency(size, zero, a.repeats, transport))
    ray.shutdown()

    print(f"\nrollout throughput, {a.size} ({res['throughput_model_params'] / 1e6:.1f}M params), {a.prompts} prompts "
          f"x {a.max_tokens} sampled tokens, 1 engine each")
    print(f"{'engine':<12}{'tokens/s':>12}")
    print(f"{'vLLM':<12}{res['vllm_tokens_per_s']:>12,.0f}\n{'HF generate':<12}{res['hf_tokens_per_s']:>12,.0f}")
    print(f"ratio vLLM / HF = {res['vllm_over_hf_tokens_per_s_ratio']:.2f}x (goal >= 1.3)\n")
    print("weight sync + verification into one vLLM engine from a 2-rank group (median seconds;")
    print("object store: gather, then push; collective: push = gather + broadcast, pipelined per bucket;")
    print("the push includes the trainer's probe forward, which runs while the engine reloads)")
    print(f"{'model':<11}{'ZeRO':>5}{'transport':>14}{'params':>9}{'gather':>9}{'push':>9}{'verify':>9}{'total':>9}"
          f"{'max gap':>11}")
    for size, zero, transport in pairs:
        t = _tag(size, zero, transport)
        print(f"{size:<11}{zero:>5}{transport:>14}{res[f'sync_{t}_params'] / 1e6:>8.1f}M{res[f'sync_{t}_gather_s']:>9.3f}"
              f"{res[f'sync_{t}_push_s']:>9.3f}{res[f'sync_{t}_verify_s']:>9.3f}{res[f'sync_{t}_total_s']:>9.3f}"
              f"{res[f'sync_{t}_max_gap']:>11.1e}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
