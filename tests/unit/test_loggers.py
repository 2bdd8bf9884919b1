"""The experiment loggers (rayllm/loggers.py), read back from what each one wrote, the Ray
metrics' mapping from metrics.jsonl lines (rayllm/ray_metrics.py), and the quiet console."""
import glob
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tensorboard_series

from rayllm.config import LoggingConfig, MLflowConfig, Pipeline, WandbConfig
from rayllm.loggers import Loggers, MLflowSink, TensorBoardSink, WandbSink, build, scalars
from rayllm.ray_metrics import event_points, points

LINES = [{"step": s, "epoch": 0, "loss": 2.0 / s, "tokens": 100 + s, "rank_shares": [0.25, 0.75], "sample_ids": [s]}
         for s in range(1, 5)]


def _pipe(tmp_path, **logging):
    return Pipeline(name="t", run_dir=str(tmp_path), stages=[{"kind": "sft", "name": "sft"}],
                    logging=LoggingConfig(**logging))


def test_scalars_are_the_numbers_and_per_rank_lists_of_a_line():
    assert scalars({"step": 3, "epoch": 0, "loss": 1.5, "skipped": False, "rank_shares": [0.4, 0.6],
                    "sample_ids": [1, 2], "kind": "x"}) == {"loss": 1.5, "rank_shares_0": 0.4, "rank_shares_1": 0.6}


def test_tensorboard_holds_every_series_at_its_step_and_a_resumed_stage_replaces_its_later_steps(tmp_path):
    tb = TensorBoardSink(tmp_path)
    for rec in LINES:
        tb.log("sft", rec["step"], rec)
    # The stage resumes from its step-2 checkpoint: steps 3 and 4 are written again, with new values.
    tb.resume("sft", 2)
    for rec in LINES[2:]:
        tb.log("sft", rec["step"], {**rec, "loss": rec["loss"] + 10})
    tb.close()
    got = tensorboard_series(tmp_path / "sft")
    assert set(got) == {"loss", "tokens", "rank_shares_0", "rank_shares_1"}
    assert got["loss"] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3 + 10)), (4, 10.5)]
    assert got["tokens"] == [(s, 100 + s) for s in range(1, 5)]


def test_mlflow_local_store_holds_every_series_of_a_stage(tmp_path):
    from mlflow.tracking import MlflowClient

    pipe = _pipe(tmp_path, tensorboard=False, ray_metrics=False, mlflow=MLflowConfig())
    sink = MLflowSink(pipe.logging.mlflow, pipe, tmp_path)
    for rec in LINES:
        sink.log("sft", rec["step"], rec)
    sink.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(sink.run_id, f"sft/{k}")]
            for k in ("loss", "tokens", "rank_shares_1")}
    assert hist["loss"] == [(s, 2.0 / s) for s in range(1, 5)]
    assert hist["tokens"] == [(s, 100 + s) for s in range(1, 5)] and hist["rank_shares_1"] == [(s, 0.75) for s in range(1, 5)]
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history records of an offline W&B run, read from its .wandb file (a LevelDB-format log
    of protobuf records; wandb 0.31 ships no reader for it, its internals moved to wandb-core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))[0]).read_bytes()
    pos, block, records, buf = 7, 32768, [], b""  # after the 7-byte ":W&B" header
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            records.append(buf)
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            out.append({"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in rec.history.item})
    return out


def test_wandb_offline_run_holds_every_series_on_the_stage_step_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    pipe = _pipe(tmp_path, tensorboard=False, ray_metrics=False, wandb=WandbConfig())
    sink = WandbSink(pipe.logging.wandb, pipe, tmp_path)
    for rec in LINES:
        sink.log("sft", rec["step"], rec)
    sink.close()
    hist = _wandb_history(tmp_path)
    assert [(h["sft/step"], h["sft/loss"], h["sft/tokens"], h["sft/rank_shares_0"]) for h in hist] == [
        (s, 2.0 / s, 100 + s, 0.25) for s in range(1, 5)]


class _Broken:
    name = "logging.broken"

    def log(self, stage, step, rec):
        raise OSError("disk full")

    def close(self):
        pass


def test_a_failing_logger_is_dropped_with_a_warning_and_the_others_keep_logging(tmp_path, caplog):
    tb = TensorBoardSink(tmp_path)
    loggers = Loggers([_Broken(), tb])
    for rec in LINES:
        loggers.log("sft", rec)
    loggers.close()
    assert [s for s in loggers.sinks] == []
    assert sum("logging.broken failed (OSError: disk full)" in r.message for r in caplog.records) == 1
    assert [s for s, _ in tensorboard_series(tmp_path / "sft")["loss"]] == [1, 2, 3, 4]


def test_an_enabled_logger_whose_package_is_missing_fails_the_run_naming_its_field(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    pipe = _pipe(tmp_path, ray_metrics=False, mlflow=MLflowConfig())
    with pytest.raises(ValueError, match=r"logging\.mlflow is on but mlflow .* is not importable"):
        build(pipe.logging, pipe, tmp_path, {"sft": "sft"})


def test_ray_metrics_of_a_ppo_line_carry_its_values_with_stage_role_and_phase_tags():
    rec = {"step": 2, "reward": 0.5, "kl": 0.1, "entropy": 1.2, "policy_loss": -0.2, "value_loss": 0.3,
           "generate_s": 4.0, "experience_s": 1.0, "train_s": 2.0, "sync_s": 0.5, "sync_max_gap": 1e-6,
           "samples": 16, "response_length": 10.0, "iteration_s": 8.0}
    got = {(m, tuple(sorted(t.items()))): v for m, v, t in points("ppo", rec)}
    pol, cri, ro = (("rank", "all"), ("role", "policy")), (("rank", "all"), ("role", "critic")), (("rank", "all"), ("role", "rollout"))
    assert got[("rayllm_loss", pol)] == -0.2 and got[("rayllm_loss", cri)] == 0.3
    assert got[("rayllm_reward", pol)] == 0.5 and got[("rayllm_kl", pol)] == 0.1 and got[("rayllm_entropy", pol)] == 1.2
    assert got[("rayllm_weight_sync_seconds", ro)] == 0.5 and got[("rayllm_weight_sync_gap", ro)] == 1e-6
    assert got[("rayllm_samples_per_second", ro)] == 2.0 and got[("rayllm_tokens_per_second", ro)] == 20.0
    assert {dict(t)["phase"]: v for (m, t), v in got.items() if m == "rayllm_phase_seconds"} == {
        "generate": 4.0, "experience": 1.0, "train": 2.0, "sync": 0.5}


def test_ray_metrics_of_sft_lines_hold_throughput_per_rank_shares_and_data_counts():
    got = points("sft", {"step": 3, "loss": 1.5, "tokens": 300, "step_time_s": 0.5, "sample_ids": [1, 2, 3, 4],
                         "world_size": 2, "rank_shares": [0.4, 0.6]})
    by = {(m, t["rank"]): v for m, v, t in got}
    assert by[("rayllm_tokens_per_second", "all")] == 600 and by[("rayllm_samples_per_second", "all")] == 8
    assert by[("rayllm_rank_share", "0")] == 0.4 and by[("rayllm_rank_share", "1")] == 0.6
    assert by[("rayllm_group_size", "all")] == 2 and by[("rayllm_loss", "all")] == 1.5
    data = points("sft", {"step": 0, "data_kept": 90, "data_exact_duplicate": 6, "data_quarantined": 4})
    assert {t["status"]: v for m, v, t in data if m == "rayllm_data_records"} == {
        "kept": 90, "exact_duplicate": 6, "quarantined": 4}


def test_elastic_events_count_by_kind_and_set_the_group_size():
    lost = event_points({"event": "fault", "kind": "death", "group": "sft/policy", "rank": 1, "world_size_after": 1})
    assert lost == [("rayllm_elastic_events", 1.0, {"role": "policy", "rank": "all", "kind": "lost"}),
                    ("rayllm_group_size", 1.0, {"role": "policy", "rank": "all"})]
    assert event_points({"event": "join", "group": "ppo/critic", "members": [3]})[0][2]["kind"] == "joined"
    assert event_points({"event": "leave", "group": "rollout", "rank": 0})[0][2]["kind"] == "left"


def test_the_quiet_console_shows_rayllm_lines_and_logs_everything_else(tmp_path):
    """Python prints, raw writes to fds 1 and 2, a child process and a library's warning go to the
    log file; rayllm's lines and warnings reach the terminal (here: the pipes) and the log."""
    script = textwrap.dedent(f"""
        import logging, os, subprocess, warnings
        from rayllm import console
        with console.quiet({str(tmp_path / "run.log")!r}):
            print("a library's notice")
            os.write(2, b"a C++ warning\\n")
            subprocess.run(["echo", "a subprocess line"])
            warnings.warn("a deprecation notice")
            console.say("[rayllm] sft: starting")
            logging.getLogger("rayllm.group").warning("rank 1 lost")
        print("after")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    term = p.stdout + p.stderr
    log = (tmp_path / "run.log").read_text()
    for noise in ("a library's notice", "a C++ warning", "a subprocess line", "a deprecation notice"):
        assert noise not in term and noise in log
    for line in ("[rayllm] sft: starting", "[rayllm] WARNING: rank 1 lost", f"[rayllm] log: {tmp_path / 'run.log'}"):
        assert line in term and line in log
    assert "after" in p.stdout  # the terminal is back after the block


def test_rayllm_console_lines_mask_secret_environment_values(monkeypatch, capsys):
    from rayllm import console

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "hunter2-and-more")
    console.say("[rayllm] sft: data: {'source': 'x', 'note': 'hunter2-and-more'} key",
                "0123456789abcdef0123456789abcdef01234567")
    out = capsys.readouterr().out
    assert "hunter2" not in out and "0123456789abcdef" not in out and out.count("***") == 2


def test_the_config_turns_on_wandb_and_mlflow_beside_tensorboard_and_each_gets_every_line(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    pipe = _pipe(tmp_path, ray_metrics=False, wandb=WandbConfig(project="p"), mlflow=MLflowConfig(experiment="e"))
    loggers = build(pipe.logging, pipe, tmp_path, {"sft": "sft"})
    assert [s.name for s in loggers.sinks] == ["logging.tensorboard", "logging.wandb", "logging.mlflow"]
    run_id = loggers.sinks[2].run_id
    for rec in LINES:
        loggers.log("sft", rec)
    loggers.close()
    assert [s for s, _ in tensorboard_series(tmp_path / "tensorboard" / "sft")["loss"]] == [1, 2, 3, 4]
    assert [h["sft/step"] for h in _wandb_history(tmp_path)] == [1, 2, 3, 4]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run_id, "sft/loss")] == [1, 2, 3, 4]
