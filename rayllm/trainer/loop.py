"""What every stage loop does around its steps: metrics lines (never duplicated on resume), the
fault events of its groups, the exactly-once ledger of consumed samples, progress and
checkpoints. SFT and the reward model run their steps through `run_steps`; PPO, whose steps are
iterations over several groups, uses StageLog and Ledger directly.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rayllm import console
from rayllm.io import append_jsonl, write_text_atomic
from rayllm.loggers import active


class StageLog:
    """metrics.jsonl lines of one stage, each with {"stage": name}, and its groups' fault events."""

    def __init__(self, stage: str, path: Path, groups: list | None = None):
        self.stage, self.path, self.groups = stage, Path(path), list(groups or [])

    def truncate_after(self, step: int) -> None:
        """Drop this stage's lines past `step` (all of them at step 0): a resumed stage writes them
        again, so a crash and rerun leave each line once. Other stages' lines and fault events
        are kept."""
        if (loggers := active()) is not None:
            loggers.resume(self.stage, step)
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                dropped += 1
                continue
            # Fault events are kept: they happened, and a rerun does not write them again.
            if rec.get("stage") == self.stage and "event" not in rec and (step == 0 or rec.get("step", 0) > step):
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))

    def events(self) -> list[dict]:
        """Fault, recovery and join events of the groups since the last call, also logged."""
        out = [e for g in self.groups for e in g.take_events()]
        loggers = active()
        for e in out:
            append_jsonl(self.path, {"stage": self.stage, **e})
            if loggers is not None:
                loggers.event(self.stage, e)
            console.say(f"[rayllm] {self.stage}: {describe_event(e)}")
        return out

    def __call__(self, rec: dict) -> None:
        """Append a line, and hand it to the pipeline's loggers (rayllm/loggers.py) if any."""
        self.events()
        append_jsonl(self.path, {"stage": self.stage, **rec})
        if (loggers := active()) is not None:
            loggers.log(self.stage, rec)


def describe_event(e: dict) -> str:
    """One console line for a fault, recovery, join or leave event."""
    who = f"{e.get('group', '?')} rank {e['rank']}" if "rank" in e else str(e.get("group", "?"))
    rest = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()
                     if k in ("kind", "reason", "world_size_after", "world_size", "recover_s", "members"))
    return f"{e.get('event')} of {who}" + (f" ({rest})" if rest else "")


@dataclass
class Ledger:
    """The sample ids each committed step consumed, in order: written to metrics.jsonl with each
    step ("sample_ids") and into each checkpoint's client state ("ledger", in rayllm.json, which
    is written before `latest`), and restored from it on resume."""

    steps: list[list[int]] = field(default_factory=list)

    def add(self, ids) -> None:
        self.steps.append([int(i) for i in ids])

    def consumed(self) -> list[int]:
        return [i for s in self.steps for i in s]

    @classmethod
    def from_state(cls, state: dict) -> "Ledger":
        return cls([list(s) for s in state.get("ledger", [])])


def run_steps(*, name: str, n_steps: int, start: int, log: StageLog, ledger: Ledger, step_fn: Callable[[int], dict],
              batch_ids: Callable[[int], list[int]], eval_every: int, eval_fn: Callable[[], dict],
              checkpoint_every: int, checkpoint_fn: Callable[[int, dict], object], steps_per_epoch: int,
              postfix: Callable[[dict], dict], progress: bool) -> None:
    """Steps start+1 .. n_steps: step_fn(step index) trains one global batch (retried by its group
    after a fault) and returns its metrics; every eval_every steps eval_fn adds to them; every
    checkpoint_every steps checkpoint_fn(step, {"ledger": ...}) writes a checkpoint with the ledger
    in its client state."""
    # In a terminal the bar redraws in place; in a log file it would write a line per step.
    bar = console.bar(total=n_steps, initial=start, desc=name, disable=not progress, unit="step")
    step = start
    while step < n_steps:
        t = time.time()
        m = step_fn(step)
        ids = batch_ids(step)
        step += 1
        ledger.add(ids)
        rec = {"step": step, "epoch": (step - 1) // steps_per_epoch, "step_time_s": time.time() - t, **m,
               "sample_ids": ledger.steps[-1]}
        if eval_every and step % eval_every == 0 and step < n_steps:
            rec.update(eval_fn())
        log(rec)
        bar.set_postfix(**postfix(m), refresh=False)  # drawn by update(), at its own interval
        bar.update(1)
        if checkpoint_every and step % checkpoint_every == 0:
            checkpoint_fn(step, {"ledger": ledger.steps})
    bar.close()
    log.events()
