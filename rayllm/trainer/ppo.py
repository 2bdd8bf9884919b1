"""PPO stage: four model groups (policy, critic, reference, reward), vLLM rollout engines, and
the loop that ties them together.

One iteration:
  1. generate: the rollout engines sample `sampling.n` responses for each of
     `rollout_batch_size` prompts (log-probs of the sampled tokens come with them);
  2. experience: the policy's own log-probs (the PPO ratio's denominator, unless the engine's
     are used: algo.behavior_logprobs), the reference's log-probs, the reward model's scores (or
     a rule-based reward) and the critic's values are computed at once, each group on its own
     ranks;
  3. advantages on the driver, over the whole batch: per-token KL penalty, then GAE (critic) or
     a critic-free estimator (GRPO, RLOO, REINFORCE++), whitening, truncated importance weights
     for the engine/trainer gap;
  4. train: `ppo_epochs` passes over shuffled mini-batches; the policy and critic step at the
     same time;
  5. sync: the new policy weights are pushed into the engines and verified.

Every quantity that is a mean over the batch is computed on the driver or as a global token
mean on the ranks, so the result does not depend on how many ranks a group has.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from rayllm import console
from rayllm.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    normalize_rewards,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_rewards,
    truncated_is_weights,
)
from rayllm.config import PPO, GroupConfig
from rayllm.datasets.prompts import encode_prompt, load_prompts
from rayllm.datasets.tasks import scorer
from rayllm.group import ModelGroup, Placement
from rayllm.group.model_group import CheckpointRefused, checkpoint_meta
from rayllm.hooks import load_hook
from rayllm.io import write_json_atomic
from rayllm.reward_client import RemoteReward
from rayllm.trainer.loop import Ledger, StageLog
from rayllm.models import load_tokenizer, resolve_model, value_model_from
from rayllm.rollout import RolloutPool, SyncMismatch
from rayllm.rollout.errors import SnapshotLost
from rayllm.trainer.rollout_worker import RolloutWorker, busy_seconds, overlap_seconds

ROLES = ("policy", "reference", "reward", "critic")
# The experience forwards: those of the frozen groups (any time after generation) and all four.
FROZEN_FORWARDS = frozenset({"ref", "scores"})
ALL_FORWARDS = frozenset({"ref", "scores", "old", "values"})


def resolve_inputs(stage: PPO, out_dir: Path, seed: int, artifacts: dict[str, str]) -> dict[str, Path | None]:
    """Model directories of the four roles, from the stage's config or the earlier stages."""
    def given(m, kind="causal_lm"):
        return resolve_model(m, kind)[0] if m is not None else None

    sft = Path(artifacts["sft"]) if "sft" in artifacts else None
    # After an earlier PPO stage the next one continues from its policy (iterated RLHF: a new
    # reward model on that policy's samples in between), still anchored to the SFT model.
    latest = Path(artifacts["ppo"]) if "ppo" in artifacts else sft
    policy = given(stage.policy_model) or latest
    reference = policy if stage.policy_model is not None else (sft or policy)
    if policy is None:
        raise ValueError(f"{stage.name}: no policy model: set policy_model or run an SFT stage before it")
    reward = None
    if stage.reward_fn is None and stage.reward_url is None:
        reward = given(stage.reward_model, "reward") or (Path(artifacts["reward"]) if "reward" in artifacts else None)
        if reward is None:
            raise ValueError(f"{stage.name}: no reward: set reward_model, reward_fn or reward_url, or run a reward "
                             "stage before it")
    critic = None
    if stage.algo.advantage == "gae":
        # OpenRLHF's default: the critic starts from the reward model, which already maps a
        # sequence to how good it is; with a rule-based reward, from the policy's trunk.
        critic = given(stage.critic_model, "critic") or reward or value_model_from(policy, out_dir / "critic_init", seed)
    return {"policy": policy, "reference": reference, "reward": reward, "critic": critic}


def placements(cfgs: dict[str, GroupConfig]) -> dict[str, Placement]:
    """Shared placement groups for colocated roles: every role that names another in
    `colocate_with` (directly or through a chain) shares its bundles, each taking an equal share."""
    def root(role: str) -> str:
        seen = set()
        while cfgs[role].colocate_with in cfgs and role not in seen:
            seen.add(role)
            role = cfgs[role].colocate_with
        return role

    clusters: dict[str, list[str]] = {}
    for role in cfgs:
        clusters.setdefault(root(role), []).append(role)
    out = {}
    for members in clusters.values():
        if len(members) < 2:
            continue
        c = [cfgs[m] for m in members]
        ranged = [m for m, x in zip(members, c) if x.per_slot_placement]
        if ranged:
            raise ValueError(f"{ranged[0]}: num_ranks as a range, or rank_resources, needs the group's own placement; "
                             f"{', '.join(m for m in members if m != ranged[0])} cannot be colocated with it")
        place = Placement.create(max(x.max_ranks for x in c), max(x.cpus_per_rank for x in c),
                                 max(x.gpus_per_rank for x in c), share=1.0 / len(members))
        out.update({m: place for m in members})
    return out


class PPOTrainer:
    def __init__(self, stage: PPO, out_dir: Path, seed: int, artifacts: dict[str, str]):
        self.stage, self.out_dir, self.seed = stage, out_dir, seed
        a = stage.algo
        paths = resolve_inputs(stage, out_dir, seed, artifacts)
        self.tok = load_tokenizer(paths["policy"])
        self.reward_fn = load_hook(stage.reward_fn, "reward_fn") if stage.reward_fn else None
        self.remote_reward = RemoteReward(stage.reward_url, stage.reward_timeout_s) if stage.reward_url else None
        self.score_fn = scorer(stage.data.source, stage.score_fn)
        self.train_records, self.eval_records = load_prompts(stage.data, seed)
        n = stage.train.rollout_batch_size * stage.rollout.sampling.n
        # Each group's LR schedule spans the optimizer steps it takes: the critic steps in every
        # iteration, the policy not in the critic's warm-up (run_ppo's update_policy).
        per_iteration, iters = a.ppo_epochs * (n // a.mini_batch_size), stage.train.iterations
        policy_iters = max(0, iters - stage.train.critic_warmup) if paths["critic"] is not None else iters
        updates = {"policy": policy_iters * per_iteration, "critic": iters * per_iteration}
        cfgs = {r: getattr(stage, r) for r in ROLES if paths[r] is not None}
        shared = placements(cfgs)
        self._placements = list({id(p): p for p in shared.values()}.values())
        kinds = {"policy": "causal_lm", "reference": "causal_lm", "reward": "reward", "critic": "critic"}
        self.groups: dict[str, ModelGroup] = {}
        try:
            for role, cfg in cfgs.items():
                self.groups[role] = ModelGroup(
                    f"{stage.name}/{role}", cfg, paths[role], kinds[role], trainable=role in ("policy", "critic"),
                    total_steps=updates.get(role, 0), placement=shared.get(role), pad_id=self.tok.pad_token_id)
            self.pool = RolloutPool(stage.rollout, paths["policy"], name=f"{stage.name}/rollout")
        except BaseException:
            self.shutdown()
            raise
        self.kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target
                       else FixedKLController(a.kl_coef))
        self.moments = RunningMoments() if a.reward_normalize else None
        self.rng = np.random.default_rng(seed)
        self.cursor = 0
        self.worker: RolloutWorker | None = None
        self._pushes: deque = deque()  # async pushes handed to the worker: (version, future)
        self._applied: list[dict] = []

    # ---- one iteration ------------------------------------------------------------------------
    def next_prompts(self) -> list[dict]:
        return [self.train_records[i] for i in self.take_prompt_ids()]

    def take_prompt_ids(self) -> list[int]:
        """Indices of the next rollout batch of training prompts (the ledger's ids), in order."""
        n, total = self.stage.train.rollout_batch_size, len(self.train_records)
        out = [(self.cursor + i) % total for i in range(n)]
        self.cursor += n
        return out

    def prompt_ids(self, iteration: int) -> list[int]:
        """The ledger's ids of iteration's prompts: a function of the iteration alone, so a batch
        generated ahead (async) or again after a resume holds the same prompts."""
        n, total = self.stage.train.rollout_batch_size, len(self.train_records)
        return [((iteration - 1) * n + i) % total for i in range(n)]

    def updates_before(self, iteration: int) -> int:
        """The policy version that trains iteration: its updates so far (none in the critic's warm-up)."""
        done = iteration - 1
        return done - min(done, self.stage.train.critic_warmup) if "critic" in self.groups else done

    def make_experience(self, records: list[dict], iteration: int) -> dict:
        """Generate, score and turn into training rows, all at once (the synchronous path)."""
        return self.finish_experience(self.generate_batch(records, iteration, ALL_FORWARDS))

    def generate_batch(self, records: list[dict], iteration: int, forwards: frozenset = FROZEN_FORWARDS) -> dict:
        """Sample the batch and run `forwards` over it (FROZEN_FORWARDS: the reference and the
        reward, which no update changes; ALL_FORWARDS adds the policy's and the critic's, which
        must then come from the policy that trains on it)."""
        s = self.stage.rollout.sampling
        t0 = time.perf_counter()
        prompts = [encode_prompt(self.tok, r["prompt"])[-self.stage.data.max_prompt_length:] for r in records]
        # Each iteration draws fresh sampling noise: the streams are keyed on (seed, iteration).
        samples = self.pool.generate(prompts, s, key=(self.seed, iteration))
        t1 = time.perf_counter()
        rows = [{"input_ids": x.prompt_ids + x.response_ids,
                 "loss_mask": [0] * len(x.prompt_ids) + [1] * len(x.response_ids)} for x in samples]
        texts = [self.tok.decode(x.response_ids, skip_special_tokens=True) for x in samples]
        sample_recs = [records[x.prompt_index] for x in samples]
        res = self._forwards(rows, forwards)
        if self.reward_fn is not None:
            res["scores"] = [float(self.reward_fn(t, r)) for t, r in zip(texts, sample_recs)]
        return {"samples": samples, "rows": rows, "texts": texts, "records": sample_recs, "res": res,
                "iteration": iteration, "generate_s": t1 - t0, "experience_s": time.perf_counter() - t1,
                "engine_versions": {str(i): v for i, v in self.pool.engine_versions().items()}}

    def _forwards(self, rows: list[dict], which: frozenset) -> dict:
        """The experience forwards named in `which` that this stage has, run concurrently."""
        g, temp = self.groups, self.stage.rollout.sampling.temperature
        temp = temp if temp > 0 else 1.0
        pending = {}
        if "ref" in which:
            pending["ref"] = g["reference"].logprobs_async(rows, temp)
        if "old" in which and self.stage.algo.behavior_logprobs == "trainer":
            pending["old"] = g["policy"].logprobs_async(rows, temp)
        if "values" in which and "critic" in g:
            pending["values"] = g["critic"].values_async(rows)
        if "scores" in which and "reward" in g:
            pending["scores"] = g["reward"].scores_async(rows)
        if "scores" in which and self.remote_reward is not None:
            pending["scores"] = self.remote_reward.scores_async(rows)
        return {k: p.result() for k, p in pending.items()}  # the groups run concurrently

    def finish_experience(self, batch: dict, max_staleness: int = 0) -> dict:
        """The forwards the batch still lacks (those of the policy that trains it), the staleness
        check (docs/async_ppo.md: no sample older than max_staleness versions is trained on),
        advantages, and the policy's and critic's training rows."""
        a = self.stage.algo
        samples, rows, texts, sample_recs = batch["samples"], batch["rows"], batch["texts"], batch["records"]
        version = self.updates_before(batch["iteration"])
        staleness = [version - x.version for x in samples]
        stale = sum(d > max_staleness for d in staleness)
        if stale:
            raise RuntimeError(f"{self.stage.name}: {stale} sample(s) of iteration {batch['iteration']} were drawn more "
                               f"than algo.max_staleness={max_staleness} policy versions before version {version}; "
                               "they are not trained on")
        t1 = time.perf_counter()
        res = {**batch["res"], **self._forwards(rows, ALL_FORWARDS - {"ref", "scores"} - set(batch["res"]))}
        t2 = time.perf_counter()

        # Response-aligned tensors [N, L]: target index j of a row is token j + 1.
        N, L = len(samples), max(len(x.response_ids) for x in samples)
        mask = torch.zeros(N, L)
        old, ref, rollout_lp, values = (torch.zeros(N, L) for _ in range(4))
        for i, x in enumerate(samples):
            p, r = len(x.prompt_ids), len(x.response_ids)
            mask[i, :r] = 1
            cut = slice(p - 1, p - 1 + r)
            ref[i, :r] = torch.as_tensor(res["ref"][i][cut])
            rollout_lp[i, :r] = torch.as_tensor(x.logprobs)
            if "old" in res:
                old[i, :r] = torch.as_tensor(res["old"][i][cut])
            if "values" in res:
                values[i, :r] = torch.as_tensor(res["values"][i][cut])
        if "old" not in res:  # behavior_logprobs == "engine"
            old = rollout_lp
        raw_scores = torch.tensor(res["scores"], dtype=torch.float32)
        scores = raw_scores
        if self.moments is not None or a.reward_clip is not None:
            scores = normalize_rewards(raw_scores, self.moments, a.reward_clip)
        kl = kl_estimate(old, ref, a.kl_estimator) * mask
        adv, returns = self._advantages(scores, kl, values, mask)
        isw = truncated_is_weights(old, rollout_lp, a.tis_cap) if a.tis_cap else None

        def per_target(row_i: int, t: torch.Tensor) -> list[float]:
            """Back to the row's target positions (prompt targets are masked out anyway)."""
            p, r = len(samples[row_i].prompt_ids), len(samples[row_i].response_ids)
            out = [0.0] * (p - 1 + r)
            out[p - 1:] = t[row_i, :r].tolist()
            return out

        policy_rows, critic_rows = [], []
        for i, row in enumerate(rows):
            pr = {**row, "old_logprobs": per_target(i, old), "advantages": per_target(i, adv)}
            if isw is not None:
                pr["is_weights"] = per_target(i, isw)
            policy_rows.append(pr)
            if "values" in res:
                critic_rows.append({**row, "old_values": per_target(i, values), "returns": per_target(i, returns)})
        seq_kl = (kl.sum(1)).mean().item()
        metrics = {
            "samples": N, "reward": raw_scores.mean().item(), "reward_std": raw_scores.std().item() if N > 1 else 0.0,
            "kl": seq_kl, "kl_coef": self.kl_ctl.value,
            "response_length": mask.sum(1).mean().item(),
            "truncated_share": float(np.mean([x.finish_reason == "length" for x in samples])),
            "advantage_mean": masked_mean(adv, mask).item(),
            "generate_s": batch["generate_s"], "experience_s": batch["experience_s"] + t2 - t1,
            "policy_version": version, "engine_version": min(x.version for x in samples),
            "engine_versions": batch["engine_versions"],  # what each engine held at the batch's end
            "staleness_mean": float(np.mean(staleness)), "staleness_max": max(staleness),
            "staleness_hist": {str(d): staleness.count(d) for d in sorted(set(staleness))},
            "stale_samples": stale,
        }
        if "old" in res:
            metrics["engine_trainer_logprob_gap"] = masked_mean((old - rollout_lp).abs(), mask).item()
        if self.score_fn is not None:
            metrics["train_ground_truth"] = float(np.mean([self.score_fn(t, r) for t, r in zip(texts, sample_recs)]))
        return {"policy_rows": policy_rows, "critic_rows": critic_rows, "metrics": metrics, "n": N}

    def _advantages(self, scores, kl, values, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages and value targets, [N, L]. The KL penalty is a per-token reward for every
        estimator: GAE and REINFORCE++ fold it into their returns; GRPO and RLOO add its
        reward-to-go to the sequence advantage, which compares samples of the same prompt."""
        a, n = self.stage.algo, self.stage.rollout.sampling.n
        coef = self.kl_ctl.value
        if a.advantage == "gae":
            adv, ret = compute_gae(token_rewards(scores, kl, mask, coef), values, mask, a.gamma, a.lam)
            return (masked_whiten(adv, mask) if a.whiten_advantages else adv), ret
        if a.advantage == "reinforce_pp":
            return reinforce_pp_advantages(token_rewards(scores, kl, mask, coef), mask, a.gamma), torch.zeros_like(mask)
        seq = grpo_advantages(scores, n) if a.advantage == "grpo" else rloo_advantages(scores, n)
        adv = seq[:, None] * mask + reinforce_pp_returns(-coef * kl, mask, a.gamma)
        return adv * mask, torch.zeros_like(mask)

    def train(self, exp: dict, policy: bool = True) -> dict:
        """ppo_epochs passes over shuffled mini-batches, one optimizer step at a time: each
        mini-batch is a step of the policy and one of the critic, run at once on their groups,
        and each is committed on every rank before the next starts (a fault retries that step
        with the same rows, never leaving some steps applied and others not; docs/elasticity.md).
        policy=False trains the critic alone (critic warm-up)."""
        a = self.stage.algo
        temp = self.stage.rollout.sampling.temperature
        pol, cri = [], []
        for _ in range(a.ppo_epochs):
            order = self.rng.permutation(exp["n"])
            for start in range(0, exp["n"], a.mini_batch_size):
                idx = order[start:start + a.mini_batch_size]
                steps = []
                if policy:
                    steps.append((pol, self.groups["policy"].train_step_async(
                        [exp["policy_rows"][i] for i in idx], loss="ppo_policy", clip_eps=a.clip_eps,
                        dual_clip=a.dual_clip, entropy_coef=a.entropy_coef, temperature=temp if temp > 0 else 1.0)))
                if exp["critic_rows"]:
                    steps.append((cri, self.groups["critic"].train_step_async(
                        [exp["critic_rows"][i] for i in idx], loss="ppo_value", clip_eps=a.value_clip)))
                for results, pending in steps:
                    results.append(pending.result())
        out = {}
        if pol:
            out = {k: float(np.mean([m[k] for m in pol])) for k in ("policy_loss", "entropy", "clipfrac", "approx_kl")}
            out["policy_grad_norm"] = float(np.mean([m["grad_norm"] for m in pol]))
            out["policy_lr"] = pol[-1]["lr"]
            out["policy_step_s"] = float(np.mean([m["compute_s"] for m in pol]))
        if cri:
            out["value_loss"] = float(np.mean([m["value_loss"] for m in cri]))
            out["value_mean"] = float(np.mean([m["value_mean"] for m in cri]))
            out["critic_step_s"] = float(np.mean([m["compute_s"] for m in cri]))
        return out

    def evaluate(self) -> dict:
        """Ground-truth score and reward on the held-out prompts: of greedy responses, and of
        responses sampled as in training (one per prompt, at the rollout temperature), since the
        latter is the distribution PPO optimises."""
        if not self.eval_records:
            return {}
        from rayllm.config import SamplingConfig

        s = self.stage.rollout.sampling
        prompts = [encode_prompt(self.tok, r["prompt"])[-self.stage.data.max_prompt_length:] for r in self.eval_records]
        out = {}
        for suffix, temperature in (("", 0.0), ("_sampled", s.temperature)):
            params = SamplingConfig(n=1, temperature=temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                    stop=s.stop, seed=s.seed + 1)
            # Iteration 0 is never a training iteration: every evaluation draws the same streams,
            # so evaluations differ by the policy only.
            samples = self.pool.generate(prompts, params, key=(self.seed, 0))
            texts = [self.tok.decode(x.response_ids, skip_special_tokens=True) for x in samples]
            if self.score_fn is not None:
                out[f"eval_ground_truth{suffix}"] = float(np.mean([self.score_fn(t, r)
                                                                   for t, r in zip(texts, self.eval_records)]))
            rows = [{"input_ids": x.prompt_ids + x.response_ids} for x in samples]
            if "reward" in self.groups:
                out[f"eval_reward{suffix}"] = float(np.mean(self.groups["reward"].scores(rows)))
            elif self.remote_reward is not None:
                out[f"eval_reward{suffix}"] = float(np.mean(self.remote_reward.scores(rows)))
            elif self.reward_fn is not None:
                out[f"eval_reward{suffix}"] = float(np.mean([self.reward_fn(t, r)
                                                             for t, r in zip(texts, self.eval_records)]))
            if not suffix:
                out["eval_examples"] = [{"prompt": r["prompt"], "response": t} for r, t in zip(self.eval_records[:4], texts)]
        return out

    def sync(self, version: int | None = None) -> dict:
        """Push the policy into the engines (verified, retried once: RolloutPool.sync); the
        push's statistics as metrics. `version`: the policy's updates so far."""
        return sync_metrics(self.pool.sync(self.groups["policy"], version))

    def start_push(self, worker: RolloutWorker, version: int) -> float:
        """Async: snapshot the policy now and have the rollout worker load and verify it into the
        engines between its batches (docs/async_ppo.md). Returns the snapshot's seconds."""
        snap = self.pool.capture(self.groups["policy"], version)
        self._pushes.append((version, worker.submit(lambda: self.pool.apply(snap))))
        return snap.capture_s

    def poll_pushes(self, worker: RolloutWorker, version: int) -> None:
        """Collect the async pushes the worker has applied. A snapshot lost with the policy rank
        that held it is taken again from the weights the policy has now (`version`: never older
        than the lost one). A push that failed verification twice raises SyncMismatch here."""
        while self._pushes and self._pushes[0][1].done():
            _, fut = self._pushes.popleft()
            try:
                self._applied.append(sync_metrics(fut.result()))
            except SnapshotLost as e:
                console.say(f"[rayllm] {self.stage.name}: {e}; taking a new snapshot")
                self.start_push(worker, version)

    def take_applied(self) -> dict:
        """The async pushes applied since the last call: the latest one's statistics, their count."""
        out, self._applied = self._applied, []
        if not out:
            return {"pushes_applied": 0}
        last = {k: v for k, v in out[-1].items() if k != "sync_s"}
        return {**last, "sync_apply_s": sum(x["sync_s"] for x in out), "pushes_applied": len(out)}

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, it: int, loop: dict) -> None:
        """Policy and critic (DeepSpeed checkpoints, optimizer and LR schedule included) and the
        loop's state: prompt cursor, shuffling RNG, KL coefficient, reward moments, and `loop`
        (the metrics so far). trainer.json is written last, naming the iteration both group
        checkpoints hold, so a crash mid-save resumes from the previous one. Each group's
        rayllm.json carries the fingerprint too, checked again before its files are unpickled."""
        (tag,) = {self.groups[r].save_checkpoint(ckpt_dir / r, it, {"data": loop["data"]},
                                                 keep_last=self.stage.train.keep_last)
                  for r in ("policy", "critic") if r in self.groups}
        state = {"iteration": it, "tag": tag, "cursor": self.cursor, "rng": self.rng.bit_generator.state,
                 "kl_coef": self.kl_ctl.value, "moments": vars(self.moments) if self.moments else None, **loop}
        write_json_atomic(ckpt_dir / "trainer.json", state)

    def restore(self, ckpt_dir: Path, state: dict) -> None:
        """Load the checkpoint `state` names (see checkpoint_state) and push its policy into
        the engines. Only that tag is loaded, and only once its rayllm.json shows the fingerprint
        trainer.json was checked against (ModelGroup.load_checkpoint)."""
        for role in ("policy", "critic"):
            if role in self.groups:
                self.groups[role].load_checkpoint(ckpt_dir / role, state["tag"], data=state["data"])
        self.cursor = state["cursor"]
        self.rng.bit_generator.state = state["rng"]
        self.kl_ctl.value = state["kl_coef"]
        if self.moments is not None and state["moments"]:
            vars(self.moments).update(state["moments"])
        self.sync(self.updates_before(state["iteration"] + 1))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if getattr(self, "worker", None) is not None:
            self.worker.stop()
            self.worker = None
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()
        if getattr(self, "remote_reward", None) is not None:
            self.remote_reward.close()
        for g in self.groups.values():
            g.shutdown()
        for p in self._placements:
            remove_placement_group(p.pg)
        self.groups, self._placements = {}, []


def sync_metrics(rep: dict) -> dict:
    """A push's report (RolloutPool.sync, or SyncMismatch.report) as flat metrics: times, the
    verification's statistics of the worst engine, and how many attempts it took."""
    out = {"sync_s": rep.get("push_s", 0) + rep.get("gather_s", 0) + rep.get("verify_s", 0),
           "sync_verify_s": rep.get("verify_s", 0.0), "sync_attempts": rep.get("attempts", 1),
           "sync_engines_lost": rep.get("engines_lost", 0)}
    for k in ("mean_gap", "max_gap", "token_prob_error"):
        out[f"sync_{k}"] = rep.get(k, float("nan"))
    return out


def window_metrics(generating: list, training: list, w0: float, w1: float) -> dict:
    """An iteration's wall-clock window [w0, w1] (docs/async_ppo.md): its seconds, the seconds
    in it that the trainers did not train and the engines did not generate, and the share of it
    in which both ran at once."""
    window = max(w1 - w0, 1e-9)
    return {"iteration_s": w1 - w0, "trainer_idle_s": window - busy_seconds(training, w0, w1),
            "engine_idle_s": window - busy_seconds(generating, w0, w1),
            "overlap_share": overlap_seconds(generating, training, w0, w1) / window}


def checkpoint_fingerprint(stage: PPO, artifacts: dict[str, str]) -> str:
    """What a checkpoint must have been taken on to be resumed: the stage's config (except how
    long it runs and how often it saves or evaluates) and the models it started from."""
    cfg = stage.model_dump(mode="json")
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in ("iterations", "checkpoint_every", "eval_every", "keep_last")}
    for role in ("policy", "critic", "reference", "reward"):  # how long the driver waits changes no result,
        # nor how faults are met or injected, nor how many ranks compute it (a checkpoint loads on any number)
        for key in ("call_timeout_s", "elastic", "chaos", "num_ranks", "cpus_per_rank", "gpus_per_rank"):
            cfg[role].pop(key, None)
    cfg["rollout"].pop("chaos", None)
    return hashlib.sha256(json.dumps([cfg, artifacts], sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_state(stage: PPO, ckpt_dir: Path, fingerprint: str) -> dict | None:
    """The loop state of the last checkpoint, None when there is none. Checked before any group
    starts: a checkpoint of another config or other models is refused, naming both, and so is
    one whose group checkpoints lack rayllm's JSON or name other data (all read as JSON only)."""
    path = ckpt_dir / "trainer.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("data") != fingerprint:
        raise CheckpointRefused(f"{stage.name}: the checkpoint in {ckpt_dir} was taken with another config or "
                                f"other models ({state.get('data')} != {fingerprint}); remove it to start over")
    for role in ("policy", "critic"):
        if (ckpt_dir / role).exists():
            _, meta = checkpoint_meta(ckpt_dir / role, state["tag"])
            if meta.get("data") != fingerprint:
                raise CheckpointRefused(f"{stage.name}: the {role} checkpoint in {ckpt_dir / role} was taken with "
                                        f"another config or other models ({meta.get('data')} != {fingerprint}); "
                                        "remove it to start over")
    return state


def run_ppo(stage: PPO, out_dir: Path, seed: int, artifacts: dict[str, str], metrics_path: Path | None = None,
            progress: bool = True) -> dict:
    """Returns the stage summary; the trained policy is at <out_dir>/model."""
    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_path or out_dir / "metrics.jsonl"
    say = console.say if progress else (lambda *a, **k: None)
    ckpt_dir, fingerprint = out_dir / "checkpoints", checkpoint_fingerprint(stage, artifacts)
    state = checkpoint_state(stage, ckpt_dir, fingerprint)
    trainer = PPOTrainer(stage, out_dir, seed, artifacts)
    log = StageLog(stage.name, metrics_path, [*trainer.groups.values(), trainer.pool])  # their fault events
    log.truncate_after(state["iteration"] if state else 0)
    ledger = Ledger.from_state(state or {})
    try:
        say(f"[rayllm] {stage.name}: groups {', '.join(f'{r} ({g.world_size} rank(s), ZeRO-{g.cfg.zero_stage})' for r, g in trainer.groups.items())}; "
            f"{stage.rollout.num_engines} {stage.rollout.backend} engine(s); {len(trainer.train_records)} prompts, "
            f"{len(trainer.eval_records)} held out", flush=True)
        if state is None:
            first, history, start = trainer.evaluate(), [], 1
            first.pop("eval_examples", None)
            log({"step": 0, **first})
        else:
            trainer.restore(ckpt_dir, state)
            first, history, start = state["first"], state["history"], state["iteration"] + 1
            say(f"[rayllm] {stage.name}: resumed after iteration {state['iteration']} from {ckpt_dir}", flush=True)
        iters = stage.train.iterations
        bar = console.bar(total=iters, initial=start - 1, desc=stage.name, disable=not progress, unit="iter")
        k = stage.algo.max_staleness
        # Every pool call from here on runs on the rollout worker's thread (docs/async_ppo.md).
        # Batch j waits for the engines to hold the policy of updates_before(j) - k updates: at
        # k = 0 that is the push after the previous iteration, so nothing overlaps and the policy
        # and critic forwards run beside the frozen groups', as they always have (once this thread
        # is done with those groups for the previous iteration: `released`).
        released = [start - 1]

        def can_start(j: int) -> bool:
            fresh = trainer.pool.policy_version >= trainer.updates_before(j) - k
            return fresh and (k > 0 or released[0] >= j - 1)

        worker = trainer.worker = RolloutWorker(
            lambda j: trainer.generate_batch([trainer.train_records[i] for i in trainer.prompt_ids(j)], j,
                                             FROZEN_FORWARDS if k else ALL_FORWARDS),
            start, iters, can_start)
        training: list[tuple[float, float]] = []  # the trainers' busy intervals
        window_start = time.monotonic()
        for it in range(start, iters + 1):
            prompt_ids = trainer.prompt_ids(it)
            version = trainer.updates_before(it)
            try:
                batch = worker.batch(it, lambda: trainer.poll_pushes(worker, version))
            except SyncMismatch as e:  # async: the push of an earlier iteration failed verification twice
                if history:
                    trainer.save(ckpt_dir, it - 1, {"data": fingerprint, "first": first, "history": history,
                                                    "ledger": ledger.steps})
                say(f"[rayllm] {stage.name}: a weight push failed verification twice ({e}); checkpoint of "
                    f"iteration {it - 1} written to {ckpt_dir}, a rerun resumes after it", flush=True)
                raise
            exp = trainer.finish_experience(batch, k)
            t = time.monotonic()
            update_policy = it > stage.train.critic_warmup or "critic" not in trainer.groups
            m = {**exp["metrics"], **trainer.train(exp, policy=update_policy)}
            training.append((t, time.monotonic()))
            m["train_s"] = training[-1][1] - t
            trainer.cursor = it * stage.train.rollout_batch_size
            if update_policy:  # a policy held still (warm-up) says nothing about the KL it would drift to
                trainer.kl_ctl.update(exp["metrics"]["kl"], exp["n"])
                if k:
                    m["sync_s"] = trainer.start_push(worker, version + 1)
                else:
                    try:
                        m.update(worker.call(lambda: trainer.sync(version + 1)))
                    except SyncMismatch as e:
                        # The update is done; only its push failed twice. Keep the iteration: a
                        # checkpoint of it, which a rerun resumes from (restoring pushes again).
                        m.update(sync_metrics(e.report), sync_failed=True)
                        m["iteration_s"] = time.monotonic() - window_start
                        history.append(m)
                        ledger.add(prompt_ids)
                        log({"step": it, **m, "sample_ids": ledger.steps[-1]})
                        trainer.save(ckpt_dir, it, {"data": fingerprint, "first": first, "history": history,
                                                    "ledger": ledger.steps})
                        say(f"[rayllm] {stage.name}: the weight push after iteration {it} failed verification "
                            f"twice; checkpoint written to {ckpt_dir}, a rerun resumes after iteration {it}", flush=True)
                        raise
            else:  # the engines already hold the weights of a policy that did not step
                m["sync_s"] = 0.0
            if k:
                trainer.poll_pushes(worker, trainer.updates_before(it + 1))
                m.update(trainer.take_applied())
            if stage.train.eval_every and it % stage.train.eval_every == 0 and it < iters:
                m.update({key: v for key, v in worker.call(trainer.evaluate).items() if key != "eval_examples"})
            now = time.monotonic()
            m.update(window_metrics(worker.generating, training, window_start, now))
            window_start = now
            history.append(m)
            ledger.add(prompt_ids)
            log({"step": it, **m, "sample_ids": ledger.steps[-1]})
            bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.3f}", refresh=False)
            bar.update(1)
            if stage.train.checkpoint_every and it % stage.train.checkpoint_every == 0 and it < iters:
                trainer.save(ckpt_dir, it, {"data": fingerprint, "first": first, "history": history,
                                            "ledger": ledger.steps})
            released[0] = it
        bar.close()
        last = worker.call(trainer.evaluate)  # after every push handed to the worker (its jobs run in order)
        trainer.poll_pushes(worker, trainer.updates_before(iters + 1))
        log({"step": iters, **{k: v for k, v in last.items() if k != "eval_examples"}})
        trainer.groups["policy"].save_hf(out_dir / "model")
    finally:
        trainer.shutdown()
    k = max(1, min(3, len(history)))  # first and last few iterations, for a less noisy comparison
    summary = {
        "stage": stage.name, "model": str(out_dir / "model"), "iterations": iters,
        "samples_per_iteration": stage.train.rollout_batch_size * stage.rollout.sampling.n,
        "advantage": stage.algo.advantage, "eval_prompts": len(trainer.eval_records),
        "reward_initial": float(np.mean([h["reward"] for h in history[:k]])),
        "reward_final": float(np.mean([h["reward"] for h in history[-k:]])),
        "kl_final": history[-1]["kl"],
        "iteration_s_median": float(np.median([h["iteration_s"] for h in history])),
        "wall_time_s": time.time() - t_start,
        "examples_final": last.get("eval_examples", []),
    }
    for key in ("eval_ground_truth", "eval_ground_truth_sampled", "eval_reward", "eval_reward_sampled"):
        if key in first:
            name = key.replace("eval_ground_truth", "ground_truth")
            summary[f"{name}_initial"], summary[f"{name}_final"] = first[key], last[key]
    for key in ("generate_s", "experience_s", "train_s", "sync_s"):
        summary[f"{key}_median"] = float(np.median([h[key] for h in history]))
    return summary
