"""The demo: supervised fine-tuning of a tiny Llama on the bundled arithmetic task, on a local
Ray cluster, with two DeepSpeed ZeRO-2 ranks.

The training split is prepared on the fly on Ray Data (exact and near duplicates removed,
decontaminated against the held-out split, packed into 128-token rows with no attention across
examples) and the ranks read the packed rows themselves.

    rayllm run pipelines/sft_tiny.py            # or: python pipelines/sft_tiny.py
    rayllm run pipelines/sft_tiny.py --set sft.group.zero_stage=3 --set sft.train.epochs=1
"""
from rayllm import SFT, GroupConfig, ModelConfig, OptimizerConfig, Pipeline, PrepSettings, SFTDataConfig, TrainConfig

PIPELINE = Pipeline(
    name="sft_tiny",
    stages=[
        SFT(
            model=ModelConfig(tiny="tiny-8m"),
            group=GroupConfig(
                num_ranks=2,
                zero_stage=2,
                micro_batch_size=4,
                optimizer=OptimizerConfig(lr=2e-3, warmup_steps=10, scheduler="cosine"),
            ),
            data=SFTDataConfig(source="bundled:arithmetic", num_examples=8192, max_length=64,
                               prep=PrepSettings(seq_len=128)),
            train=TrainConfig(global_batch_size=8, epochs=3, eval_every=40, checkpoint_every=50),
        )
    ],
)

if __name__ == "__main__":
    import sys

    from rayllm.cli import main

    sys.exit(main(["run", __file__, *sys.argv[1:]]))
