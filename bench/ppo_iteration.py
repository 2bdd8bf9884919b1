"""PPO samples/s on two workloads, all arms in one run: TRL's PPOTrainer and GRPOTrainer, rayllm
synchronous and asynchronous (algo.max_staleness k = 1, 2).

    python bench/ppo_iteration.py [--workload realistic|short|both] [--size tiny-8m] [--lr 1e-5]
                                  [--iterations N] [--warmup W] [--json out.json]

Workloads (the same tiny policy, reward and value models on every arm, fp32, 2 PPO epochs of
mini-batches of 8 samples, one optimizer step each, kl_coef 0.05):
- **realistic** (issue 16): 64 prompts per iteration, one response each, sampled at temperature 1
  until EOS or 128 tokens. The policy is tiny-8m fine-tuned once so that its responses stop at
  spread lengths (bench/_length_policy.py: a long tail between ~20 and 128 tokens), as RLHF
  responses do; a fresh tiny model would never stop. Generation is then most of an iteration.
- **short** (the earlier row): 32 prompts, exactly 16 tokens each (no EOS stop): almost all training.

Arms:
- TRL 1.12 `PPOTrainer` (the last TRL with PPO, in its own venv: bench/trl_baseline_env.py;
  bench/_trl_ppo.py), at its best tuning: `gc.freeze()` and the faster of 1 or 2 torch threads
  (and as shipped, on the short workload, for the earlier figure);
- TRL's current `GRPOTrainer` (the project's venv; bench/_trl_grpo.py) with its own HF generation,
  on the realistic workload: the same 64 samples per iteration as 16 prompts x 4, the same
  mini-batch, epochs and KL coefficient (so it runs a reference forward too), no critic;
- rayllm through `run_ppo` (the loop the pipeline runs): four groups of one rank (ZeRO-0), a vLLM
  engine, a verified weight push after every update, behaviour log-probs from the engine (as TRL
  takes them from generate's scores), GAE; synchronous (k = 0) and asynchronous, k = 1 and k = 2.

Samples/s = samples x measured iterations / their summed wall time, after W warm-up iterations
(rayllm: the `iteration_s` windows of metrics.jsonl, which tile the wall clock). Busy share: busy
CPU seconds / (cores x wall) over the measured iterations (rayllm: the whole machine, read as each
iteration is logged; TRL, one process: its own CPU time). The learning side: each arm's mean
reward-model score over its last two iterations, after the same number of samples, beside the
synchronous arm's; the noise figure is the synchronous arm's iteration-to-iteration spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORKLOADS = {
    "realistic": {"batch": 64, "max_tokens": 128, "stop_eos": True, "iterations": 4, "warmup": 1},
    "short": {"batch": 32, "max_tokens": 16, "stop_eos": False, "iterations": 4, "warmup": 1},
}
MINI_BATCH, EPOCHS, KL_COEF = 8, 2, 0.05


def models(size: str, stop_eos: bool) -> dict[str, Path]:
    from rayllm.models import tiny_model_path

    policy = tiny_model_path(size)
    if stop_eos:
        from _length_policy import length_policy

        policy = length_policy(policy, ROOT / ".cache" / "bench")
    return {"policy": policy, "reward": tiny_model_path(size, "reward", seed=1),
            "value": tiny_model_path(size, "critic", seed=2)}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O, not stolen by
    the hypervisor): rayllm's work is spread over the driver, the Ray actors and Ray itself."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _subprocess_json(cmd: list[str], env: dict, what: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        r = subprocess.run([*cmd, "--json", str(out)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_trl_ppo(w: dict, a, paths: dict, prompts: list[list[int]], extra: list[str], threads: int) -> dict:
    from trl_baseline_env import ensure_trl_venv

    python = ensure_trl_venv()
    with tempfile.TemporaryDirectory() as d:
        pf = Path(d) / "prompts.json"
        pf.write_text(json.dumps(prompts))
        cmd = [str(python), str(ROOT / "bench" / "_trl_ppo.py"), "--policy", str(paths["policy"]),
               "--reward", str(paths["reward"]), "--value", str(paths["value"]), "--prompts", str(pf),
               "--batch-size", str(w["batch"]), "--mini-batch-size", str(MINI_BATCH), "--epochs", str(EPOCHS),
               "--response-length", str(w["max_tokens"]), "--iterations", str(w["iterations"]),
               "--warmup", str(w["warmup"]), "--threads", str(threads), "--learning-rate", str(a.lr),
               *(["--stop-eos"] if w["stop_eos"] else []), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        r = _subprocess_json(cmd, env, "TRL PPOTrainer")
    return _trl_summary(r, w, threads)


def run_trl_grpo(w: dict, a, paths: dict, texts: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        pf = Path(d) / "prompts.json"
        pf.write_text(json.dumps(texts))
        cmd = [sys.executable, str(ROOT / "bench" / "_trl_grpo.py"), "--policy", str(paths["policy"]),
               "--reward", str(paths["reward"]), "--prompts", str(pf), "--samples", str(w["batch"]),
               "--generations", "4", "--mini-batch-size", str(MINI_BATCH), "--epochs", str(EPOCHS),
               "--max-tokens", str(w["max_tokens"]), "--iterations", str(w["iterations"]),
               "--warmup", str(w["warmup"]), "--threads", str(threads), "--learning-rate", str(a.lr),
               "--beta", str(KL_COEF), "--gc-freeze"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        r = _subprocess_json(cmd, env, "TRL GRPOTrainer")
    return _trl_summary(r, w, threads)


def _trl_summary(r: dict, w: dict, threads: int) -> dict:
    wall = sum(r["seconds_per_iteration"])
    rewards = r.get("reward_per_iteration") or []
    return {"samples_per_s": w["batch"] * w["iterations"] / wall,
            "busy_share": sum(r["cpu_seconds_per_iteration"]) / ((os.cpu_count() or 1) * wall),
            "generate_s": statistics.mean(r["generation_seconds_per_iteration"]),
            "response_tokens_mean": r.get("response_tokens_mean"), "reward_per_iteration": rewards,
            "threads": threads, "version": r.get("trl_version")}


class BusySampler:
    """The machine's busy CPU seconds at the moment each new iteration line reaches metrics.jsonl
    (polled every 0.1 s), so that the busy share is taken over exactly the measured iterations."""

    def __init__(self, path: Path):
        self.path, self.marks, self._stop = path, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _lines(self) -> int:
        if not self.path.is_file():
            return 0
        return sum(1 for line in self.path.read_text().splitlines()
                   if '"reward"' in line and '"sample_ids"' in line)

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            n = self._lines()
            if n > seen:
                self.marks.append((n, busy_cpu_seconds()))
                seen = n
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def run_rayllm(w: dict, a, paths: dict, prompt_file: Path, k: int) -> dict:
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
    from rayllm.trainer.ppo import run_ppo

    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    opt = OptimizerConfig(lr=a.lr, scheduler="constant")
    # One rank each: ZeRO-0 (ZeRO has nothing to shard on one rank; its bookkeeping costs ~35% of a step here).
    train = GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=MINI_BATCH, cpus_per_rank=0.5, optimizer=opt)
    frozen = GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=16, cpus_per_rank=0.5)
    # k more iterations than are measured: the worker runs up to k batches ahead, and in the last
    # k iterations of a run it has nothing left to generate, so they would train with the engine
    # idle and flatter an asynchronous arm. Measured: iterations W+1 .. W+N, as on every arm.
    end = w["warmup"] + w["iterations"]
    total = end + k
    stage = PPO(
        policy_model=ModelConfig(path=str(paths["policy"])), reward_model=ModelConfig(path=str(paths["reward"])),
        critic_model=ModelConfig(path=str(paths["value"])),
        policy=train, critic=train, reference=frozen, reward=frozen,
        rollout=RolloutConfig(cpus_per_engine=0.5, chunk_size=w["batch"] // 2, max_model_len=256,
                              sampling=SamplingConfig(n=1, temperature=1.0, max_tokens=w["max_tokens"],
                                                      ignore_eos=not w["stop_eos"])),
        data=PromptDataConfig(source=str(prompt_file), eval_prompts=0),
        algo=PPOAlgoConfig(advantage="gae", gamma=1.0, lam=0.95, kl_coef=KL_COEF, ppo_epochs=EPOCHS,
                           mini_batch_size=MINI_BATCH, tis_cap=None, behavior_logprobs="engine", max_staleness=k),
        train=PPOTrainConfig(iterations=total, rollout_batch_size=w["batch"]),
    )
    try:
        with tempfile.TemporaryDirectory() as d, BusySampler(Path(d) / "metrics.jsonl") as busy:
            run_ppo(stage, Path(d), seed=0, artifacts={}, progress=False)
            time.sleep(0.3)  # the sampler's last poll
            steps = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    finally:
        ray.shutdown()
    steps = [m for m in steps if "reward" in m and "sample_ids" in m]
    assert len(steps) == total, f"{len(steps)} iterations logged, expected {total}"
    assert all(m.get("stale_samples", 0) == 0 for m in steps), "a sample past the staleness bound was trained on"
    if not w["stop_eos"]:
        assert all(m["response_length"] == w["max_tokens"] for m in steps), "every response must be exactly L tokens"
    measured = steps[w["warmup"]:end]
    wall = sum(m["iteration_s"] for m in measured)
    marks = dict(busy.marks)
    share = None
    if w["warmup"] in marks and end in marks:  # busy CPU at the end of the last warm-up and the last measured one
        share = (marks[end] - marks[w["warmup"]]) / ((os.cpu_count() or 1) * wall)
    mean = lambda key: statistics.mean(m.get(key, 0.0) for m in measured)  # noqa: E731
    return {"samples_per_s": w["batch"] * len(measured) / wall, "busy_share": share,
            "generate_s": mean("generate_s"), "train_s": mean("train_s"), "sync_s": mean("sync_s"),
            "overlap_share": mean("overlap_share"), "trainer_idle_s": mean("trainer_idle_s"),
            "engine_idle_s": mean("engine_idle_s"), "staleness_mean": mean("staleness_mean"),
            "staleness_max": max(m.get("staleness_max", 0) for m in steps),
            "stale_samples": sum(m.get("stale_samples", 0) for m in steps),
            "response_tokens_mean": mean("response_length"), "truncated_share": mean("truncated_share"),
            "reward_per_iteration": [m["reward"] for m in steps[:end]]}  # the same samples as every arm


def run_workload(name: str, a) -> dict:
    from rayllm.datasets.prompts import encode_prompt, load_prompts
    from rayllm.datasets.tasks import arithmetic
    from rayllm.models import load_tokenizer

    w = dict(WORKLOADS[name])
    for key in ("iterations", "warmup"):
        if getattr(a, key) is not None:
            w[key] = getattr(a, key)
    paths = models(a.size, w["stop_eos"])
    tok = load_tokenizer(paths["policy"])
    total = w["warmup"] + w["iterations"]
    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        prompt_file = Path(d) / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                       for r in arithmetic(w["batch"] * total, seed=123)))
        from rayllm.config import PromptDataConfig

        # The order rayllm takes them in (load_prompts shuffles a file by the seed): TRL gets the same.
        records = load_prompts(PromptDataConfig(source=str(prompt_file), eval_prompts=0), 0)[0]
        ids = [encode_prompt(tok, r["prompt"]) for r in records]
        print(f"[bench] {name}: TRL 1.12 PPOTrainer, gc.freeze() at {a.trl_threads} threads"
              f"{' and as shipped' if name == 'short' else ''}", flush=True)
        if name == "short":
            arms["trl_ppo_shipped"] = run_trl_ppo(w, a, paths, ids, [], 1)
        trl = {t: run_trl_ppo(w, a, paths, ids, ["--gc-freeze"], t) for t in a.trl_threads}
        arms["trl_ppo"] = max(trl.values(), key=lambda r: r["samples_per_s"])
        if name == "realistic":
            print(f"[bench] {name}: TRL {a.grpo_version} GRPOTrainer (HF generate), {a.trl_threads} threads", flush=True)
            grpo = {t: run_trl_grpo(w, a, paths, [r["prompt"] for r in records], t) for t in a.trl_threads}
            arms["trl_grpo"] = max(grpo.values(), key=lambda r: r["samples_per_s"])
        for k in a.staleness:
            print(f"[bench] {name}: rayllm PPO, max_staleness={k}", flush=True)
            arms["rayllm_sync" if k == 0 else f"rayllm_async_k{k}"] = run_rayllm(w, a, paths, prompt_file, k)
    return {"workload": w, "arms": arms}


def flat(name: str, res: dict) -> dict:
    """Flat JSON keys: <workload>_<arm>_<what>, and <workload>_<arm>_over_<arm>_samples_per_s_ratio."""
    out, arms = {}, res["arms"]
    for arm, r in arms.items():
        for key, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{name}_{arm}_{key}"] = v
        rw = r["reward_per_iteration"]
        if rw:
            out[f"{name}_{arm}_reward_final"] = statistics.mean(rw[-2:])
            out[f"{name}_{arm}_reward_first"] = rw[0]
    for x in arms:
        for y in arms:
            if x != y:
                out[f"{name}_{x}_over_{y}_samples_per_s_ratio"] = arms[x]["samples_per_s"] / arms[y]["samples_per_s"]
    sync = arms.get("rayllm_sync")
    if sync and len(sync["reward_per_iteration"]) > 2:
        rw = sync["reward_per_iteration"]
        out[f"{name}_rayllm_sync_reward_step_spread"] = statistics.pstdev(b - a for a, b in zip(rw, rw[1:]))
        for arm in arms:
            if arm.startswith("rayllm_async"):
                out[f"{name}_{arm}_reward_final_minus_sync"] = (out[f"{name}_{arm}_reward_final"]
                                                                 - out[f"{name}_rayllm_sync_reward_final"])
    best_trl = max((a for a in arms if a.startswith("trl_") and a != "trl_ppo_shipped"),
                   key=lambda a: arms[a]["samples_per_s"])
    out[f"{name}_best_trl_arm"] = best_trl
    for arm in arms:
        if arm.startswith("rayllm_"):
            out[f"{name}_{arm}_over_best_trl_samples_per_s_ratio"] = arms[arm]["samples_per_s"] / arms[best_trl]["samples_per_s"]
    return out


def table(name: str, res: dict, f: dict) -> None:
    w, arms = res["workload"], res["arms"]
    print(f"\n{name}: {w['batch']} samples per iteration, responses {'to EOS, at most' if w['stop_eos'] else 'of exactly'} "
          f"{w['max_tokens']} tokens, {EPOCHS} epochs of mini-batch {MINI_BATCH}, {w['iterations']} measured "
          f"iterations after {w['warmup']}")
    print(f"{'arm':<22}{'samples/s':>10}{'busy':>7}{'gen s':>8}{'resp tok':>9}{'reward first':>13}{'reward final':>13}")
    for arm, r in arms.items():
        busy = f"{r['busy_share']:.0%}" if r.get("busy_share") is not None else "-"
        rw = r["reward_per_iteration"]
        tokens = f"{r['response_tokens_mean']:.1f}" if r.get("response_tokens_mean") else "-"
        first = f"{rw[0]:.3f}" if rw else "-"
        final = f"{statistics.mean(rw[-2:]):.3f}" if rw else "-"
        print(f"{arm:<22}{r['samples_per_s']:>10.2f}{busy:>7}{r['generate_s']:>8.2f}{tokens:>9}{first:>13}{final:>13}")
    names = list(arms)
    print("ratios (row / column):" + "".join(f"{n[:14]:>16}" for n in names))
    for x in names:
        print(f"{x:<22}" + "".join(f"{arms[x]['samples_per_s'] / arms[y]['samples_per_s']:>16.2f}" for y in names))
    for arm in names:
        if arm.startswith("rayllm_async") and "rayllm_sync" in arms:
            r = arms[arm]
            print(f"{arm}: {f[f'{name}_{arm}_over_rayllm_sync_samples_per_s_ratio']:.2f}x sync (goal >= 1.5), "
                  f"{f[f'{name}_{arm}_over_best_trl_samples_per_s_ratio']:.2f}x {f[f'{name}_best_trl_arm']} (goal >= 1.5); "
                  f"overlap {r['overlap_share']:.0%}, staleness mean {r['staleness_mean']:.2f} max {r['staleness_max']}, "
                  f"stale samples trained {r['stale_samples']}; reward final - sync "
                  f"{f[f'{name}_{arm}_reward_final_minus_sync']:+.3f} (sync's step spread "
                  f"{f[f'{name}_rayllm_sync_reward_step_spread']:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["realistic", "short", "both"], default="both")
    ap.add_argument("--size", default="tiny-8m")
    ap.add_argument("--lr", type=float, default=1e-5, help="policy and critic learning rate, every arm")
    ap.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                    help="rayllm arms: max_staleness values (0 = synchronous)")
    ap.add_argument("--trl-threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="torch threads to try for each TRL arm; the fastest is the arm's figure")
    ap.add_argument("--iterations", type=int, default=None, help="measured iterations (default per workload)")
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured iterations first (default per workload)")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from rayllm.env import apply_worker_env

    apply_worker_env()
    import trl

    from rayllm.models import count_parameters, tiny_model_path

    a.grpo_version = trl.__version__
    out = {"model": a.size, "model_params": count_parameters(tiny_model_path(a.size)), "cores": os.cpu_count(),
           "lr": a.lr, "mini_batch": MINI_BATCH, "ppo_epochs": EPOCHS, "kl_coef": KL_COEF,
           "trl_grpo_version": a.grpo_version}
    results = {}
    for name in (["realistic", "short"] if a.workload == "both" else [a.workload]):
        results[name] = run_workload(name, a)
        f = flat(name, results[name])
        out.update(f)
        if a.json_out:  # after each workload: a later failure keeps what was measured
            Path(a.json_out).write_text(json.dumps(out, indent=2) + "\n")
        table(name, results[name], f)


if __name__ == "__main__":
    main()
