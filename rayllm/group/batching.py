"""Split a global batch across ranks and micro-batches, for whatever the world size is now,
and in proportion to the ranks' speeds (docs/heterogeneous.md).

Nothing here assumes a fixed world size: the same global batch is cut into the same
micro-batches whatever the number of ranks, and ranks are handed contiguous runs of them, so
one rank or two compute the same sums. Where every rank must run as many micro-batches as the
others ("lockstep": ZeRO-2/3 reduce in every backward, ZeRO-3 gathers in every forward), ranks
that come up short get fillers: one or two rows of two tokens with an all-zero loss mask, which
run the same collectives at almost no compute and add nothing to the gradient.

With speed shares, a rank is handed a run of the batch whose token count follows its share:
- not lockstep (ZeRO-0/1 train, forwards below ZeRO-3): a run of the same micro-batches, so the
  sums are exactly those of any other split;
- lockstep: a run of rows, cut into as many micro-batches as the busiest rank needs, so a slow
  rank's micro-batches hold fewer rows and every rank reaches each reduction together (the
  micro-batches differ from an even split's: the sums are equal to rounding).
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
    """A zero-weight stand-in for `mb`: its first two rows (a pair, for the pairwise loss) cut to
    two tokens, with every per-row field kept, so any loss runs on it, at almost no compute."""
    if "refs" in mb:  # a reference: the rank reads it and makes the filler (materialize)
        return {**mb, "refs": RowRefs(mb["refs"].path, mb["refs"].ids[:2]), "filler": True}
    T = mb["input_ids"].shape[1]
    keep = min(2, T)
    out = {}
    for k, v in mb.items():
        if torch.is_tensor(v) and v.dim() == 2:  # [B, T] per token, or [B, T-1] per target
            v = v[:2, :keep] if v.shape[1] == T else v[:2, : keep - 1]
        out[k] = v
    return {**out, "loss_mask": torch.zeros_like(out["loss_mask"]), "filler": True}


def _runs(costs: list[float], shares: list[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of `costs`, one per share, each run's cost as near its share
    of the total as the items allow, and at least one item each while there are enough."""
    n, k = len(costs), len(shares)
    cum = [0.0]
    for c in costs:
        cum.append(cum[-1] + c)
    total, weight = cum[-1], sum(shares)
    bounds, acc = [0], 0.0
    for r in range(k - 1):
        acc += shares[r]
        target = total * acc / weight
        j = min(range(bounds[-1], n + 1), key=lambda i: abs(cum[i] - target))
        lo = bounds[-1] + (1 if n - bounds[-1] >= k - r else 0)  # this rank gets one
        hi = max(lo, n - (k - r - 1)) if n >= k else n  # and leaves one for each after it
        bounds.append(min(max(j, lo), hi))
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


def _micro_batches(rows, micro_batch_size: int, pad_id: int) -> list[dict]:
    if isinstance(rows, RowRefs):
        return [{"refs": RowRefs(rows.path, rows.ids[i: i + micro_batch_size]), "pad_id": pad_id}
                for i in range(0, len(rows), micro_batch_size)]
    return [collate(rows[i: i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]


def _cost(rows) -> list[float]:
    """Tokens per row: a rank's work (rows by reference are packed, all of one length)."""
    return [1.0] * len(rows) if isinstance(rows, RowRefs) else [float(len(r["input_ids"])) for r in rows]


def plan(rows: list[dict] | RowRefs, world_size: int, micro_batch_size: int, pad_id: int,
         shares: list[float] | None = None, lockstep: bool = True, unit: int = 1,
         by_rows: bool = True) -> list[list[dict]]:
    """Per-rank lists of micro-batches (see the module docstring): an even split without
    `shares`, else runs in proportion to them. `lockstep`: every rank gets the same number.
    `unit`: rows that stay together in one micro-batch (2 for the pairwise loss's pairs).
    `by_rows=False` keeps runs of whole micro-batches in lockstep too, topped up with fillers
    (measured against rows in docs/heterogeneous.md: it cannot speed up a lockstep step).

    Rows given as token lists are collated here; rows given by reference (RowRefs into a packed
    dataset) become references to micro-batches, which each rank reads itself (`materialize`).
    """
    if not len(rows):
        raise ValueError("empty batch")
    if shares is not None and len(shares) != world_size:
        raise ValueError(f"{len(shares)} shares for {world_size} ranks")
    if shares is None or not lockstep or not by_rows:
        mbs = _micro_batches(rows, micro_batch_size, pad_id)
        if shares is None:
            per_rank = math.ceil(len(mbs) / world_size)
            shards = [mbs[r * per_rank: (r + 1) * per_rank] for r in range(world_size)]
        else:
            mb_cost = [sum(c) for c in _chunks(_cost(rows), micro_batch_size)]
            shards = [mbs[a:b] for a, b in _runs(mb_cost, shares)]
        count = max(len(s) for s in shards) if lockstep else 1
        return [s + [filler(mbs[-1])] * (count - len(s)) for s in shards]
    # lockstep with shares: runs of rows (whole units), each cut into the same number of micro-batches
    unit_cost = [sum(c) for c in _chunks(_cost(rows), unit)]
    runs = [(a * unit, min(b * unit, len(rows))) for a, b in _runs(unit_cost, shares)]
    per_mb = max(1, micro_batch_size // unit)  # units per micro-batch
    count = max(math.ceil((b - a) / unit / per_mb) for a, b in runs)
    shards = []
    for a, b in runs:
        units = math.ceil((b - a) / unit)
        sizes = [units // count + (1 if i < units % count else 0) for i in range(count)]
        out, at = [], a
        for size in sizes:
            if size:
                out += _micro_batches(_slice(rows, at, at + size * unit), size * unit, pad_id)
                at += size * unit
        shards.append(out)
    some = next(s[0] for s in shards if s)
    return [s + [filler(some)] * (count - len(s)) for s in shards]


def _slice(rows, a: int, b: int):
    return RowRefs(rows.path, rows.ids[a:b]) if isinstance(rows, RowRefs) else rows[a:b]


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i: i + n] for i in range(0, len(xs), n)]


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
