"""The Ray Train v2 arm of bench/elastic.py: how long Ray Train takes to get back to training after
one worker process is really killed.

A `TorchTrainer` (DDP over gloo, 2 CPU workers) trains the tiny model rayllm uses on one fixed global
batch. Every step is reported with `ray.train.report`, with a checkpoint (model + optimizer state) every
`checkpoint_every` steps. A driver thread waits until step `kill_step` is done, then sends SIGKILL to
rank 1's process from outside it; `FailureConfig(max_failures=...)` makes Ray Train tear down the worker
group, start a new one and resume from the latest reported checkpoint.

Why it is a fair baseline: it is the documented Ray Train recipe (report + checkpoint + get_checkpoint +
FailureConfig), the step is the same as rayllm's (summed masked next-token NLL over the global count of
target tokens, AdamW betas (0.9, 0.95), eps 1e-8, no weight decay, grad clip 1.0, a 2-rank update equal
to a 1-rank step on the whole batch), and the fault is the same: a real signal to a rank's process.
One knob is tuned: Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
default) and takes one report per worker per poll, which would cap a step-per-report loop at 2 s a step
and delay noticing the dead worker by up to 2 s; `poll_s` (0.05 s) removes both handicaps.

Measured: wall time of `fit()`, kill -> the first completed step past the last one done before the kill
(detection, teardown, new workers, process group, checkpoint load and the steps redone since the
checkpoint), restarts, and the loss of every finally committed step (read from a per-step log rank 0
writes under `storage`, so step times are known across restarts).

    python bench/_raytrain_elastic.py     # a fault-free arm and a kill arm; prints both dicts
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def _train_loop(cfg: dict) -> None:
    """One Ray Train worker. Self-contained (torch + transformers only) so it is pickled by value."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = Path(cfg["run_dir"])
    starts = run / f"starts_rank{rank}.jsonl"
    attempt = len(starts.read_text().splitlines()) if starts.exists() else 0
    with starts.open("a") as f:
        f.write(json.dumps({"attempt": attempt, "pid": os.getpid(), "t": time.time()}) + "\n")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32, local_files_only=True,
                                                 use_safetensors=True)
    pad_id = model.config.pad_token_id or 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    start = 1
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU)

    rows = cfg["rows"]
    count = sum(sum(r["loss_mask"][1:]) for r in rows)  # global target tokens
    per = -(-len(rows) // world)
    mine = rows[rank * per:(rank + 1) * per]
    T = max(len(r["input_ids"]) for r in mine)
    ids = torch.full((len(mine), T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(mine):
        n = len(r["input_ids"])
        ids[i, :n], attn[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["loss_mask"])
    tmask = mask[:, 1:].float()

    for step in range(start, cfg["steps"] + 1):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll.view_as(tmask) * tmask).sum() / count  # this rank's share of the global token mean
        opt.zero_grad(set_to_none=True)
        (loss * world).backward()  # DDP averages over ranks: x world makes it the global sum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        metrics = {"step": step, "loss": total.item(), "attempt": attempt}
        if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step},
                               Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        else:
            ray.train.report(metrics)
        if rank == 0:
            with (run / "steps.jsonl").open("a") as f:
                f.write(json.dumps({**metrics, "t": time.time()}) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: the driver may read while a worker is appending."""
    return [json.loads(x) for x in path.read_text().split("\n")[:-1] if x.strip()] if path.exists() else []


def _killer(run: Path, kill_step: int, out: dict, done: threading.Event) -> None:
    """Driver thread: once step `kill_step` is logged, SIGKILL rank 1's current process."""
    while not done.is_set():
        if any(r["step"] >= kill_step for r in _read_jsonl(run / "steps.jsonl")):
            pid = _read_jsonl(run / "starts_rank1.jsonl")[-1]["pid"]
            out["last_step_before"] = max(r["step"] for r in _read_jsonl(run / "steps.jsonl"))
            os.kill(pid, signal.SIGKILL)
            out["t"] = time.time()
            return
        time.sleep(0.01)


def run_raytrain_arm(model_path: str, rows: list[dict], steps: int, kill_step: int | None,
                     checkpoint_every: int, lr: float, storage: str, cpus_per_worker: float = 0.5,
                     poll_s: float | None = 0.05) -> dict:
    """`poll_s` sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2.0 when None). Ray Train's controller
    drains each worker's one-slot report queue once per poll, so with a report every step a step takes at
    least `poll_s`; the same poll is how soon a dead worker is noticed."""
    import ray
    import ray.cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=384 * 1024**2, include_dashboard=False, log_to_driver=False)
    if __name__ != "__main__":  # workers cannot import bench/: ship this module's code with the function
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    name = f"raytrain-{uuid.uuid4().hex[:8]}"
    run = Path(storage) / name
    run.mkdir(parents=True)
    cfg = {"model_path": str(model_path), "rows": rows, "steps": steps, "checkpoint_every": checkpoint_every,
           "lr": lr, "run_dir": str(run)}
    trainer = TorchTrainer(
        _train_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(storage_path=str(storage), name=name, failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    kill, done = {}, threading.Event()
    thread = threading.Thread(target=_killer, args=(run, kill_step, kill, done), daemon=True) if kill_step else None
    env = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by the controller, which fit() starts with our env
    old = os.environ.get(env)
    if poll_s is not None:
        os.environ[env] = str(poll_s)
    t0 = time.time()
    if thread:
        thread.start()
    try:
        trainer.fit()
    finally:
        done.set()
        if old is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = old
    wall = time.time() - t0

    log = _read_jsonl(run / "steps.jsonl")
    final = {r["step"]: r["loss"] for r in log}  # the last record of a step is the committed one
    out = {"raytrain_steps": len(final), "raytrain_wall_s": round(wall, 2),
           "raytrain_kill_to_next_step_s": None, "raytrain_restarts": None, "raytrain_kill_to_worker_start_s": None,
           "raytrain_final_loss": final[max(final)], "raytrain_losses": [final[s] for s in sorted(final)]}
    if kill_step:
        if "t" not in kill:
            raise RuntimeError(f"the run ended before step {kill_step}: no worker was killed")
        nxt = min(r["t"] for r in log if r["t"] > kill["t"] and r["step"] > kill["last_step_before"])
        restarts = _read_jsonl(run / "starts_rank1.jsonl")
        out["raytrain_kill_to_next_step_s"] = round(nxt - kill["t"], 2)
        out["raytrain_restarts"] = len(restarts) - 1
        back = min(r["t"] for r in restarts if r["t"] > kill["t"])  # the new rank 1 entered the train function
        out["raytrain_kill_to_worker_start_s"] = round(back - kill["t"], 2)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import random

    from rayllm.models import tiny_model_path

    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(10, 200) for _ in range(64)], "loss_mask": [0] * 16 + [1] * 48}
            for _ in range(8)]
    path = str(tiny_model_path("tiny-1m"))
    with tempfile.TemporaryDirectory() as storage:
        for kill_step in (None, 8):
            t = time.time()
            res = run_raytrain_arm(path, rows, steps=20, kill_step=kill_step, checkpoint_every=5, lr=1e-3,
                                   storage=storage)
            print(json.dumps({"kill_step": kill_step, "arm_s": round(time.time() - t, 1), **res}), flush=True)
