"""Whole SFT pipelines on the local Ray cluster: the loss goes down, the output loads in
transformers, stages are skipped on rerun, and an interrupted run resumes from its checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayllm.pipeline_file import load_pipeline
from rayllm.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["sft.model.tiny=tiny-1m", "sft.data.num_examples=600", "sft.train.global_batch_size=32",
         "sft.group.micro_batch_size=8", "sft.train.eval_every=5", "sft.train.checkpoint_every=0"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_goes_down_and_model_loads(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    pipe = load_pipeline(ROOT / "pipelines/sft_tiny.py", SMALL + [f"run_dir={tmp_path}", "sft.train.epochs=2"])
    summary = run_pipeline(pipe, progress=False)
    s = summary["stages"][0]
    assert s["eval_loss_final"] < 0.6 * s["eval_loss_initial"], s
    steps = [m for m in _metrics(tmp_path) if "loss" in m]
    assert len(steps) == s["steps"] == 2 * (540 // 32)
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots" / "sft_loss.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["stages"][0]["steps"] == s["steps"]

    lines = len(_metrics(tmp_path))
    again = run_pipeline(pipe, progress=False)  # same config: the finished stage is skipped
    assert again["stages"][0]["skipped"]
    assert len(_metrics(tmp_path)) == lines  # no step ran again


def test_interrupted_run_resumes_without_repeating_steps(ray_cluster, tmp_path, monkeypatch):
    from rayllm.group import ModelGroup

    pipe = load_pipeline(ROOT / "pipelines/sft_tiny.py",
                         SMALL + [f"run_dir={tmp_path}", "sft.train.max_steps=8", "sft.train.checkpoint_every=3"])
    real = ModelGroup.train_step
    calls = {"n": 0}

    def dies_at_step_7(self, rows, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("worker lost")
        return real(self, rows, **kw)

    monkeypatch.setattr(ModelGroup, "train_step", dies_at_step_7)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_pipeline(pipe, progress=False)
    monkeypatch.setattr(ModelGroup, "train_step", real)
    assert (tmp_path / "sft" / "checkpoints" / "latest").read_text() == "step6"
    run_pipeline(pipe, progress=False)
    steps = [m["step"] for m in _metrics(tmp_path) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # 7 and 8 once, after resuming from step 6


def test_demo_entry_point_runs_as_a_script(tmp_path):
    """`python pipelines/sft_tiny.py` starts its own local Ray cluster and prints a summary."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "pipelines/sft_tiny.py"), "--no-progress", "--set", f"run_dir={tmp_path}",
         "--set", "sft.train.max_steps=3", "--set", "ray.num_cpus=3",
         *[a for o in SMALL for a in ("--set", o)]],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pipeline 'sft_tiny' finished" in out.stdout and "eval loss" in out.stdout
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()
