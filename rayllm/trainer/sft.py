"""SFT stage: train a causal LM on a ModelGroup, evaluate on a held-out split, write an HF model.

Resumable: with `train.checkpoint_every` set, DeepSpeed checkpoints land in
<stage dir>/checkpoints, and a rerun continues after the last one at the same step and data
position (the rows of each step are a pure function of the seed; rayllm.trainer.sft_data).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from rayllm.config import SFT
from rayllm.group import ModelGroup
from rayllm.group.model_group import total_steps
from rayllm.io import append_jsonl
from rayllm.trainer.checkpoints import resume_state
from rayllm.models import load_tokenizer, resolve_model
from rayllm.trainer.sft_data import load_sft_data


def run_sft(stage: SFT, out_dir: Path, seed: int = 0, metrics_path: Path | None = None,
            progress: bool = True) -> dict:
    """Returns the stage summary; the trained model is at <out_dir>/model."""
    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_path or out_dir / "metrics.jsonl"
    model_path, tok_path = resolve_model(stage.model)
    tok = load_tokenizer(tok_path)
    say = print if progress else (lambda *a, **k: None)

    train, held, data_info = load_sft_data(stage, out_dir, str(tok_path), seed, say)
    G = stage.train.global_batch_size
    if len(train) < G:
        raise ValueError(f"{stage.name}: {len(train)} training rows, fewer than train.global_batch_size={G}")
    say(f"[rayllm] {stage.name}: {len(train)} training {'packed ' if stage.data.packing else ''}rows, "
        f"{len(held)} held-out rows; data: {data_info}", flush=True)
    n_steps = total_steps(len(train), G, stage.train.epochs, stage.train.max_steps)

    group = ModelGroup(f"{stage.name}/policy", stage.group, model_path, "causal_lm", trainable=True,
                       total_steps=n_steps, pad_id=tok.pad_token_id)
    try:
        ckpt_dir = out_dir / "checkpoints"
        state = resume_state(group, ckpt_dir, train.fingerprint, stage.name)
        step = state["step"]
        log = lambda rec: append_jsonl(metrics_path, {"stage": stage.name, **rec})  # noqa: E731
        initial_eval = group.eval_loss(held)
        if step == 0:
            log({"step": 0, "eval_loss": initial_eval})
        # In a terminal the bar redraws in place; in a log file it would write a line per step.
        bar = tqdm(total=n_steps, initial=step, desc=f"{stage.name}", disable=not progress, unit="step",
                   mininterval=0.2 if sys.stderr.isatty() else 15.0)
        while step < n_steps:
            t = time.time()
            m = group.train_step(train.batch(step))
            step += 1
            epoch = (step - 1) // train.steps_per_epoch
            rec = {"step": step, "epoch": epoch, "step_time_s": time.time() - t, **m}
            if stage.train.eval_every and step % stage.train.eval_every == 0 and step < n_steps:
                rec["eval_loss"] = group.eval_loss(held)
            log(rec)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
            bar.update(1)
            if stage.train.checkpoint_every and step % stage.train.checkpoint_every == 0:
                # The data position is the step: the rows of step s are a function of (seed, s).
                group.save_checkpoint(ckpt_dir, step, {"data": train.fingerprint,
                                                       "rows_consumed": step * G})
        bar.close()
        final_eval = group.eval_loss(held)
        log({"step": step, "eval_loss": final_eval})
        group.save_hf(out_dir / "model")
    finally:
        group.shutdown()
    return {
        "stage": stage.name,
        "model": str(out_dir / "model"),
        "steps": n_steps,
        "train_rows": len(train),
        "eval_rows": len(held),
        "packing": stage.data.packing,
        **data_info,
        "eval_loss_initial": initial_eval,
        "eval_loss_final": final_eval,
        "num_ranks": stage.group.num_ranks,
        "zero_stage": stage.group.zero_stage,
        "wall_time_s": time.time() - t_start,
    }
