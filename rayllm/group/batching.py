"""Split a global batch across ranks and micro-batches, for whatever the world size is now.

Nothing here assumes a fixed world size: the same global batch is cut into the same
micro-batches whatever the number of ranks, and ranks are handed contiguous runs of them, so
one rank or two compute the same sums. When micro-batches do not divide evenly, ranks that come
up short get filler micro-batches with an all-zero loss mask: they run the same collectives
(ZeRO-2/3 reduce and gather in every backward) but add nothing to the gradient.
"""
from __future__ import annotations

import math

import torch

from rayllm.data.stream import RowRefs, resolve_rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of token lists into tensors. Each row has input_ids and, for training,
    loss_mask (1 where the token's prediction is counted)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    loss = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        attn[i, :n] = 1
        if "loss_mask" in r:
            loss[i, :n] = torch.as_tensor(r["loss_mask"])
    out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    for key in rows[0].keys() - {"input_ids", "loss_mask", "position_ids"}:
        # Per-target values (PPO's old log-probs, advantages, ...): [B, T-1], aligned with
        # input_ids[:, 1:], zero past each row's end.
        vals = torch.zeros((len(rows), T - 1), dtype=torch.float32)
        for i, r in enumerate(rows):
            vals[i, : len(r[key])] = torch.as_tensor(r[key], dtype=torch.float32)
        out[key] = vals
    if "position_ids" in rows[0]:
        # Packed rows: documents are told apart by positions restarting at 0; right padding
        # continues as one more such "document", so nothing real attends to it.
        pos = torch.arange(T, dtype=torch.long).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["position_ids"])
            pos[i, :n] = torch.as_tensor(r["position_ids"])
            pos[i, n:] -= n
        out["position_ids"] = pos
    return out


def filler(mb: dict) -> dict:
    if "refs" in mb:  # a reference: the rank reads it and zeroes the mask (materialize)
        return {**mb, "filler": True}
    return {**mb, "loss_mask": torch.zeros_like(mb["loss_mask"]), "filler": True}


def plan(rows: list[dict] | RowRefs, world_size: int, micro_batch_size: int, pad_id: int) -> list[list[dict]]:
    """Per-rank lists of micro-batches; every rank gets the same number.

    Rows given as token lists are collated here; rows given by reference (RowRefs into a packed
    dataset) become references to micro-batches, which each rank reads itself (`materialize`).
    """
    if not len(rows):
        raise ValueError("empty batch")
    if isinstance(rows, RowRefs):
        mbs = [{"refs": RowRefs(rows.path, rows.ids[i: i + micro_batch_size]), "pad_id": pad_id}
               for i in range(0, len(rows), micro_batch_size)]
    else:
        mbs = [collate(rows[i: i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]
    per_rank = math.ceil(len(mbs) / world_size)
    shards = [mbs[r * per_rank: (r + 1) * per_rank] for r in range(world_size)]
    return [s + [filler(mbs[-1])] * (per_rank - len(s)) for s in shards]


def materialize(mb: dict) -> dict:
    """A micro-batch as tensors, reading it from its packed dataset if it came by reference."""
    if "refs" not in mb:
        return mb
    out = collate(resolve_rows(mb["refs"]), mb["pad_id"])
    return filler(out) if mb.get("filler") else out


def count_loss_tokens(rows: list[dict]) -> int:
    """Target tokens of a batch: a token's prediction counts when its mask is set, except the
    first token of a row, which nothing predicts."""
    return sum(int(sum(r["loss_mask"][1:])) for r in rows)
