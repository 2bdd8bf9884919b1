"""PPO on four model groups (tiny-1m): one iteration updates the policy and the critic and leaves
the reference and the reward model untouched; colocated groups share bundles; the pushed policy
is verified in the engine; critic-free estimators run without a critic group."""
import json

import numpy as np
import pytest

from rayllm.config import (
    PPO,
    GroupConfig,
    ModelConfig,
    OptimizerConfig,
    PPOAlgoConfig,
    PPOTrainConfig,
    PromptDataConfig,
    RolloutConfig,
    SamplingConfig,
)
from rayllm.trainer.ppo import PPOTrainer

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _stage(**kw) -> PPO:
    train = GroupConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, cpus_per_rank=0.5,
                        optimizer=OptimizerConfig(lr=1e-3, scheduler="constant"))
    frozen = GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=8, cpus_per_rank=0.5)
    base = dict(
        policy=train, critic=train, reference=frozen, reward=frozen,
        rollout=RolloutConfig(cpus_per_engine=0.5, sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=8)),
        data=PromptDataConfig(num_prompts=32, eval_prompts=4),
        algo=PPOAlgoConfig(mini_batch_size=8, ppo_epochs=2),
        train=PPOTrainConfig(iterations=1, rollout_batch_size=8),
    )
    return PPO(**{**base, **kw})


def _snapshot(group) -> dict:
    return {k: v.clone() for k, v in group.full_state_dict().items()}


def _changed(a: dict, b: dict) -> bool:
    return any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_ppo_iteration_trains_policy_and_critic_only(tmp_path, tiny_path):
    # Policy and reference colocated on one placement group, critic and reward on another.
    stage = _stage(
        reward_model=ModelConfig(tiny="tiny-1m", seed=1),
        policy=GroupConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, cpus_per_rank=0.5,
                           optimizer=OptimizerConfig(lr=1e-3, scheduler="constant")),
        reference=GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=8, colocate_with="policy"),
        reward=GroupConfig(num_ranks=1, zero_stage=3, micro_batch_size=8, colocate_with="critic"),
    )
    t = PPOTrainer(stage, tmp_path, seed=0, artifacts={"sft": str(tiny_path)})
    try:
        assert set(t.groups) == {"policy", "reference", "reward", "critic"}
        assert t.groups["policy"].placement is t.groups["reference"].placement
        assert t.groups["critic"].placement is t.groups["reward"].placement
        assert t.groups["policy"].placement is not t.groups["critic"].placement
        before = {r: _snapshot(g) for r, g in t.groups.items()}
        exp = t.make_experience(t.next_prompts(), 1)
        m = exp["metrics"]
        assert exp["n"] == 16 and len(exp["critic_rows"]) == 16
        # The first batch is sampled from the reference itself: KL 0, and the engine's log-probs
        # are the trainer's (fp32).
        assert abs(m["kl"]) < 1e-4 and m["engine_trainer_logprob_gap"] < 1e-4
        row = exp["policy_rows"][0]
        assert len(row["old_logprobs"]) == len(row["advantages"]) == len(row["input_ids"]) - 1
        # Critic warm-up: only the critic steps.
        assert "policy_loss" not in t.train(exp, policy=False)
        warm = {r: _snapshot(t.groups[r]) for r in ("policy", "critic")}
        assert not _changed(before["policy"], warm["policy"]) and _changed(before["critic"], warm["critic"])
        stats = t.train(exp)
        assert all(np.isfinite(v) for v in stats.values())
        # 2 epochs x 2 mini-batches: the first update's ratio is exactly 1 (the policy has not moved
        # since it computed the old log-probs), so nothing is clipped in 1 of the 4 updates.
        assert stats["value_loss"] > 0 and stats["clipfrac"] <= 0.75
        after = {r: _snapshot(g) for r, g in t.groups.items()}
        assert _changed(before["policy"], after["policy"]) and _changed(warm["critic"], after["critic"])
        assert not _changed(before["reference"], after["reference"])
        assert not _changed(before["reward"], after["reward"])
        sync = t.sync()
        assert sync["sync_mean_gap"] < 1e-5 and sync["sync_max_gap"] < 1e-4 and sync["sync_attempts"] == 1
        # Sampled from the updated policy now: it has moved away from the reference.
        assert t.make_experience(t.next_prompts(), 2)["metrics"]["kl"] != 0.0
    finally:
        t.shutdown()


# REINFORCE++ takes the same critic-free path as GRPO (its advantages: tests/unit/test_advantages.py).
@pytest.mark.parametrize("advantage", ["grpo", pytest.param("reinforce_pp", marks=pytest.mark.slow)])
def test_critic_free_estimators_train_without_a_critic(tmp_path, tiny_path, advantage):
    # A rule-based reward from a file that varies across samples (a random model never answers
    # right, so the ground truth would give every sample 0 and GRPO nothing to learn from).
    (tmp_path / "rule.py").write_text("def reward(response, record):\n    return float(len(response) % 3)\n")
    stage = _stage(reward_fn=f"{tmp_path / 'rule.py'}:reward", algo=PPOAlgoConfig(
        advantage=advantage, mini_batch_size=8, kl_estimator="k3"))
    t = PPOTrainer(stage, tmp_path, seed=0, artifacts={"sft": str(tiny_path)})
    try:
        assert set(t.groups) == {"policy", "reference"}
        before = _snapshot(t.groups["policy"])
        exp = t.make_experience(t.next_prompts(), 1)
        assert exp["critic_rows"] == []
        stats = t.train(exp)
        assert "value_loss" not in stats and np.isfinite(stats["policy_loss"])
        assert _changed(before, _snapshot(t.groups["policy"]))
        ev = t.evaluate()
        # One step from a random init does not teach arithmetic: no held-out prompt answered right.
        assert ev["eval_ground_truth"] == 0.0 and len(ev["eval_examples"]) == 4
    finally:
        t.shutdown()


def test_engine_log_probs_as_behaviour_policy(tmp_path, tiny_path):
    """behavior_logprobs="engine": the ratio's denominator is exactly what the engine sampled
    with, and the policy group's experience forward is skipped (no gap metric to report)."""
    (tmp_path / "rule.py").write_text("def reward(response, record):\n    return float(len(response) % 3)\n")
    stage = _stage(reward_fn=f"{tmp_path / 'rule.py'}:reward",
                   algo=PPOAlgoConfig(advantage="rloo", mini_batch_size=8, behavior_logprobs="engine", tis_cap=None))
    t = PPOTrainer(stage, tmp_path, seed=0, artifacts={"sft": str(tiny_path)})
    try:
        calls = []
        policy = t.groups["policy"]
        real = policy.logprobs_async
        policy.logprobs_async = lambda *a, **k: calls.append(a) or real(*a, **k)
        samples = []
        real_gen = t.pool.generate
        t.pool.generate = lambda *a, **k: samples.extend(real_gen(*a, **k)) or samples
        exp = t.make_experience(t.next_prompts(), 1)
        assert calls == [] and "engine_trainer_logprob_gap" not in exp["metrics"]
        for x, row in zip(samples, exp["policy_rows"]):
            assert row["old_logprobs"][len(x.prompt_ids) - 1:] == pytest.approx(x.logprobs, abs=1e-6)
        # The engine computes what the trainer does (fp32), so the trainer's own log-probs agree.
        mine = policy.logprobs([{"input_ids": r["input_ids"]} for r in exp["policy_rows"]])
        for x, row, lp in zip(samples, exp["policy_rows"], mine):
            p = len(x.prompt_ids)
            assert np.allclose(lp[p - 1:], row["old_logprobs"][p - 1:], atol=1e-4)
        before = _snapshot(policy)
        stats = t.train(exp)
        assert np.isfinite(stats["policy_loss"]) and _changed(before, _snapshot(policy))
    finally:
        t.shutdown()


def test_missing_inputs_are_named(tmp_path, tiny_path):
    with pytest.raises(ValueError, match="no policy model"):
        PPOTrainer(_stage(reward_fn="rayllm.datasets.tasks:arithmetic_score"), tmp_path, 0, {})
    with pytest.raises(ValueError, match="no reward"):
        PPOTrainer(_stage(), tmp_path, 0, {"sft": str(tiny_path)})
    from rayllm.hooks import HookError

    with pytest.raises(HookError, match="reward_fn 'nope:fn'"):
        PPOTrainer(_stage(reward_fn="nope:fn"), tmp_path, 0, {"sft": str(tiny_path)})


@pytest.mark.slow  # 73 s, the suite's 25-minute budget; PPO's resume from its checkpoint stays in make test in
# test_ppo_sync_failure.py (the rerun after a failed push resumes after the checkpointed iteration)
def test_driver_crash_mid_ppo_resumes_at_its_checkpoint(tmp_path, tiny_path, monkeypatch):
    """The driver raises in iteration 4 (in its call to PPOTrainer.train; no rank or engine
    process dies) with a checkpoint after iteration 2 (iteration 1 is the critic's warm-up): the
    rerun does iterations 3 and 4 once more, and its iteration 3 is the one the first run had
    (same prompts, samples, shuffles, KL coefficient and reward statistics, same policy and critic
    in the engine and the groups), so nothing but time is lost."""
    from rayllm.trainer.ppo import run_ppo

    stage = _stage(reward_model=ModelConfig(tiny="tiny-1m", seed=1),
                   algo=PPOAlgoConfig(mini_batch_size=8, ppo_epochs=2, kl_target=0.1, reward_normalize=True),
                   data=PromptDataConfig(num_prompts=32, eval_prompts=0),
                   train=PPOTrainConfig(iterations=4, rollout_batch_size=4, checkpoint_every=2, critic_warmup=1))
    real, calls = PPOTrainer.train, {"n": 0}

    def driver_raises_in_iteration_4(self, exp, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("driver crash (injected)")
        return real(self, exp, **kw)

    monkeypatch.setattr(PPOTrainer, "train", driver_raises_in_iteration_4)
    out, arts = tmp_path / "ppo", {"sft": str(tiny_path)}
    with pytest.raises(RuntimeError, match=r"driver crash \(injected\)"):
        run_ppo(stage, out, 0, arts, progress=False)
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first if "reward" in m] == [1, 2, 3]
    # The adaptive KL coefficient holds still while the policy does (critic warm-up), then moves.
    assert first[1]["kl_coef"] == first[2]["kl_coef"] == 0.05 != first[3]["kl_coef"]
    assert json.loads((out / "checkpoints" / "trainer.json").read_text())["iteration"] == 2
    s = run_ppo(stage, out, 0, arts, progress=False)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # The first run's line of iteration 3 (after the checkpoint) is dropped on resume, and the
    # rerun writes it again: each iteration once.
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2, 3, 4]
    # The ledger: 4 prompts per iteration, taken in order through the 32-prompt set.
    assert [m["sample_ids"] for m in metrics if "reward" in m] == [list(range(4 * i, 4 * i + 4)) for i in range(4)]
    was, now = first[-1], next(m for m in metrics if m.get("step") == 3 and "reward" in m)
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "response_length"):
        assert now[key] == pytest.approx(was[key], rel=1e-4, abs=1e-5), key
    assert s["iterations"] == 4 and (out / "model" / "config.json").is_file()
    assert s["reward_initial"] == pytest.approx(np.mean([m["reward"] for m in first[1:4]]))  # history kept

    other = stage.model_copy(update={"algo": PPOAlgoConfig(mini_batch_size=8, kl_coef=0.3)})
    with pytest.raises(ValueError, match="another config"):
        run_ppo(other, out, 0, arts, progress=False)


def test_a_later_ppo_stage_continues_from_the_earlier_policy(tmp_path):
    """Iterated RLHF (SFT, RM, PPO, RM, PPO): the second PPO stage starts from the first one's
    policy and keeps the SFT model as its reference; the first starts from the SFT model."""
    from pathlib import Path

    from rayllm.trainer.ppo import resolve_inputs

    first = resolve_inputs(_stage(), tmp_path, 0, {"sft": "/m/sft", "reward": "/m/rm"})
    assert first == {"policy": Path("/m/sft"), "reference": Path("/m/sft"), "reward": Path("/m/rm"),
                     "critic": Path("/m/rm")}
    second = resolve_inputs(_stage(), tmp_path, 0, {"sft": "/m/sft", "reward": "/m/rm2", "ppo": "/m/ppo"})
    assert second == {"policy": Path("/m/ppo"), "reference": Path("/m/sft"), "reward": Path("/m/rm2"),
                      "critic": Path("/m/rm2")}
