"""Step time of one DeepSpeed configuration as a rayllm ModelGroup (ranks are Ray actors, the
driver ships each batch) against the same RankEngine under plain torchrun, in one run.

    python bench/train_step.py [--size tiny-8m] [--zero 2] [--ranks 2] [--steps 30] [--json out.json]

Ratio = Ray median step time / torchrun median step time (goal: <= 1.10).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(10, vocab) for _ in range(seq)], "loss_mask": [1] * seq} for _ in range(n)]


def run_torchrun(spec: dict, ranks: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        sp, out = Path(d) / "spec.json", Path(d) / "out.json"
        sp.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(ROOT / "bench" / "_torchrun_rank.py"), str(sp), str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["step_times_s"]


def run_ray(spec: dict, ranks: int) -> list[float]:
    import ray

    from rayllm.config import GroupConfig
    from rayllm.env import worker_env
    from rayllm.group import ModelGroup

    ray.init(num_cpus=max(4, ranks + 2), object_store_memory=512 * 1024**2, log_to_driver=False,
             include_dashboard=False, runtime_env={"env_vars": worker_env()})
    try:
        g = ModelGroup("bench", GroupConfig.model_validate(spec["group"]), spec["model_path"], pad_id=spec["pad_id"])
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            t = time.perf_counter()
            g.train_step(spec["rows"])
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
        g.shutdown()
        return times
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny-8m")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate torchrun and Ray this many times, so machine drift hits both alike")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from rayllm.env import apply_worker_env

    apply_worker_env()
    from rayllm.models import count_parameters, load_tokenizer, tiny_model_path

    path = tiny_model_path(a.size)
    tok = load_tokenizer(path)
    group = {"num_ranks": a.ranks, "zero_stage": a.zero, "micro_batch_size": a.micro_batch}
    spec = {"model_path": str(path), "group": group, "pad_id": tok.pad_token_id, "steps": a.steps,
            "warmup": a.warmup, "rows": make_rows(a.micro_batch * a.ranks, a.seq, len(tok))}
    torchrun, ray_t = [], []
    for _ in range(a.rounds):
        torchrun += run_torchrun(spec, a.ranks)
        ray_t += run_ray(spec, a.ranks)
    tr, rr = statistics.median(torchrun), statistics.median(ray_t)
    res = {
        "model": a.size, "model_params": count_parameters(path), "zero_stage": a.zero, "ranks": a.ranks,
        "micro_batch_size": a.micro_batch, "seq_len": a.seq, "steps_timed": a.steps * a.rounds,
        "torchrun_step_s_median": tr, "ray_modelgroup_step_s_median": rr,
        "torchrun_step_s_min": min(torchrun), "ray_modelgroup_step_s_min": min(ray_t),
        "ray_over_torchrun_step_time_ratio": rr / tr,
    }
    print(f"\ntrain step, {a.size} ({res['model_params'] / 1e6:.1f}M params), ZeRO-{a.zero}, {a.ranks} ranks, "
          f"micro-batch {a.micro_batch} x {a.seq} tokens, {a.rounds} x {a.steps} timed steps each")
    print(f"{'launcher':<22}{'median s/step':>15}{'min s/step':>12}")
    print(f"{'torchrun':<22}{tr:>15.4f}{min(torchrun):>12.4f}")
    print(f"{'rayllm ModelGroup':<22}{rr:>15.4f}{min(ray_t):>12.4f}")
    print(f"ratio (Ray / torchrun): {rr / tr:.3f}   goal <= 1.10")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
