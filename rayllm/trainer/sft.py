"""SFT stage: train a causal LM on a ModelGroup, evaluate on a held-out split, write an HF model.

Resumable: with `train.checkpoint_every` set, DeepSpeed checkpoints land in
<stage dir>/checkpoints, and a rerun continues after the last one at the same step and data
position (the rows of each step are a pure function of the seed; rayllm.trainer.sft_data).
"""
from __future__ import annotations

import time
from pathlib import Path

from rayllm import console
from rayllm.config import SFT
from rayllm.group import ModelGroup
from rayllm.group.model_group import total_steps
from rayllm.ray_metrics import DATA_STATUSES
from rayllm.trainer.checkpoints import resume_state
from rayllm.trainer.loop import Ledger, StageLog, run_steps
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
    say = console.say if progress else (lambda *a, **k: None)

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
        log = StageLog(stage.name, metrics_path, [group])
        log.truncate_after(step)
        initial_eval = group.eval_loss(held)
        if step == 0:
            # The data pipeline's counts, as a series the loggers and Ray metrics see (rayllm_data_records).
            log({"step": 0, "eval_loss": initial_eval,
                 **{f"data_{k}": data_info[k] for k in DATA_STATUSES if k in data_info}})
        # The data position is the step: the rows of step s are a function of (seed, s).
        run_steps(name=stage.name, n_steps=n_steps, start=step, log=log, ledger=Ledger.from_state(state),
                  step_fn=lambda s: group.train_step(train.batch(s)), batch_ids=train.batch_ids,
                  eval_every=stage.train.eval_every, eval_fn=lambda: {"eval_loss": group.eval_loss(held)},
                  checkpoint_every=stage.train.checkpoint_every,
                  checkpoint_fn=lambda s, extra: group.save_checkpoint(ckpt_dir, s, {
                      "data": train.fingerprint, "rows_consumed": s * G, **extra}, keep_last=stage.train.keep_last),
                  steps_per_epoch=train.steps_per_epoch, progress=progress,
                  postfix=lambda m: {"loss": f"{m['loss']:.3f}"})
        step = n_steps
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
