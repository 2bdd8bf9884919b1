"""Collective weight transport: policy rank 0 broadcasts the gathered weights, a bucket at a time,
to every engine worker over a process group of their own (gloo on CPU, NCCL on GPU).

The channel is a torch.distributed process group built straight from a TCPStore, not through
`init_process_group`: rank 0 of the policy already belongs to its DeepSpeed group, and a process
has only one default group. Channel rank 0 is the policy's rank 0; engine e's vLLM worker of
tensor-parallel rank k is 1 + e * tp + k, so with tp > 1 every worker receives the full weights
and vLLM's loader takes its shard. Both sides know the bucket layout in advance (`WeightMeta`,
sent through Ray once per push), so each bucket is one broadcast of one flat buffer.

The object store path (the default on CPU) moves the same state dict through Ray instead; both
end in the same `prepare_state` and in-place reload, and both are verified the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# One bucket: [(name, shape), ...] in the order the sender concatenates them.
WeightMeta = list[list[tuple[str, tuple[int, ...]]]]


@dataclass(frozen=True)
class ChannelSpec:
    host: str
    port: int
    world_size: int  # 1 (the sender) + every receiving worker
    backend: str  # "gloo" (CPU) or "nccl" (GPU): chosen by device, the rest is the same code
    wire_dtype: str = "fp32"
    timeout_s: float = 120.0  # each broadcast
    rendezvous_timeout_s: float = 120.0  # forming the channel: a member that died meanwhile never joins


class Channel:
    """One member's end of the channel; keeps the store alive as long as the group."""

    def __init__(self, spec: ChannelSpec, rank: int):
        self.spec, self.rank = spec, rank
        timeout = timedelta(seconds=spec.timeout_s)
        # The store's timeout bounds the rendezvous (the group's construction waits on it for every
        # member); the group's own bounds each collective.
        self.store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=rank == 0,
                                   timeout=timedelta(seconds=spec.rendezvous_timeout_s))
        if spec.backend == "nccl":  # pragma: no cover - needs a GPU
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(self.store, rank, spec.world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, spec.world_size, timeout)
            self.device = torch.device("cpu")
        self.dtype = _DTYPES[spec.wire_dtype]

    def send(self, tensors: list[torch.Tensor]) -> int:
        """Broadcast one bucket (rank 0); returns the bytes sent."""
        flat = torch.cat([t.detach().reshape(-1).to(self.device, self.dtype) for t in tensors])
        self.pg.broadcast(flat, 0).wait()
        return flat.numel() * flat.element_size()

    def recv(self, bucket: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Receive one bucket into a flat buffer and cut it into its named tensors (views)."""
        sizes = [_numel(shape) for _, shape in bucket]
        flat = torch.empty(sum(sizes), dtype=self.dtype, device=self.device)
        self.pg.broadcast(flat, 0).wait()
        return {name: t.view(shape) for (name, shape), t in zip(bucket, flat.split(sizes))}

    def recv_all(self, meta: WeightMeta) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for bucket in meta:
            out.update(self.recv(bucket))
        return out

    def close(self) -> None:
        self.pg = self.store = None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
