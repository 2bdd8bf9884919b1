"""The demo: SFT -> reward model -> PPO on the bundled sort task, on a local Ray cluster.

The task has a programmatic ground truth ("Sort: 7 3 9 1 4" is answered right iff the response is
"1 3 4 7 9"), so each stage's effect is measured against the truth, not only against the reward
model:

  1. SFT: a tiny Llama (tiny-8m) on two ZeRO-2 ranks, on imperfect demonstrations
     (`sort_unique_noisy`: 35% near misses): it learns to sort and also to make those mistakes
     when it samples;
  2. reward model: the SFT model with a scalar head, Bradley-Terry loss on pairs (the sorted list
     against a near miss, hand-made or sampled from the SFT policy); reports held-out pairwise
     accuracy;
  3. PPO: policy and critic (trainable), reference and reward model (frozen) as four DeepSpeed
     groups (policy with its reference and the critic with the reward model colocated), a vLLM
     engine for rollouts with verified weight pushes, GAE advantages after a critic warm-up; the
     ground-truth score of the SFT policy and the PPO policy on held-out prompts, greedy and
     sampled, is printed at the end.

Distinct digits (`sort_unique`), because on `sort` (repeats allowed) the 6.8M reward model could
not tell a miscount ("3 4 7 7 8 9 9" for "3 4 7 7 7 8 9") from the truth and PPO moved its
greedy answers there (docs/demo.md, "How the demo got here").

    rayllm run pipelines/rlhf_tiny.py             # or: python pipelines/rlhf_tiny.py
    rayllm run pipelines/rlhf_tiny.py --set ppo.algo.advantage=grpo --set ppo.algo.kl_coef=0.05
"""
from rayllm import (
    PPO,
    SFT,
    GroupConfig,
    ModelConfig,
    OptimizerConfig,
    Pipeline,
    PolicySamplesConfig,
    PPOAlgoConfig,
    PPOTrainConfig,
    PreferenceDataConfig,
    PrepSettings,
    PromptDataConfig,
    RewardModel,
    RolloutConfig,
    SamplingConfig,
    SFTDataConfig,
    TrainConfig,
)

# Trainable groups share the 4 logical CPUs Ray is started with (on this 2-core machine).
TRAIN = dict(zero_stage=2, micro_batch_size=8, cpus_per_rank=0.5)
# One rank: ZeRO has nothing to shard, and its bookkeeping made a tiny-8m step 1.5x slower.
ONE_RANK = dict(num_ranks=1, zero_stage=0, micro_batch_size=8, cpus_per_rank=0.5)

PIPELINE = Pipeline(
    name="rlhf_tiny",
    stages=[
        SFT(
            model=ModelConfig(tiny="tiny-8m"),
            group=GroupConfig(num_ranks=2, zero_stage=2, micro_batch_size=4,
                              optimizer=OptimizerConfig(lr=2e-3, warmup_steps=10, scheduler="cosine")),
            data=SFTDataConfig(source="bundled:sort_unique_noisy", num_examples=8192, max_length=64,
                               prep=PrepSettings(seq_len=128)),
            train=TrainConfig(global_batch_size=8, epochs=1, max_steps=200, eval_every=50),
        ),
        RewardModel(
            group=GroupConfig(num_ranks=2, **TRAIN, optimizer=OptimizerConfig(lr=5e-4, warmup_steps=10)),
            data=PreferenceDataConfig(source="bundled:sort_unique", num_examples=6144, max_length=64),
            # The SFT policy's own mistakes, labelled by the task's checker, as rejected responses.
            policy_samples=PolicySamplesConfig(
                num_prompts=2048, max_pairs_per_prompt=2,
                rollout=RolloutConfig(num_engines=1, cpus_per_engine=1.0, chunk_size=128,
                                      sampling=SamplingConfig(n=4, temperature=1.0, max_tokens=16))),
            train=TrainConfig(global_batch_size=32, epochs=1, eval_every=100),
        ),
        PPO(
            policy=GroupConfig(**ONE_RANK, optimizer=OptimizerConfig(lr=5e-5, scheduler="constant")),
            critic=GroupConfig(**ONE_RANK, optimizer=OptimizerConfig(lr=1e-4, scheduler="constant")),
            reference=GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=16, colocate_with="policy"),
            reward=GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=16, colocate_with="critic"),
            rollout=RolloutConfig(num_engines=1, cpus_per_engine=0.5, chunk_size=32,
                                  sampling=SamplingConfig(n=4, temperature=1.0, max_tokens=16)),
            data=PromptDataConfig(source="bundled:sort_unique", num_prompts=4096, eval_prompts=256),
            algo=PPOAlgoConfig(advantage="gae", kl_coef=0.1, ppo_epochs=2, mini_batch_size=32,
                               reward_normalize=True),
            train=PPOTrainConfig(iterations=40, rollout_batch_size=32, eval_every=10, critic_warmup=5),
        ),
    ],
)

if __name__ == "__main__":
    import sys

    from rayllm.cli import main

    sys.exit(main(["run", __file__, *sys.argv[1:]]))
