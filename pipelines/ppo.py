"""PPO, one stage, on four model groups: point it at an SFT policy and a reward model.

    rayllm run pipelines/ppo.py --set ppo.policy_model.path=/models/sft \
        --set 'ppo.reward_model={path: /models/rm}' --set ppo.reward_fn=null \
        --set ppo.data.source=data/prompts.jsonl --set ppo.policy.num_ranks=8 --set ppo.policy.zero_stage=3 \
        --set ppo.policy.gpus_per_rank=1 --set ppo.critic.gpus_per_rank=1 --set ppo.rollout.num_engines=4

A rule-based reward instead of a model: --set ppo.reward_fn=my_rewards.py:score. A served reward
model (`rayllm serve --reward /models/rm`): --set ppo.reward_url=http://127.0.0.1:8000/score --set ppo.reward_fn=null.
Critic-free: --set ppo.algo.advantage=grpo --set ppo.rollout.sampling.n=8.
Defaults run as is on a CPU (tiny-1m models, the bundled arithmetic task's checker as reward).
"""
from rayllm import (
    PPO,
    GroupConfig,
    ModelConfig,
    OptimizerConfig,
    Pipeline,
    PPOAlgoConfig,
    PPOTrainConfig,
    PromptDataConfig,
    RolloutConfig,
    SamplingConfig,
)

PIPELINE = Pipeline(
    name="ppo",
    stages=[PPO(
        policy_model=ModelConfig(tiny="tiny-1m"),  # replace with policy_model.path=<your SFT model>
        reward_fn="rayllm.datasets.tasks:arithmetic_score",  # or reward_model.path=<your reward model>
        policy=GroupConfig(num_ranks=1, zero_stage=2, micro_batch_size=8, cpus_per_rank=0.5,
                           optimizer=OptimizerConfig(lr=1e-6, scheduler="constant")),
        critic=GroupConfig(num_ranks=1, zero_stage=2, micro_batch_size=8, cpus_per_rank=0.5,
                           optimizer=OptimizerConfig(lr=9e-6, scheduler="constant")),
        reference=GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=16, colocate_with="policy"),
        reward=GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=16, colocate_with="critic"),
        rollout=RolloutConfig(num_engines=1, cpus_per_engine=0.5,
                              sampling=SamplingConfig(n=1, temperature=1.0, max_tokens=64)),
        data=PromptDataConfig(source="bundled:arithmetic", num_prompts=4096, eval_prompts=128),
        algo=PPOAlgoConfig(advantage="gae", kl_coef=0.01, ppo_epochs=1, mini_batch_size=32),
        train=PPOTrainConfig(iterations=20, rollout_batch_size=64, eval_every=5),
    )],
)

if __name__ == "__main__":
    import sys

    from rayllm.cli import main

    sys.exit(main(["run", __file__, *sys.argv[1:]]))
