"""Run a Pipeline: start or join Ray, run each stage in order, write summary, report and plots.

Each stage consumes the models of the stages before it (`artifacts`: the model directory of the
last finished stage of each kind). A stage whose output exists and whose hash matches is
skipped, so rerunning a pipeline after a failure picks up where it stopped; the hash covers the
stage's config and those of every stage before it, so a changed SFT stage reruns what follows.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rayllm.config import Pipeline
from rayllm.console import say
from rayllm.env import apply_worker_env, remote_env
from rayllm.io import write_json_atomic


def ensure_ray(pipe: Pipeline) -> None:
    start_ray(pipe.ray)


def start_ray(c) -> None:
    """Join `c.address` (or the cluster of the Ray job this driver runs in: `ray job submit` sets
    RAY_ADDRESS), or start a local cluster; no-op when Ray is already up."""
    import os

    import ray

    if ray.is_initialized():
        return
    kw = {"runtime_env": {"env_vars": remote_env()}, "log_to_driver": True}
    address = c.address or os.environ.get("RAY_ADDRESS")
    if address:
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by the job supervisor
            # In a Ray job: combine the job's runtime env (--runtime-env, --working-dir) with this
            # driver's env vars; without it Ray refuses any variable named in both.
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=c.num_cpus, object_store_memory=c.object_store_memory,
                 _metrics_export_port=c.metrics_export_port, **kw)


def _stage_hash(stage, upstream: list[str]) -> str:
    text = stage.model_dump_json() + "".join(upstream)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stage(stage, sdir: Path, seed: int, artifacts: dict[str, str], metrics_path: Path, progress: bool) -> dict:
    if stage.kind == "sft":
        from rayllm.trainer.sft import run_sft

        return run_sft(stage, sdir, seed, metrics_path=metrics_path, progress=progress)
    if stage.kind == "reward":
        from rayllm.trainer.reward import run_reward

        return run_reward(stage, sdir, seed, artifacts, metrics_path=metrics_path, progress=progress)
    if stage.kind == "ppo":
        from rayllm.trainer.ppo import run_ppo

        return run_ppo(stage, sdir, seed, artifacts, metrics_path=metrics_path, progress=progress)
    raise ValueError(f"unknown stage kind {stage.kind!r}")  # pragma: no cover - the config's union guards


def run_pipeline(pipe: Pipeline, progress: bool = True) -> dict:
    apply_worker_env()
    out = pipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "pipeline.json", pipe.model_dump(mode="json"))
    ensure_ray(pipe)
    from rayllm.loggers import open_loggers
    from rayllm.report import write_report

    t0 = time.time()
    summaries, artifacts, upstream = [], {}, []
    with open_loggers(pipe, out) as loggers:
        for stage in pipe.stages:
            sdir = out / stage.name
            done = sdir / "DONE.json"
            h = _stage_hash(stage, upstream)
            if done.is_file() and json.loads(done.read_text()).get("config_hash") == h:
                s = {**json.loads(done.read_text())["summary"], "skipped": True}
                say(f"[rayllm] {stage.name}: finished earlier with the same config, skipped")
            else:
                say(f"[rayllm] {stage.name}: starting ({stage.kind})")
                s = run_stage(stage, sdir, pipe.seed, artifacts, out / "metrics.jsonl", progress)
                write_json_atomic(done, {"config_hash": h, "summary": s})
                loggers.stage_done()
            summaries.append(s)
            artifacts[stage.kind] = s["model"]
            upstream.append(h)
        summary = {"pipeline": pipe.name, "run_dir": str(out), "wall_time_s": time.time() - t0, "stages": summaries}
        write_json_atomic(out / "summary.json", summary)
        report = write_report(out, summary)  # inside: the dashboard keeps the last values meanwhile
    _print_summary(summary, report)
    return summary


def _print_summary(summary: dict, report: Path) -> None:
    say(f"\n[rayllm] pipeline {summary['pipeline']!r} finished in {summary['wall_time_s']:.1f} s")
    for s in summary["stages"]:
        if "eval_loss_final" in s:
            say(f"  {s['stage']}: eval loss {s['eval_loss_initial']:.3f} -> {s['eval_loss_final']:.3f} "
                f"over {s['steps']} steps on {s['num_ranks']} rank(s), ZeRO-{s['zero_stage']}; model at {s['model']}")
        if "eval_accuracy_final" in s:
            say(f"  {s['stage']}: held-out pairwise accuracy {s['eval_accuracy_initial']:.3f} -> "
                f"{s['eval_accuracy_final']:.3f} over {s['steps']} steps; model at {s['model']}")
        if "ground_truth_final" in s:
            sampled = (f"; sampled {s['ground_truth_sampled_initial']:.3f} -> {s['ground_truth_sampled_final']:.3f}"
                       if "ground_truth_sampled_final" in s else "")
            say(f"  {s['stage']}: ground-truth score on {s['eval_prompts']} held-out prompts, greedy "
                f"{s['ground_truth_initial']:.3f} (starting policy) -> {s['ground_truth_final']:.3f} (PPO policy){sampled}; "
                f"reward {s['reward_initial']:.3f} -> {s['reward_final']:.3f} over {s['iterations']} iterations; "
                f"model at {s['model']}")
    say(f"  report: {report.with_name('report.html')} (and {report.name}, plots/)")
