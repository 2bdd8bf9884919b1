"""Reward-model stage: a scalar head trained with the pairwise Bradley-Terry loss on a ModelGroup,
held-out pairwise accuracy before, during and after, and a Hugging Face sequence-classification
model written to <out_dir>/model.

Resumable like SFT: with `train.checkpoint_every` set, DeepSpeed checkpoints land in
<out_dir>/checkpoints and a rerun continues after the last one; the pairs of each step are a
pure function of (seed, step), so it continues at the same data position.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from rayllm import console
from rayllm.algorithms import pairwise_accuracy, pairwise_loss
from rayllm.config import RewardModel
from rayllm.datasets import tasks
from rayllm.datasets.preference import (
    flatten_pairs,
    load_pairs,
    pair_is_informative,
    split_pairs,
    tokenize_pair,
)
from rayllm.group import ModelGroup
from rayllm.group.model_group import total_steps
from rayllm.io import write_json_atomic
from rayllm.trainer.checkpoints import resume_state
from rayllm.trainer.loop import Ledger, StageLog, run_steps
from rayllm.models import load_tokenizer, resolve_model, value_model_from
from rayllm.trainer.sft_data import epoch_order


class PairBatches:
    """Tokenized training pairs and the pairs of each step: a shuffle per epoch seeded by
    (seed, epoch), so step s always gets the same pairs."""

    def __init__(self, pairs: list[tuple[dict, dict]], global_batch: int, seed: int):
        self.pairs, self.global_batch, self.seed = pairs, global_batch, seed

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch

    def batch_ids(self, step: int) -> list[int]:
        """Indices of the pairs of step `step` (the ledger's ids)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        G = self.global_batch
        return epoch_order(len(self.pairs), self.seed, epoch)[k * G: (k + 1) * G]

    def batch(self, step: int) -> list[dict]:
        """Rows [chosen_0, rejected_0, chosen_1, ...] of `global_batch` pairs."""
        return flatten_pairs([self.pairs[i] for i in self.batch_ids(step)])

    @property
    def fingerprint(self) -> str:
        ids = [[c["input_ids"], r["input_ids"]] for c, r in self.pairs]
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _is_sequence_classifier(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])


def reward_init_model(stage: RewardModel, out_dir: Path, seed: int, artifacts: dict[str, str]) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) the stage starts from: `stage.model`, or the previous SFT
    stage's model; a causal LM gets a fresh scalar head (seeded) under <out_dir>/init."""
    if stage.model is not None:
        model_path, tok_path = resolve_model(stage.model, kind="reward")
        if stage.model.path is not None and not _is_sequence_classifier(model_path):
            # A causal LM: every rank would draw its own random head; build one head here.
            model_path = value_model_from(model_path, out_dir / "init", seed)
        return model_path, tok_path
    sft = artifacts.get("sft")
    if not sft:
        raise ValueError(f"reward stage {stage.name!r}: a reward stage needs an earlier SFT stage (whose model it "
                         "starts from) or `model.path` (a Hugging Face model directory)")
    model_path = value_model_from(sft, out_dir / "init", seed)
    return model_path, model_path


def policy_pairs(stage: RewardModel, pairs: list[dict], artifacts: dict[str, str], tok, out_dir: Path,
                 say=print, seed: int = 0) -> tuple[list[dict], dict]:
    """`stage.policy_samples`: the starting policy's own wrong answers as rejected responses
    (see PolicySamplesConfig). The pairs are written to <out_dir>/policy_pairs.jsonl once, so a
    resumed stage trains on the same pairs without sampling again."""
    from rayllm.datasets.prompts import encode_prompt
    from rayllm.datasets.preference import pairs_from_samples
    from rayllm.io import read_jsonl, write_jsonl_atomic
    from rayllm.rollout import RolloutPool

    ps = stage.policy_samples
    cache, meta_path = out_dir / "policy_pairs.jsonl", out_dir / "policy_pairs.json"
    key = hashlib.sha256((ps.model_dump_json() + stage.data.model_dump_json() + json.dumps(artifacts, sort_keys=True)
                          + (stage.model.model_dump_json() if stage.model else "") + f"seed={seed}").encode()).hexdigest()[:16]
    if cache.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.pop("key", None) == key:
            return read_jsonl(cache), meta
    score = tasks.scorer(stage.data.source, ps.score_fn, "policy_samples.score_fn")
    if score is None:
        raise ValueError(f"{stage.name}: policy_samples needs a checker: set policy_samples.score_fn, or use a "
                         f"bundled task with one ({sorted(tasks.SCORERS)})")
    given = resolve_model(stage.model, kind="causal_lm")[0] if stage.model is not None and stage.model.path else None
    latest = artifacts.get("ppo") or artifacts.get("sft")  # iterated RLHF samples the PPO policy
    if given is not None and not _is_sequence_classifier(given):
        policy = given
    elif latest:
        policy = Path(latest)
    else:
        raise ValueError(f"{stage.name}: policy_samples needs a policy to sample: an earlier SFT or PPO stage, or "
                         "`model.path` pointing at a causal LM")
    t = time.time()
    recs = pairs[: ps.num_prompts]
    prompts = [encode_prompt(tok, r["prompt"]) for r in recs]
    pool = RolloutPool(ps.rollout, policy, name=f"{stage.name}/samples")
    try:
        samples = pool.generate(prompts, ps.rollout.sampling, key=(seed,))  # the pipeline seed's own streams
    finally:
        pool.shutdown()
    texts: list[list[str]] = [[] for _ in recs]
    for x in sorted(samples, key=lambda x: (x.prompt_index, x.sample_index)):
        texts[x.prompt_index].append(tok.decode(x.response_ids, skip_special_tokens=True))
    out, meta = pairs_from_samples(recs, texts, score, ps.max_pairs_per_prompt)
    meta["policy_samples_s"] = time.time() - t
    say(f"[rayllm] {stage.name}: sampled {len(samples)} responses from {policy} in {meta['policy_samples_s']:.0f} s; "
        f"the checker passed {meta['policy_sample_accuracy']:.1%}; {len(out)} on-policy pairs", flush=True)
    write_jsonl_atomic(cache, out)
    write_json_atomic(meta_path, {**meta, "key": key})
    return out, meta


def evaluate(group: ModelGroup, held: list[tuple[dict, dict]], origins: list[str] | None = None) -> dict:
    """Held-out pairwise accuracy (ties count as wrong), mean margin score(chosen) - score(rejected),
    and the mean Bradley-Terry loss, from the group's scores of the rows; with `origins`, also
    the accuracy of the on-policy pairs ("policy") alone."""
    scores = torch.tensor(group.scores(flatten_pairs(held)), dtype=torch.float64)
    chosen, rejected = scores[0::2], scores[1::2]
    out = {
        "eval_accuracy": pairwise_accuracy(chosen, rejected),
        "eval_margin": float((chosen - rejected).mean()),
        "eval_loss": float(pairwise_loss(chosen, rejected).mean()),
    }
    if origins and "policy" in origins:
        idx = torch.tensor([o == "policy" for o in origins])
        out["eval_accuracy_policy_pairs"] = pairwise_accuracy(chosen[idx], rejected[idx])
    return out


def run_reward(stage: RewardModel, out_dir: Path, seed: int = 0, artifacts: dict[str, str] | None = None,
               metrics_path: Path | None = None, progress: bool = True) -> dict:
    """Returns the stage summary; the trained reward model is at <out_dir>/model.

    `artifacts` maps earlier stage kinds to their outputs; "sft" is the model directory a reward
    model starts from when `stage.model` is unset.
    """
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_path or out_dir / "metrics.jsonl"
    say = console.say if progress else (lambda *a, **k: None)
    model_path, tok_path = reward_init_model(stage, out_dir, seed, artifacts or {})
    tok = load_tokenizer(tok_path)

    d = stage.data
    pairs = load_pairs(d, seed)
    sampled = {}
    if stage.policy_samples is not None:
        extra, sampled = policy_pairs(stage, pairs, artifacts or {}, tok, out_dir, say, seed)
        pairs = pairs + extra
    train_pairs, held_pairs = split_pairs(pairs, d.eval_fraction, seed)
    tokenized = [tokenize_pair(tok, p, d.max_length) for p in train_pairs]
    train_rows = [t for t in tokenized if pair_is_informative(*t)]
    held_tok = [(tokenize_pair(tok, p, d.max_length), p.get("origin", "data")) for p in held_pairs]
    held_tok = [(t, o) for t, o in held_tok if pair_is_informative(*t)]
    held, origins = [t for t, _ in held_tok], [o for _, o in held_tok]
    dropped = len(tokenized) - len(train_rows)
    G = stage.train.global_batch_size
    if len(train_rows) < G:
        raise ValueError(f"{stage.name}: {len(train_rows)} training pairs, fewer than train.global_batch_size={G}")
    if not held:
        raise ValueError(f"{stage.name}: no held-out pair left to evaluate on (after dropping pairs whose "
                         f"rows are identical within data.max_length={d.max_length})")
    train = PairBatches(train_rows, G, seed)
    say(f"[rayllm] {stage.name}: {len(train)} training pairs, {len(held)} held-out pairs"
        + (f", {dropped} dropped (identical after truncation to {d.max_length} tokens)" if dropped else ""),
        flush=True)
    n_steps = total_steps(len(train), G, stage.train.epochs, stage.train.max_steps)

    group = ModelGroup(f"{stage.name}/reward", stage.group, model_path, kind="reward", trainable=True,
                       total_steps=n_steps, pad_id=tok.pad_token_id)
    try:
        ckpt_dir = out_dir / "checkpoints"
        state = resume_state(group, ckpt_dir, train.fingerprint, stage.name)
        step = state["step"]
        log = StageLog(stage.name, metrics_path, [group])
        log.truncate_after(step)
        if step == 0 or "eval_accuracy_initial" not in state:
            initial = evaluate(group, held, origins)
            if step == 0:
                log({"step": 0, **initial})
            initial_accuracy = initial["eval_accuracy"]
        else:  # resumed: the accuracy of the model the run started from, not of the checkpoint
            initial_accuracy = state["eval_accuracy_initial"]

        def train_one(s: int) -> dict:
            m = group.train_step(train.batch(s), loss="pairwise", global_count=G, margin=stage.margin)
            m["pairs"] = m.pop("tokens")  # the pairwise loss counts pairs
            return m

        run_steps(name=stage.name, n_steps=n_steps, start=step, log=log, ledger=Ledger.from_state(state),
                  step_fn=train_one, batch_ids=train.batch_ids, eval_every=stage.train.eval_every,
                  eval_fn=lambda: evaluate(group, held, origins), checkpoint_every=stage.train.checkpoint_every,
                  checkpoint_fn=lambda s, extra: group.save_checkpoint(ckpt_dir, s, {
                      "data": train.fingerprint, "pairs_consumed": s * G, "eval_accuracy_initial": initial_accuracy,
                      **extra}, keep_last=stage.train.keep_last),
                  steps_per_epoch=train.steps_per_epoch, progress=progress,
                  postfix=lambda m: {"loss": f"{m['loss']:.3f}", "acc": f"{m['accuracy']:.2f}"})
        step = n_steps
        final = evaluate(group, held, origins)
        log({"step": step, **final})
        group.save_hf(out_dir / "model")
    finally:
        group.shutdown()
    return {
        "stage": stage.name,
        "model": str(out_dir / "model"),
        "steps": n_steps,
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "dropped_pairs": dropped,
        "eval_accuracy_initial": initial_accuracy,
        "eval_accuracy_final": final["eval_accuracy"],
        "eval_margin_final": final["eval_margin"],
        **({"eval_accuracy_policy_pairs_final": final["eval_accuracy_policy_pairs"]}
           if "eval_accuracy_policy_pairs" in final else {}),
        **sampled,
        "num_ranks": stage.group.num_ranks,
        "zero_stage": stage.group.zero_stage,
        "wall_time_s": time.time() - t_start,
    }
