"""Supervised fine-tuning, one stage, sized by config: point it at your model and data.

    rayllm run pipelines/sft.py --set sft.model.path=/models/base --set sft.data.source=data/sft.jsonl \
        --set sft.group.num_ranks=8 --set sft.group.gpus_per_rank=1 --set sft.group.precision.dtype=bf16

Defaults run as is on a CPU (tiny-8m, bundled arithmetic), for a quick check of a setup.
"""
from rayllm import SFT, GroupConfig, OptimizerConfig, Pipeline, SFTDataConfig, TrainConfig

PIPELINE = Pipeline(
    name="sft",
    stages=[SFT(
        group=GroupConfig(num_ranks=2, zero_stage=2, micro_batch_size=4,
                          optimizer=OptimizerConfig(lr=2e-5, warmup_steps=20, scheduler="cosine")),
        data=SFTDataConfig(source="bundled:arithmetic", max_length=512),
        train=TrainConfig(global_batch_size=32, epochs=1, eval_every=100, checkpoint_every=200),
    )],
)

if __name__ == "__main__":
    import sys

    from rayllm.cli import main

    sys.exit(main(["run", __file__, *sys.argv[1:]]))
