"""TRL 1.12 PPOTrainer baseline for bench/ppo_iteration.py: PPO samples/s on CPU.

Runs with the python of the TRL 1.12 venv (bench/trl_baseline_env.py), never the project's: it
imports only torch, transformers, datasets and trl (`trl.experimental.ppo`, removed after 1.12.0).

    python _trl_ppo.py --policy DIR --reward DIR --value DIR --prompts prompts.json \
        --batch-size 8 --mini-batch-size 4 --epochs 2 --response-length 16 \
        --iterations 3 --warmup 1 --json out.json

One PPO iteration = one rollout batch of B prompts: sampling L new tokens per prompt (HF
`generate`, KV cache, `local_rollout_forward_batch_size=B` so one generate call; the old-policy
log-probs come from generate's scores, not from an extra forward), a no-grad forward of the
reference policy, the value model and the reward model over prompt+response, reward shaping
(per-token k1 KL * kl_coef, score on the last token), GAE, advantage whitening, then E epochs of
B/M mini-batch updates (policy and value model forward + backward, one AdamW step per mini-batch).

Settings: fp32 (bf16 off), no gradient checkpointing, no stop token and no missing-EOS penalty (every
response is exactly L tokens; checked and reported; with --stop-eos each stops at EOS, as TRL's
`stop_token="eos"` does, and L is the most), kl_coef/cliprange/vf_coef/gamma/lam at TRL's
defaults, no evaluation, no sample generations, no saving, report_to none, fixed seed.

Batch mapping: per_device_train_batch_size = micro-batch m (default M), gradient_accumulation_steps =
B/m, num_mini_batches = B/M, so TRL's rollout batch is B and its mini-batch M. TRL leaves
accelerate's accumulation at B/m micro-batches and syncs at the end of its (repeating) dataloader,
so the optimizer would step once per *epoch* (or once per micro-batch in an iteration that drew the
dataloader's last batch). For the standard PPO schedule both systems are meant to run, the script sets
accelerate's accumulation to M/m micro-batches without dataloader syncing: exactly one optimizer step
per mini-batch (verified from AdamW's step count, reported as `optimizer_steps`).
`--trl-native-accumulation` keeps TRL's own behaviour. The forward/backward work is the same in both.

Timing: PPOTrainer.train() runs all K+N iterations in one call and, of the callback hooks, calls
on_train_begin, on_log and on_step_end (once per iteration, after the PPO epochs and the LR-scheduler
step) and on_train_end. A TrainerCallback stamps time.perf_counter() at on_train_begin and at every
on_step_end; iteration i lasts from the previous stamp to its on_step_end (so each includes fetching
its prompts, the rollout, the scoring and the E epochs; the end-of-iteration `del`/`gc.collect()` of
TRL is counted in the next iteration). The first K (--warmup) iterations are dropped;
samples_per_s = N * B / (sum of the N measured iteration times). Model loading and trainer
construction are not timed. Generation time alone (the wrapped `batch_generation`) is reported too.

Overhead worth knowing: TRL calls gc.collect() twice per iteration (after the rollout and at the end).
With torch + transformers + datasets + trl imported, a full collection walks ~400k tracked objects:
~0.17 s each here, i.e. about half an iteration on a ~1M-parameter model. That is TRL as shipped
and is measured by default; `--gc-freeze` moves everything alive before train() into the permanent
generation (gc.freeze()), so those collections only scan the new objects: a kinder baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", required=True, help="HF LlamaForCausalLM dir (with tokenizer)")
    p.add_argument("--reward", required=True, help="HF LlamaForSequenceClassification dir, num_labels=1")
    p.add_argument("--value", required=True, help="HF LlamaForSequenceClassification dir, num_labels=1")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--batch-size", type=int, required=True, help="rollout batch B = prompts per iteration")
    p.add_argument("--mini-batch-size", type=int, required=True, help="PPO mini-batch M (one optimizer step)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="micro-batch m (default M)")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs per rollout batch")
    p.add_argument("--response-length", type=int, required=True, help="new tokens per response")
    p.add_argument("--iterations", type=int, default=3, help="measured PPO iterations")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=3e-6, help="TRL PPOConfig's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--trl-native-accumulation", action="store_true",
                   help="keep TRL's accelerate accumulation (optimizer steps per epoch, see docstring)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() before train(): TRL's two gc.collect() per iteration then skip the "
                        "import-time heap (see docstring)")
    p.add_argument("--stop-eos", action="store_true",
                   help="stop each response at EOS (stop_token='eos'); --response-length is then the most tokens")
    p.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)
    a.micro_batch_size = a.micro_batch_size or a.mini_batch_size
    if a.batch_size % a.mini_batch_size or a.mini_batch_size % a.micro_batch_size:
        p.error("need micro-batch | mini-batch | batch-size")
    if a.iterations < 1 or a.warmup < 0:
        p.error("need --iterations >= 1 and --warmup >= 0")
    return a


def load_tokenizer(path: str):
    """The model dir's tokenizer; falls back to the raw tokenizer.json if this transformers cannot
    load the saved tokenizer class. pad/eos come from config.json when the tokenizer lacks them."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # e.g. tokenizer_class saved by a newer transformers
        print(f"[trl-ppo] AutoTokenizer failed ({type(e).__name__}: {e}); using tokenizer.json", file=sys.stderr)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"))
    cfg = json.loads((Path(path) / "config.json").read_text())
    for name in ("pad", "eos"):
        tid = cfg.get(f"{name}_token_id")
        if isinstance(tid, list):
            tid = tid[0]
        if getattr(tok, f"{name}_token_id") is None and tid is not None:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(tid))
    if tok.pad_token_id is None:
        raise ValueError(f"no pad token in {path} (tokenizer or config.json)")
    tok.padding_side = "left"  # TRL's PPO expects left-padded queries
    return tok


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ["MKL_NUM_THREADS"] = str(a.threads)
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "WANDB_DISABLED": "true", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}.items():
        os.environ[k] = v

    import torch

    torch.set_num_threads(a.threads)
    import datasets
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    B, M, m, E, L = a.batch_size, a.mini_batch_size, a.micro_batch_size, a.epochs, a.response_length
    total_iters = a.warmup + a.iterations
    prompts = json.loads(Path(a.prompts).read_text())
    if len(prompts) < B:
        raise ValueError(f"{len(prompts)} prompts < batch size {B}")
    tok = load_tokenizer(a.policy)
    if any(tok.pad_token_id in p for p in prompts):
        # TRL masks every pad-id token of a query: the prompt would not be what the other side sees.
        raise ValueError(f"a prompt contains the pad token id {tok.pad_token_id}")
    train_ds = datasets.Dataset.from_dict({"input_ids": prompts})

    fp32 = {"dtype": torch.float32, "local_files_only": True}
    policy = AutoModelForCausalLM.from_pretrained(a.policy, **fp32)
    ref = AutoModelForCausalLM.from_pretrained(a.policy, **fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **fp32)
    value = AutoModelForSequenceClassification.from_pretrained(a.value, num_labels=1, **fp32)
    for mdl in (policy, ref, reward, value):
        mdl.config.pad_token_id = tok.pad_token_id

    out_dir = tempfile.mkdtemp(prefix="trl-ppo-bench-")
    cfg = PPOConfig(
        output_dir=out_dir, seed=a.seed, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, logging_steps=1, dataloader_num_workers=0, learning_rate=a.learning_rate,
        per_device_train_batch_size=m, gradient_accumulation_steps=B // m, num_mini_batches=B // M,
        num_ppo_epochs=E, local_rollout_forward_batch_size=B, total_episodes=total_iters * B,
        response_length=L, temperature=a.temperature, stop_token="eos" if a.stop_eos else None, stop_token_id=None,
        missing_eos_penalty=None, num_sample_generations=0,
    )

    gen = {"seconds": [], "steps": [], "pad_in_response": 0, "lengths": []}
    orig_batch_generation = ppo_mod.batch_generation

    def timed_batch_generation(model, queries, *args, **kwargs):
        t = time.perf_counter()
        query_responses, logits = orig_batch_generation(model, queries, *args, **kwargs)
        gen["seconds"].append(time.perf_counter() - t)
        gen["steps"].append(int(logits.shape[1]))  # sampled tokens per row this iteration
        responses = query_responses[:, queries.shape[1]:]
        gen["pad_in_response"] += int((responses == tok.pad_token_id).sum())
        is_eos = responses == tok.eos_token_id
        gen["lengths"].extend(int(e.nonzero()[0]) + 1 if e.any() else responses.shape[1] for e in is_eos)
        return query_responses, logits

    ppo_mod.batch_generation = timed_batch_generation

    from _trl_stamps import Stamps

    stamps = Stamps("objective/scores")  # the reward model's mean score, once per iteration
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train_ds, callbacks=[stamps])
    trainer.remove_callback(PrinterCallback)
    assert cfg.batch_size == B and cfg.mini_batch_size == M and cfg.num_total_batches == total_iters, cfg
    if not a.trl_native_accumulation:
        trainer.accelerator.gradient_state.plugin_kwargs.update(
            {"num_steps": M // m, "sync_with_dataloader": False})

    from _trl_stamps import train

    train(trainer, out_dir, a.gc_freeze)

    per_iter = [t1 - t0 for t0, t1 in zip(stamps.t, stamps.t[1:])]
    if len(per_iter) != total_iters:
        raise RuntimeError(f"expected {total_iters} on_step_end calls, got {len(per_iter)}")
    if not a.stop_eos and any(s != L for s in gen["steps"]):
        raise RuntimeError(f"responses not all {L} tokens long: {gen['steps']}")
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    steps = [int(st["step"]) for st in opt.state.values() if "step" in st]
    measured = per_iter[a.warmup:]
    seconds = sum(measured)
    samples = a.iterations * B
    result = {
        "trl_version": trl.__version__,
        "iterations": a.iterations,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "seconds_per_iteration": measured,
        "cpu_seconds_per_iteration": [c1 - c0 for c0, c1 in zip(stamps.cpu, stamps.cpu[1:])][a.warmup:],
        "warmup_seconds_per_iteration": per_iter[:a.warmup],
        "generation_seconds_per_iteration": gen["seconds"][a.warmup:],
        "response_tokens_per_sample": L,
        "response_tokens_mean": sum(gen["lengths"]) / len(gen["lengths"]),
        "response_tokens_max": max(gen["lengths"]),
        "reward_per_iteration": stamps.logged,
        "pad_tokens_sampled": gen["pad_in_response"],
        "optimizer_steps": max(steps) if steps else 0,
        "expected_optimizer_steps": total_iters * E * (B // M),
        "optimizer": type(opt).__name__,
        "settings": {"batch_size": B, "mini_batch_size": M, "micro_batch_size": m, "epochs": E,
                     "response_length": L, "warmup": a.warmup, "temperature": a.temperature,
                     "threads": a.threads, "kl_coef": cfg.kl_coef, "seed": a.seed,
                     "trl_native_accumulation": a.trl_native_accumulation, "gc_freeze": a.gc_freeze},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__},
    }
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[trl-ppo] TRL {trl.__version__}: {samples} samples in {seconds:.2f} s = "
          f"{result['samples_per_s']:.2f} samples/s; per iteration "
          f"{', '.join(f'{s:.3f}' for s in measured)} s; optimizer steps {result['optimizer_steps']}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
