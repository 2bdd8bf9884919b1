"""Experiment loggers: every metrics.jsonl line of a pipeline run also goes to TensorBoard (on by
default), W&B and MLflow (enabled by config), and Ray's metrics (rayllm/ray_metrics.py).

`StageLog` (rayllm/trainer/loop.py) is the one place a stage's lines pass; while a pipeline runs
(`open_loggers`) it hands each line to the loggers here, so every sink holds the values of
metrics.jsonl under the same stage and step. A logger that cannot start fails the run before any
stage, naming its config field; one that fails mid-run is reported once and dropped: the
training goes on and metrics.jsonl keeps every value.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Protocol

from rayllm.config import LoggingConfig, Pipeline
from rayllm.redact import redact

log = logging.getLogger("rayllm")

_NOT_SERIES = ("step", "epoch", "stage", "iteration")


def scalars(rec: dict) -> dict[str, float]:
    """The record's series: numbers (not bools) by key, and per-rank lists (`rank_*`) as `key_i`."""
    out = {}
    for k, v in rec.items():
        if k in _NOT_SERIES:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif k.startswith("rank_") and isinstance(v, list):
            out.update({f"{k}_{i}": float(x) for i, x in enumerate(v) if isinstance(x, (int, float))})
    return out


class Sink(Protocol):
    name: str

    def resume(self, stage: str, step: int) -> None:
        """The stage restarts after `step`: its later values will be written again."""

    def log(self, stage: str, step: int, rec: dict) -> None: ...

    def event(self, stage: str, ev: dict) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """One event directory per stage (RUN_DIR/tensorboard/<stage>), a scalar per metric."""

    name = "logging.tensorboard"

    def __init__(self, root: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self._writer_cls, self.root, self.writers = SummaryWriter, Path(root), {}
        self._purge: dict[str, int] = {}

    def _writer(self, stage: str):
        if stage not in self.writers:
            # purge_step: a resumed stage's steps after its checkpoint replace the ones written before.
            self.writers[stage] = self._writer_cls(str(self.root / stage), flush_secs=10,
                                                   purge_step=self._purge.pop(stage, None))
        return self.writers[stage]

    def resume(self, stage: str, step: int) -> None:
        if stage in self.writers:
            self.writers.pop(stage).close()
        self._purge[stage] = step + 1

    def log(self, stage: str, step: int, rec: dict) -> None:
        w = self._writer(stage)
        for k, v in scalars(rec).items():
            w.add_scalar(k, v, step)

    def event(self, stage: str, ev: dict) -> None:
        self._writer(stage).add_text(f"events/{ev.get('event', 'event')}", _event_line(ev), ev.get("step") or 0)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class WandbSink:
    """A W&B run per pipeline; each stage's metrics as `<stage>/<metric>` on that stage's own step
    axis (`<stage>/step`), so stages never fight over W&B's single global step."""

    name = "logging.wandb"

    def __init__(self, cfg, pipe: Pipeline, run_dir: Path):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir),
                              name=pipe.name, tags=cfg.tags, config=redact(pipe.model_dump(mode="json")),
                              reinit="create_new")
        self._defined: set[str] = set()

    def resume(self, stage: str, step: int) -> None:
        pass  # W&B's history is append-only; a resumed stage's steps reappear with their step value

    def log(self, stage: str, step: int, rec: dict) -> None:
        if stage not in self._defined:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._defined.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in scalars(rec).items()}})

    def event(self, stage: str, ev: dict) -> None:
        pass  # events are in metrics.jsonl and the report; W&B has no event stream worth the noise

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    """An MLflow run per pipeline: `<stage>/<metric>` at the stage's step, the config as an artifact."""

    name = "logging.mlflow"

    def __init__(self, cfg, pipe: Pipeline, run_dir: Path):
        from mlflow.tracking import MlflowClient

        # MLflow 3 refuses its file store by default ("maintenance mode"); SQLite is its local store.
        uri = cfg.tracking_uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=pipe.name).info.run_id
        self.client.log_dict(self.run_id, redact(pipe.model_dump(mode="json")), "pipeline.json")

    def resume(self, stage: str, step: int) -> None:
        pass  # MLflow keeps every value; a step logged twice shows its latest

    def log(self, stage: str, step: int, rec: dict) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(f"{stage}/{k}", v, now, step) for k, v in scalars(rec).items()])

    def event(self, stage: str, ev: dict) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _event_line(ev: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in redact(ev).items())


class Loggers:
    """The sinks of one pipeline run. A sink that raises is dropped with one warning."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    def _each(self, method: str, *args) -> None:
        for s in list(self.sinks):
            try:
                getattr(s, method)(*args)
            except Exception as e:  # noqa: BLE001 - a logger never stops a training run
                log.warning("rayllm: %s failed (%s: %s); it is off for the rest of the run, metrics.jsonl "
                            "has every value", s.name, type(e).__name__, e)
                self.sinks.remove(s)

    def resume(self, stage: str, step: int) -> None:
        self._each("resume", stage, step)

    def log(self, stage: str, rec: dict) -> None:
        if "step" in rec:
            self._each("log", stage, int(rec["step"]), rec)

    def event(self, stage: str, ev: dict) -> None:
        self._each("event", stage, ev)

    def stage_done(self) -> None:
        for s in self.sinks:
            if hasattr(s, "flush"):
                s.flush()

    def close(self) -> None:
        for s in self.sinks:
            with contextlib.suppress(Exception):
                s.close()
        self.sinks.clear()


_ACTIVE: Loggers | None = None


def active() -> Loggers | None:
    """The loggers of the pipeline run in progress in this process (None outside one)."""
    return _ACTIVE


def build(cfg: LoggingConfig, pipe: Pipeline, run_dir: Path, stage_kinds: dict[str, str]) -> Loggers:
    """Start every enabled logger; a logger that cannot start raises ValueError naming its field."""
    sinks, specs = [], []
    if cfg.tensorboard:
        specs.append(("logging.tensorboard", "tensorboard", lambda: TensorBoardSink(run_dir / "tensorboard")))
    if cfg.ray_metrics:
        from rayllm.ray_metrics import RayMetricsSink

        specs.append(("logging.ray_metrics", "ray", lambda: RayMetricsSink(stage_kinds)))
    if cfg.wandb is not None:
        specs.append(("logging.wandb", 'wandb (pip install "rayllm[loggers]")', lambda: WandbSink(cfg.wandb, pipe, run_dir)))
    if cfg.mlflow is not None:
        specs.append(("logging.mlflow", 'mlflow (pip install "rayllm[loggers]")', lambda: MLflowSink(cfg.mlflow, pipe, run_dir)))
    for field, package, make in specs:
        try:
            sinks.append(make())
        except ImportError as e:
            for s in sinks:
                s.close()
            raise ValueError(f"{field} is on but {package} is not importable: {e}") from e
        except Exception as e:
            for s in sinks:
                s.close()
            raise ValueError(f"{field} could not start: {type(e).__name__}: {e}") from e
    return Loggers(sinks)


@contextlib.contextmanager
def open_loggers(pipe: Pipeline, run_dir: Path) -> Iterator[Loggers]:
    """The pipeline's loggers, active for StageLog while the block runs, closed after it."""
    global _ACTIVE
    loggers = build(pipe.logging, pipe, run_dir, {s.name: s.kind for s in pipe.stages})
    _ACTIVE = loggers
    try:
        yield loggers
    finally:
        _ACTIVE = None
        loggers.close()
