"""One rank of the torchrun baseline of bench/train_step.py: the same RankEngine and batches as
the Ray ModelGroup, launched by torchrun instead of Ray. Rank 0 writes its step times as JSON."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayllm.group.engine import RankEngine, close_process_group, init_process_group  # noqa: E402


def main(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from rayllm.config import GroupConfig
    from rayllm.group.batching import count_loss_tokens, plan

    spec = json.load(open(spec_path))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                       int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    cfg = GroupConfig.model_validate(spec["group"])
    eng = RankEngine("bench", spec["model_path"], "causal_lm", cfg, trainable=True)
    rows = spec["rows"]
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        dist.barrier()
        t = time.perf_counter()
        shards = plan(rows, world, cfg.micro_batch_size, spec["pad_id"])  # as the Ray driver does
        eng.train_step(shards[rank], count_loss_tokens(rows))
        dist.barrier()  # a step ends when the slowest rank is done, as ray.get over all ranks
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    if rank == 0:
        json.dump({"step_times_s": times}, open(out_path, "w"))
    del eng
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
