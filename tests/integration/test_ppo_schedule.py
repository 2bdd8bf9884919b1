"""The policy's LR schedule spans the optimizer steps the policy takes: none during the critic's
warm-up, so a cosine schedule reaches its floor at the policy's last step."""
import json

import pytest

from rayllm.config import (
    PPO,
    GroupConfig,
    OptimizerConfig,
    PPOAlgoConfig,
    PPOTrainConfig,
    PromptDataConfig,
    RolloutConfig,
    SamplingConfig,
)
from rayllm.trainer.ppo import run_ppo

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.slow  # the suite's 25-minute budget; test_lr_schedule.py checks the schedules themselves
def test_policy_cosine_schedule_ends_at_min_lr_after_critic_warmup(tmp_path, tiny_path):
    # 2 iterations, the first the critic's warm-up; 4 prompts x 2 samples in mini-batches of 4:
    # the policy takes 2 optimizer steps, all in iteration 2 (the critic 4, two per iteration).
    (tmp_path / "rule.py").write_text("def reward(response, record):\n    return float(len(response) % 3)\n")
    lr, floor = 1e-3, 0.1
    train = GroupConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, cpus_per_rank=0.5,
                        optimizer=OptimizerConfig(lr=lr, scheduler="cosine", min_lr_ratio=floor))
    stage = PPO(
        reward_fn=f"{tmp_path / 'rule.py'}:reward",
        policy=train, critic=train, reference=GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=8,
                                                          cpus_per_rank=0.5),
        rollout=RolloutConfig(cpus_per_engine=0.5, sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=8)),
        data=PromptDataConfig(num_prompts=16, eval_prompts=0),
        algo=PPOAlgoConfig(mini_batch_size=4, ppo_epochs=1),
        train=PPOTrainConfig(iterations=2, rollout_batch_size=4, critic_warmup=1),
    )
    run_ppo(stage, tmp_path / "ppo", 0, {"sft": str(tiny_path)}, progress=False)
    metrics = {m["step"]: m for m in map(json.loads, (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines())
               if "reward" in m}
    assert "policy_lr" not in metrics[1]  # warm-up: the policy did not step
    # policy_lr is the LR after the iteration's last policy step, i.e. after the scheduler has
    # stepped past it: after the policy's last step of the stage the schedule's end, which for a
    # cosine is min_lr_ratio * lr. Sized by all 4 steps (warm-up counted) it would be halfway
    # down the cosine: (0.1 + 0.9 * 0.5) * lr = 5.5e-4.
    assert metrics[2]["policy_lr"] == pytest.approx(floor * lr, rel=1e-9)
