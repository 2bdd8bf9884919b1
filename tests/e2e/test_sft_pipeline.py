"""Whole SFT pipelines on the local Ray cluster: the loss goes down on the packed, deduplicated
stream, the output loads in transformers, stages are skipped on rerun, a run whose driver crashed
mid-stage resumes from its checkpoint at the exact data position, and a dataset prepared
beforehand can be used."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayllm.pipeline_file import load_pipeline
from rayllm.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["sft.model.tiny=tiny-1m", "sft.data.num_examples=1200", "sft.train.global_batch_size=8",
         "sft.group.micro_batch_size=4", "sft.train.eval_every=10", "sft.train.checkpoint_every=0"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 94 s, the suite's 25-minute budget: SFT stages run in make test in the three-stage pipeline and the resume test
def test_sft_loss_goes_down_and_model_loads(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    pipe = load_pipeline(ROOT / "pipelines/sft_tiny.py", SMALL + [f"run_dir={tmp_path}", "sft.train.epochs=2"])
    summary = run_pipeline(pipe, progress=False)
    s = summary["stages"][0]
    assert s["eval_loss_final"] < 0.6 * s["eval_loss_initial"], s
    # Trained on packed rows of the deduplicated, decontaminated training split.
    stats = json.loads((tmp_path / "sft" / "data" / "stats.json").read_text())
    assert stats["balanced"] and stats["rows"] == s["train_rows"] == s["rows"]
    assert stats["records_in"] == 1200 - s["eval_rows"] and stats["padding_share"] < 0.1
    # An arithmetic example's text is its prompt and a response that restates it: the exact
    # duplicates are the training records whose prompt came up before.
    from rayllm.datasets.sft import load_records, split

    d = pipe.stage("sft").data
    train, _ = split(load_records(d, pipe.seed), d.eval_fraction, pipe.seed)
    assert len(train) == stats["records_in"]
    assert stats["exact_duplicate"] == len(train) - len({r["prompt"] for r in train}) > 0
    steps = [m for m in _metrics(tmp_path) if "loss" in m]
    assert len(steps) == s["steps"] == 2 * (s["train_rows"] // 8)
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots" / "sft_loss.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["stages"][0]["steps"] == s["steps"]

    lines = len(_metrics(tmp_path))
    again = run_pipeline(pipe, progress=False)  # same config: the finished stage is skipped
    assert again["stages"][0]["skipped"]
    assert len(_metrics(tmp_path)) == lines  # no step ran again


# 115 s, for the suite's 25-minute budget: the resume after a driver crash at a checkpoint stays in
# make test in test_reward_stage.py (the same run_steps loop, losses equal to an uncrashed run) and
# test_ppo_sync_failure.py (the PPO loop's rerun).
@pytest.mark.slow
def test_driver_crash_mid_run_resumes_without_repeating_steps_or_rows(ray_cluster, tmp_path, monkeypatch):
    """The driver raises at step 7 (in its call to ModelGroup.train_step; no rank process dies)
    after a checkpoint at step 6: the rerun does steps 7 and 8 once, on the rows an uncrashed run
    would have fed them."""
    from rayllm.group import ModelGroup

    pipe = load_pipeline(ROOT / "pipelines/sft_tiny.py",
                         SMALL + [f"run_dir={tmp_path}", "sft.train.max_steps=8", "sft.train.checkpoint_every=3"])
    real = ModelGroup.train_step
    calls = {"n": 0}
    fed = []  # the row ids of every step that ran, in order

    def driver_raises_at_step_7(self, rows, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("driver crash (injected)")
        out = real(self, rows, **kw)
        fed.append(rows.ids)
        return out

    monkeypatch.setattr(ModelGroup, "train_step", driver_raises_at_step_7)
    with pytest.raises(RuntimeError, match=r"driver crash \(injected\)"):
        run_pipeline(pipe, progress=False)
    assert (tmp_path / "sft" / "checkpoints" / "latest").read_text() == "step6"
    prepared_at = (tmp_path / "sft" / "data" / "stats.json").stat().st_mtime_ns
    calls["n"] = 100  # no more failures
    run_pipeline(pipe, progress=False)
    steps = [m["step"] for m in _metrics(tmp_path) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # 7 and 8 once, after resuming from step 6
    assert (tmp_path / "sft" / "data" / "stats.json").stat().st_mtime_ns == prepared_at  # data reused
    # The resumed run fed steps 7 and 8 the rows an uncrashed run would have: no row repeated
    # or skipped (an epoch here is longer than 8 steps).
    assert len(fed) == 6 + 2
    rows = [i for ids in fed for i in ids]
    assert len(rows) == len(set(rows)) == 8 * 8
    from rayllm.data.stream import PackedSource
    from rayllm.trainer.sft_data import PackedRows

    order = PackedRows(PackedSource(tmp_path / "sft" / "data"), 8, pipe.seed, window=4)
    assert fed[6] == order.batch(6).ids and fed[7] == order.batch(7).ids


@pytest.mark.slow  # 55 s; the suite's 25-minute budget (the packed-row path is in the other SFT tests)
def test_prepared_dataset_feeds_the_pipeline(ray_cluster, tmp_path):
    """`rayllm data prepare` on an SFT JSONL (with a malformed line), then `sft.data.prepared`."""
    from rayllm.config import DataPrepConfig
    from rayllm.data.prepare import prepare
    from rayllm.datasets.tasks import arithmetic

    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"q": r["prompt"], "a": r["response"]}) + "\n" for r in arithmetic(400))
                   + "{not json\n")
    stats = prepare(DataPrepConfig(sources=[str(src)], kind="sft", fields={"prompt": "q", "response": "a"},
                                   seq_len=64, output=str(tmp_path / "prepared")), progress=False)
    assert stats["quarantined"] == 1 and stats["rows"] > 20
    pipe = load_pipeline(ROOT / "pipelines/sft_tiny.py", SMALL + [
        f"run_dir={tmp_path / 'run'}", f"sft.data.prepared={tmp_path / 'prepared'}", "sft.train.max_steps=4"])
    s = run_pipeline(pipe, progress=False)["stages"][0]
    assert s["steps"] == 4 and s["packed_rows"] == stats["rows"] == s["train_rows"] + s["eval_rows"]
    assert s["eval_loss_final"] < s["eval_loss_initial"]


def test_demo_entry_point_runs_as_a_script(tmp_path):
    """`python pipelines/sft_tiny.py` starts its own local Ray cluster and prints a summary; here
    on the unpacked path (one padded row per example)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "pipelines/sft_tiny.py"), "--no-progress", "--set", f"run_dir={tmp_path}",
         "--set", "sft.train.max_steps=3", "--set", "ray.num_cpus=3", "--set", "sft.data.packing=false",
         *[a for o in SMALL for a in ("--set", o)]],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pipeline 'sft_tiny' finished" in out.stdout and "eval loss" in out.stdout
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()
    # The console carries rayllm's lines only; Ray's start-up and Ray Data's notices are in the log.
    log = (tmp_path / "logs" / "run.log").read_text()
    assert f"[rayllm] log: {tmp_path / 'logs' / 'run.log'}" in out.stdout
    for noise in ("Started a local Ray instance", "streaming_executor"):
        assert noise in log and noise not in out.stdout + out.stderr
    assert all(line.startswith(("[rayllm]", "  ")) for line in out.stdout.splitlines() if line.strip()), out.stdout


# 95 s at ZeRO-2, the suite's 25-minute budget: a rank SIGKILLed mid-step stays in make test in
# test_elastic.py (ZeRO-3, against a fault-free run) and test_ppo_faults.py (ZeRO-2).
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])  # ZeRO-3: + a fault-free run
def test_rank_sigkilled_mid_stage_the_stage_completes_with_each_row_once_and_the_fault_logged(
        ray_cluster, tmp_path, monkeypatch, zero_stage):
    """RAYLLM_CHAOS kills rank 1 of the SFT group (2 ranks) 0.05 s into step 4, from outside its
    process. The stage goes on without a restart: every step once in metrics.jsonl, the ledger
    consumes each packed row of the epoch once, and the fault is an event there. At ZeRO-3 the
    losses are also those of a fault-free run of the same stage."""
    overrides = SMALL + ["sft.group.num_ranks=2", f"sft.group.zero_stage={zero_stage}", "sft.group.cpus_per_rank=1",
                         "sft.train.eval_every=0", "sft.train.epochs=1"]
    if zero_stage == 3:
        free = tmp_path / "free"
        run_pipeline(load_pipeline(ROOT / "pipelines/sft_tiny.py", overrides + [f"run_dir={free}"]), progress=False)
        expected = [m["loss"] for m in _metrics(free) if "loss" in m]
    tmp_path = tmp_path / "chaos"
    monkeypatch.setenv("RAYLLM_CHAOS", "sft/policy:1:4:kill:0.05")
    pipe = load_pipeline(ROOT / "pipelines/sft_tiny.py", overrides + [f"run_dir={tmp_path}"])
    s = run_pipeline(pipe, progress=False)["stages"][0]
    lines = _metrics(tmp_path)
    steps = [m for m in lines if "loss" in m]
    if zero_stage == 3:
        assert [m["loss"] for m in steps] == pytest.approx(expected, abs=1e-5, rel=0)  # world-size invariance
    assert [m["step"] for m in steps] == list(range(1, s["steps"] + 1))
    (fault,) = [m for m in lines if m.get("event") == "fault"]
    assert (fault["stage"], fault["kind"], fault["rank"], fault["step"]) == ("sft", "death", 1, 4)
    assert fault["recover_s"] < 60
    consumed = [i for m in steps for i in m["sample_ids"]]
    from rayllm.data.stream import PackedSource
    from rayllm.trainer.sft_data import PackedRows

    order = PackedRows(PackedSource(tmp_path / "sft" / "data"), 8, pipe.seed, window=4).order(0)
    assert consumed == [int(i) for i in order[: len(consumed)]]  # the epoch's order, each row once
    assert len(set(consumed)) == len(consumed) and len(order) - len(consumed) < 8  # only the last partial batch
