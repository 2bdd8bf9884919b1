"""A transformers TrainerCallback that stamps wall and CPU time at the start of training and at
the end of every optimizer step, and keeps one logged metric: the timing of both TRL baselines
(bench/_trl_ppo.py in TRL 1.12's venv, bench/_trl_grpo.py in the project's). It imports only
transformers, so it runs in either venv."""
from __future__ import annotations

import time

from transformers import TrainerCallback


class Stamps(TrainerCallback):
    def __init__(self, metric: str):
        self.metric = metric
        self.t: list[float] = []  # perf_counter at train begin and at each step end
        self.cpu: list[float] = []  # CPU seconds of this process, all its threads, at the same points
        self.logged: list[float] = []  # each logged value of `metric`, in order

    def _stamp(self) -> None:
        self.t.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_begin(self, args, state, control, **kw):
        self._stamp()

    def on_step_end(self, args, state, control, **kw):
        self._stamp()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and self.metric in logs:
            self.logged.append(logs[self.metric])


def train(trainer, out_dir: str, gc_freeze: bool) -> None:
    """trainer.train(), with the import-time heap frozen first if asked (TRL's gc.collect() calls then
    scan only new objects: the kinder baseline), and its output dir removed after."""
    import gc
    import shutil

    if gc_freeze:
        gc.collect()
        gc.freeze()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
