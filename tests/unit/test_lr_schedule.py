"""The LR schedule (torch's schedulers in sequence, rayllm.group.engine.lr_scheduler) gives, at
every step, the LR of the formula rayllm used to compute by hand, and resumes from its state."""
import io
import math

import pytest
import torch

from rayllm.config import OptimizerConfig
from rayllm.group.engine import lr_scheduler


def reference_factor(o: OptimizerConfig, total_steps: int, step: int) -> float:
    """rayllm's hand-written schedule before torch's schedulers replaced it (a LambdaLR factor):
    warm-up (step + 1) / (w + 1), then constant, linear or cosine to min_lr_ratio, progress
    clamped at 1."""
    if step < o.warmup_steps:
        return (step + 1) / (o.warmup_steps + 1)
    if o.scheduler == "constant":
        return 1.0
    frac = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    lo = o.min_lr_ratio
    if o.scheduler == "linear":
        return 1.0 - (1.0 - lo) * frac
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _scheduled(o: OptimizerConfig, total_steps: int):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=o.lr)
    return opt, lr_scheduler(opt, o, total_steps)


def _lrs(opt, sched, steps: int) -> list[float]:
    """The LR of each of `steps` optimizer steps (the scheduler steps after each, as in DeepSpeed)."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("total_steps", [1, 2, 3, 10, 57])
@pytest.mark.parametrize("min_lr_ratio", [0.1, 0.0])
def test_lr_at_every_step_equals_the_hand_written_formula(scheduler, warmup, total_steps, min_lr_ratio):
    o = OptimizerConfig(lr=3e-4, scheduler=scheduler, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    steps = total_steps + warmup + 5  # past the end too: the floor holds
    got = _lrs(*_scheduled(o, total_steps), steps)
    want = [o.lr * reference_factor(o, total_steps, k) for k in range(steps)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-18)


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_lr_schedule_resumes_from_its_saved_state(scheduler):
    """What DeepSpeed's checkpoints do: save the optimizer's and the scheduler's state dicts, load
    them into freshly built ones. The resumed sequence is the uninterrupted one, and the state
    loads with torch.load(weights_only=True) (plain numbers and lists, nothing to unpickle)."""
    o = OptimizerConfig(lr=1e-3, scheduler=scheduler, warmup_steps=2, min_lr_ratio=0.1)
    opt, sched = _scheduled(o, 12)
    whole = _lrs(opt, sched, 16)
    opt, sched = _scheduled(o, 12)
    head = _lrs(opt, sched, 7)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt, sched = _scheduled(o, 12)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["lr_scheduler"])
    assert head + _lrs(opt, sched, 9) == pytest.approx(whole, rel=1e-12)
