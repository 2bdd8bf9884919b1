"""Reward model, one stage: a scalar head on an SFT model, trained on preference pairs.

    rayllm run pipelines/reward.py --set reward.model.path=/models/sft \
        --set reward.data.source=data/prefs.jsonl --set reward.group.num_ranks=8 --set reward.group.gpus_per_rank=1

`reward.data.source` is a JSONL of {prompt, chosen, rejected} (rename with data.*_field).
"""
from rayllm import GroupConfig, ModelConfig, OptimizerConfig, Pipeline, PreferenceDataConfig, RewardModel, TrainConfig

PIPELINE = Pipeline(
    name="reward",
    stages=[RewardModel(
        model=ModelConfig(tiny="tiny-8m"),  # replace with model.path=<your SFT model>
        group=GroupConfig(num_ranks=2, zero_stage=2, micro_batch_size=8,
                          optimizer=OptimizerConfig(lr=9e-6, warmup_steps=20, scheduler="cosine")),
        data=PreferenceDataConfig(source="bundled:arithmetic", max_length=512),
        train=TrainConfig(global_batch_size=64, epochs=1, eval_every=100, checkpoint_every=200),
    )],
)

if __name__ == "__main__":
    import sys

    from rayllm.cli import main

    sys.exit(main(["run", __file__, *sys.argv[1:]]))
