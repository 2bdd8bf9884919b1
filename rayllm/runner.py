"""Run a Pipeline: start or join Ray, run each stage in order, write summary, report and plots.

A stage whose output exists and whose config hash matches is skipped, so rerunning a pipeline
after a failure picks up where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rayllm.config import Pipeline
from rayllm.env import apply_worker_env, worker_env
from rayllm.io import write_json_atomic


def ensure_ray(pipe: Pipeline) -> None:
    start_ray(pipe.ray)


def start_ray(c) -> None:
    """Join `c.address`, or start a local cluster; no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    kw = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": True}
    if c.address:
        ray.init(address=c.address, **kw)
    else:
        ray.init(num_cpus=c.num_cpus, object_store_memory=c.object_store_memory, **kw)


def _stage_hash(stage) -> str:
    return hashlib.sha256(stage.model_dump_json().encode()).hexdigest()[:16]


def run_pipeline(pipe: Pipeline, progress: bool = True) -> dict:
    apply_worker_env()
    out = pipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "pipeline.json", pipe.model_dump(mode="json"))
    ensure_ray(pipe)
    from rayllm.report import write_report
    from rayllm.trainer.sft import run_sft

    t0 = time.time()
    summaries = []
    for stage in pipe.stages:
        sdir = out / stage.name
        done = sdir / "DONE.json"
        h = _stage_hash(stage)
        if done.is_file() and json.loads(done.read_text()).get("config_hash") == h:
            prev = json.loads(done.read_text())["summary"]
            print(f"[rayllm] {stage.name}: finished earlier with the same config, skipped")
            summaries.append({**prev, "skipped": True})
            continue
        print(f"[rayllm] {stage.name}: starting ({stage.kind})")
        if stage.kind == "sft":
            s = run_sft(stage, sdir, pipe.seed, metrics_path=out / "metrics.jsonl", progress=progress)
        else:  # pragma: no cover - guarded by the config's discriminated union
            raise ValueError(f"unknown stage kind {stage.kind!r}")
        write_json_atomic(done, {"config_hash": h, "summary": s})
        summaries.append(s)
    summary = {"pipeline": pipe.name, "run_dir": str(out), "wall_time_s": time.time() - t0, "stages": summaries}
    write_json_atomic(out / "summary.json", summary)
    report = write_report(out, summary)
    _print_summary(summary, report)
    return summary


def _print_summary(summary: dict, report: Path) -> None:
    print(f"\n[rayllm] pipeline {summary['pipeline']!r} finished in {summary['wall_time_s']:.1f} s")
    for s in summary["stages"]:
        if "eval_loss_final" in s:
            print(f"  {s['stage']}: eval loss {s['eval_loss_initial']:.3f} -> {s['eval_loss_final']:.3f} "
                  f"over {s['steps']} steps on {s['num_ranks']} rank(s), ZeRO-{s['zero_stage']}; model at {s['model']}")
    print(f"  report: {report}")
