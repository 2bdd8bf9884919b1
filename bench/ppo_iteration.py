"""PPO samples/s: rayllm against TRL's PPOTrainer, same models, batch, response length and epochs.

    python bench/ppo_iteration.py [--size tiny-8m] [--batch 32] [--mini-batch 8] [--epochs 2]
                                  [--response-length 16] [--iterations 4] [--warmup 1] [--json out.json]

One PPO iteration, both sides: sample one response of exactly L tokens (no EOS stop) for each of B
prompts, score it with the reward model, the reference policy and the value model, per-token k1 KL
penalty and GAE with whitened advantages, then `epochs` passes of B/M mini-batch updates of the
policy and the value model (one optimizer step per mini-batch), all in fp32 on the same tiny
models (policy, reward and value model built from one config) and the same arithmetic prompts.

rayllm runs as it is meant to: four model groups of one rank each in Ray actors (ZeRO-0: one
rank has nothing to shard), a vLLM engine for the rollouts, experience forwards and the
policy/critic updates running concurrently, and a verified weight push into the engine after each
update (its cost is part of the iteration). Both sides take the behaviour log-probs from
generation (TRL from generate's scores, rayllm from the engine: algo.behavior_logprobs="engine").
The CPU work of an iteration is measured too: the machine's busy CPU seconds for rayllm (driver,
actors, Ray), the process's CPU time for TRL; from it, the samples/s rayllm would reach with every
core busy all the time, the ceiling that rescheduling the same work cannot pass. TRL 1.12.0 (the last release with PPO) runs in a
virtual environment of its own that this script builds once (bench/trl_baseline_env.py), single
process; it is measured as shipped and, as the kinder baseline the ratio is taken against, with
`gc.freeze()` and the faster of 1 or 2 torch threads. Samples/s = B x measured iterations /
their summed wall time, after `--warmup` iterations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def models(size: str) -> dict[str, Path]:
    from rayllm.models import tiny_model_path

    return {"policy": tiny_model_path(size), "reward": tiny_model_path(size, "reward", seed=1),
            "value": tiny_model_path(size, "critic", seed=2)}


def prompt_records(n: int) -> list[dict]:
    from rayllm.datasets.tasks import arithmetic

    return arithmetic(n, seed=123)


def run_trl(a, paths: dict, prompts: list[list[int]], extra: list[str], threads: int) -> dict:
    from trl_baseline_env import ensure_trl_venv

    python = ensure_trl_venv()
    with tempfile.TemporaryDirectory() as d:
        pf, out = Path(d) / "prompts.json", Path(d) / "out.json"
        pf.write_text(json.dumps(prompts))
        cmd = [str(python), str(ROOT / "bench" / "_trl_ppo.py"), "--policy", str(paths["policy"]),
               "--reward", str(paths["reward"]), "--value", str(paths["value"]), "--prompts", str(pf),
               "--batch-size", str(a.batch), "--mini-batch-size", str(a.mini_batch), "--epochs", str(a.epochs),
               "--response-length", str(a.response_length), "--iterations", str(a.iterations),
               "--warmup", str(a.warmup), "--threads", str(threads), "--json", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"TRL baseline failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_rayllm(a, paths: dict, records: list[dict]) -> dict:
    import ray

    from rayllm.config import (
        PPO,
        GroupConfig,
        ModelConfig,
        OptimizerConfig,
        PPOAlgoConfig,
        PPOTrainConfig,
        PromptDataConfig,
        RolloutConfig,
        SamplingConfig,
    )
    from rayllm.env import worker_env
    from rayllm.trainer.ppo import PPOTrainer

    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    opt = OptimizerConfig(lr=3e-6, scheduler="constant")  # TRL PPOConfig's default learning rate
    # One rank each: ZeRO-0 (ZeRO has nothing to shard on one rank; its bookkeeping costs ~35% of a step here).
    train = GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=a.mini_batch, cpus_per_rank=0.5, optimizer=opt)
    frozen = GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=a.batch, cpus_per_rank=0.5)
    stage = PPO(
        policy_model=ModelConfig(path=str(paths["policy"])), reward_model=ModelConfig(path=str(paths["reward"])),
        critic_model=ModelConfig(path=str(paths["value"])),
        policy=train, critic=train, reference=frozen, reward=frozen,
        rollout=RolloutConfig(cpus_per_engine=0.5, chunk_size=a.batch, max_model_len=256, sampling=SamplingConfig(
            n=1, temperature=1.0, max_tokens=a.response_length, ignore_eos=True)),
        data=PromptDataConfig(num_prompts=a.batch, eval_prompts=0),
        # Behaviour log-probs from the engine, as TRL takes them from generate's scores: neither
        # side spends a policy forward on them.
        algo=PPOAlgoConfig(advantage="gae", gamma=1.0, lam=0.95, kl_coef=0.05, ppo_epochs=a.epochs,
                           mini_batch_size=a.mini_batch, tis_cap=None, behavior_logprobs="engine"),
        train=PPOTrainConfig(iterations=a.warmup + a.iterations, rollout_batch_size=a.batch),
    )
    with tempfile.TemporaryDirectory() as d:
        t = PPOTrainer(stage, Path(d), seed=0, artifacts={})
        t.train_records = records  # the same prompts, in the same order, as TRL's
        try:
            times, parts, cpu = [], [], []
            for i in range(a.warmup + a.iterations):
                t0, c0 = time.perf_counter(), busy_cpu_seconds()
                exp = t.make_experience(t.next_prompts(), i + 1)
                t1 = time.perf_counter()
                steps = t.train(exp)
                t2 = time.perf_counter()
                sync = t.sync()
                t3 = time.perf_counter()
                assert all(len(r["input_ids"]) - r["loss_mask"].count(0) == a.response_length
                           for r in exp["policy_rows"]), "every response must be exactly L tokens"
                if i >= a.warmup:
                    times.append(t3 - t0)
                    cpu.append(busy_cpu_seconds() - c0)
                    parts.append({"generate_s": exp["metrics"]["generate_s"], "experience_s": exp["metrics"]["experience_s"],
                                  "train_s": t2 - t1, "sync_s": t3 - t2, "sync_max_gap": sync["sync_max_gap"],
                                  "policy_step_s": steps["policy_step_s"], "critic_step_s": steps["critic_step_s"]})
        finally:
            t.shutdown()
            ray.shutdown()
    mean = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    return {"samples_per_s": a.batch * len(times) / sum(times), "seconds_per_iteration": times,
            "cpu_seconds_per_iteration": sum(cpu) / len(cpu), **mean}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O, not stolen by
    the hypervisor): rayllm's work is spread over the driver, the Ray actors and Ray itself."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny-8m")
    ap.add_argument("--batch", type=int, default=32, help="prompts (= samples) per PPO iteration")
    ap.add_argument("--mini-batch", type=int, default=8, help="samples per optimizer step")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from rayllm.env import apply_worker_env

    apply_worker_env()
    from rayllm.datasets.prompts import encode_prompt
    from rayllm.models import count_parameters, load_tokenizer

    paths = models(a.size)
    tok = load_tokenizer(paths["policy"])
    records = prompt_records(a.batch * (a.warmup + a.iterations))
    prompts = [encode_prompt(tok, r["prompt"]) for r in records]

    print(f"[bench] TRL 1.12 PPOTrainer, as shipped and with gc.freeze() at 1 and 2 threads", flush=True)
    trl = {"shipped": run_trl(a, paths, prompts, [], 1)}
    for threads in (1, 2):
        trl[f"gc_freeze_{threads}t"] = run_trl(a, paths, prompts, ["--gc-freeze"], threads)
    best_key = max((k for k in trl if k != "shipped"), key=lambda k: trl[k]["samples_per_s"])
    print("[bench] rayllm PPO (4 groups in Ray, vLLM engine, verified sync)", flush=True)
    ours = run_rayllm(a, paths, records)

    res = {
        "model": a.size, "model_params": count_parameters(paths["policy"]), "batch_prompts": a.batch,
        "mini_batch": a.mini_batch, "ppo_epochs": a.epochs, "response_length": a.response_length,
        "measured_iterations": a.iterations, "trl_version": trl["shipped"].get("trl_version"),
        "rayllm_samples_per_s": ours["samples_per_s"],
        "rayllm_generate_s": ours["generate_s"], "rayllm_experience_s": ours["experience_s"],
        "rayllm_train_s": ours["train_s"], "rayllm_sync_verify_s": ours["sync_s"],
        "rayllm_sync_max_gap": ours["sync_max_gap"],
        "rayllm_policy_step_s": ours["policy_step_s"], "rayllm_critic_step_s": ours["critic_step_s"],
        "trl_shipped_samples_per_s": trl["shipped"]["samples_per_s"],
        "trl_best_samples_per_s": trl[best_key]["samples_per_s"], "trl_best_setting": best_key,
        "trl_best_generate_s": sum(trl[best_key]["generation_seconds_per_iteration"]) / a.iterations,
        "cores": os.cpu_count(),
        "rayllm_cpu_core_s_per_iteration": ours["cpu_seconds_per_iteration"],
        "trl_best_cpu_core_s_per_iteration": sum(trl[best_key]["cpu_seconds_per_iteration"]) / a.iterations,
        "trl_1t_cpu_core_s_per_iteration": sum(trl["gc_freeze_1t"]["cpu_seconds_per_iteration"]) / a.iterations,
    }
    # How busy rayllm keeps the machine, and what it would reach with every core busy all the time
    # (same work, perfect overlap): the ceiling that scheduling alone can reach.
    wall = a.batch / ours["samples_per_s"]
    res["rayllm_cpu_busy_share"] = res["rayllm_cpu_core_s_per_iteration"] / (res["cores"] * wall)
    res["rayllm_full_utilisation_bound_samples_per_s"] = a.batch * res["cores"] / res["rayllm_cpu_core_s_per_iteration"]
    res["rayllm_full_utilisation_bound_over_trl_best_ratio"] = (res["rayllm_full_utilisation_bound_samples_per_s"]
                                                                / res["trl_best_samples_per_s"])
    res["rayllm_over_trl_best_samples_per_s_ratio"] = res["rayllm_samples_per_s"] / res["trl_best_samples_per_s"]
    res["rayllm_over_trl_shipped_samples_per_s_ratio"] = res["rayllm_samples_per_s"] / res["trl_shipped_samples_per_s"]

    print(f"\nPPO iteration, {a.size} ({res['model_params'] / 1e6:.1f}M params) policy/reward/value, {a.batch} prompts x "
          f"{a.response_length} tokens, {a.epochs} epochs of mini-batch {a.mini_batch}, {a.iterations} measured iterations")
    print(f"{'system':<34}{'samples/s':>10}")
    for k, v in trl.items():
        print(f"{'TRL 1.12 PPOTrainer, ' + k:<34}{v['samples_per_s']:>10.2f}")
    print(f"{'rayllm':<34}{res['rayllm_samples_per_s']:>10.2f}")
    print(f"ratio rayllm / TRL ({best_key}) = {res['rayllm_over_trl_best_samples_per_s_ratio']:.2f}x (goal >= 1.5); "
          f"against TRL as shipped {res['rayllm_over_trl_shipped_samples_per_s_ratio']:.2f}x")
    print(f"rayllm per iteration: generate {ours['generate_s']:.3f} s, experience {ours['experience_s']:.3f} s, "
          f"train {ours['train_s']:.3f} s (a policy step {ours['policy_step_s']:.3f} s, a critic step "
          f"{ours['critic_step_s']:.3f} s, on their ranks), sync+verify {ours['sync_s']:.3f} s (max gap {ours['sync_max_gap']:.1e})")
    print(f"CPU work per iteration: rayllm {res['rayllm_cpu_core_s_per_iteration']:.2f} core-s (machine busy "
          f"{res['rayllm_cpu_busy_share']:.0%} of {res['cores']} cores), TRL {best_key} "
          f"{res['trl_best_cpu_core_s_per_iteration']:.2f}, TRL 1 thread {res['trl_1t_cpu_core_s_per_iteration']:.2f}; "
          f"rayllm with every core busy throughout would reach {res['rayllm_full_utilisation_bound_samples_per_s']:.2f} "
          f"samples/s = {res['rayllm_full_utilisation_bound_over_trl_best_ratio']:.2f}x TRL ({best_key})")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
