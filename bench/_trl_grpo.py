"""TRL GRPOTrainer baseline for bench/ppo_iteration.py: GRPO samples/s on CPU, with TRL's own generation.

Runs in the project's venv (TRL's current release; PPO left TRL after 1.12, GRPO is what TRL
ships for RL now) as a separate process, so that its threads and heap are its own:

    python _trl_grpo.py --policy DIR --reward DIR --prompts prompts.json --samples 64 --generations 4 \
        --mini-batch-size 8 --epochs 2 --max-tokens 128 --iterations 4 --warmup 1 --json out.json

One iteration = one generation batch of S samples: S / G prompts, G responses each, sampled with
HF `generate` (KV cache, stopping at EOS or after --max-tokens), scored by the reward model (a
sequence-classification model, TRL's `reward_funcs=model`), group-normalised advantages, then
--epochs passes (`num_iterations`) of S / M optimizer steps of mini-batch M
(`per_device_train_batch_size=M`, `steps_per_generation=S/M`), with a reference model and KL
(`beta`, = the PPO arms' kl_coef) so that it does the reference forward the PPO arms do. fp32, no
gradient checkpointing, no vLLM (TRL's vLLM modes need a CUDA device or a separate server).

Timing: a TrainerCallback stamps time.perf_counter() at on_train_begin and at every on_step_end;
an iteration is S/M x epochs optimizer steps, and iteration i lasts from the stamp that ends
iteration i-1 to the one that ends it (generation happens inside the first step of each).
samples_per_s = N x S / (sum of the N measured iteration times) after --warmup iterations.
Rewards are TRL's logged `reward` (the batch mean of the reward model's scores), per iteration.
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
    p.add_argument("--policy", required=True, help="HF causal LM dir (with tokenizer and chat template)")
    p.add_argument("--reward", required=True, help="HF sequence-classification dir, num_labels=1")
    p.add_argument("--prompts", required=True, help="JSON list of prompt strings (user turns)")
    p.add_argument("--samples", type=int, required=True, help="samples (responses) per iteration S")
    p.add_argument("--generations", type=int, default=4, help="responses per prompt G")
    p.add_argument("--mini-batch-size", type=int, required=True, help="samples per optimizer step M")
    p.add_argument("--epochs", type=int, default=2, help="passes over each generation batch")
    p.add_argument("--max-tokens", type=int, required=True, help="most new tokens per response")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=3e-6)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (a reference model when > 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before train()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.samples % a.generations or a.samples % a.mini_batch_size:
        p.error("need --generations | --samples and --mini-batch-size | --samples")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    for k, v in {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
                 "DISABLE_MLFLOW_INTEGRATION": "TRUE"}.items():
        os.environ[k] = v
    import torch

    torch.set_num_threads(a.threads)
    import datasets
    import transformers
    import trl
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              PrinterCallback)
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    S, G, M, E = a.samples, a.generations, a.mini_batch_size, a.epochs
    steps_per_iter = (S // M) * E
    total = a.warmup + a.iterations
    prompts = json.loads(Path(a.prompts).read_text())
    if len(prompts) < total * S // G:
        raise ValueError(f"{len(prompts)} prompts < {total} iterations x {S // G}")
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts[: total * S // G]]})
    tok = AutoTokenizer.from_pretrained(a.policy, local_files_only=True)
    tok.padding_side = "left"
    fp32 = {"dtype": torch.float32, "local_files_only": True}
    policy = AutoModelForCausalLM.from_pretrained(a.policy, **fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **fp32)
    reward.config.pad_token_id = tok.pad_token_id
    rtok = AutoTokenizer.from_pretrained(a.policy, local_files_only=True)

    out_dir = tempfile.mkdtemp(prefix="trl-grpo-bench-")
    cfg = GRPOConfig(
        output_dir=out_dir, seed=a.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=1,
        dataloader_num_workers=0, learning_rate=a.learning_rate, lr_scheduler_type="constant",
        per_device_train_batch_size=M, gradient_accumulation_steps=1, steps_per_generation=S // M,
        num_generations=G, num_iterations=E, max_completion_length=a.max_tokens, temperature=1.0,
        beta=a.beta, max_steps=total * steps_per_iter, log_completions=False, shuffle_dataset=False,
    )
    gen = {"seconds": [], "lengths": []}
    orig = GRPOTrainer._generate_single_turn

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = orig(self, *args, **kwargs)
        gen["seconds"].append(time.perf_counter() - t)
        completion_ids = out[0]  # (completion_ids, logprobs)
        if isinstance(completion_ids, list):
            gen["lengths"].extend(len(c) for c in completion_ids)
        return out

    GRPOTrainer._generate_single_turn = timed

    from _trl_stamps import Stamps

    stamps = Stamps("reward")  # the batch mean of the reward model's scores, once per generation batch
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          reward_processing_classes=rtok, callbacks=[stamps])
    trainer.remove_callback(PrinterCallback)
    from _trl_stamps import train

    train(trainer, out_dir, a.gc_freeze)
    if len(stamps.t) != total * steps_per_iter + 1:
        raise RuntimeError(f"expected {total * steps_per_iter} steps, got {len(stamps.t) - 1}")
    ends = stamps.t[::steps_per_iter]
    cpu_ends = stamps.cpu[::steps_per_iter]
    per_iter = [t1 - t0 for t0, t1 in zip(ends, ends[1:])]
    measured = per_iter[a.warmup:]
    # The reward of an iteration: TRL logs it once per generation batch, at the step after it.
    rewards = stamps.logged if len(stamps.logged) == total else []
    lengths = gen["lengths"]
    result = {
        "trl_version": trl.__version__, "samples_per_s": a.iterations * S / sum(measured),
        "seconds_per_iteration": measured, "warmup_seconds_per_iteration": per_iter[:a.warmup],
        "cpu_seconds_per_iteration": [c1 - c0 for c0, c1 in zip(cpu_ends, cpu_ends[1:])][a.warmup:],
        "generation_seconds_per_iteration": gen["seconds"][a.warmup:], "reward_per_iteration": rewards,
        "response_tokens_mean": sum(lengths) / len(lengths) if lengths else None,
        "response_tokens_max": max(lengths) if lengths else None,
        "settings": {"samples": S, "generations": G, "mini_batch_size": M, "epochs": E, "max_tokens": a.max_tokens,
                     "beta": a.beta, "threads": a.threads, "gc_freeze": a.gc_freeze, "lr": a.learning_rate},
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[trl-grpo] TRL {trl.__version__}: {result['samples_per_s']:.2f} samples/s; per iteration "
          f"{', '.join(f'{s:.2f}' for s in measured)} s", flush=True, file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
