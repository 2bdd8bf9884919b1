"""Split a global batch across ranks and micro-batches, for whatever the world size is now,
and in proportion to the ranks' speeds (docs/heterogeneous.md).

Nothing here assumes a fixed world size: the same global batch is cut into the same
micro-batches whatever the number of ranks, and ranks are handed contiguous runs of them, so
one rank or two compute the same sums. Where every rank must run as many micro-batches as the
others ("lockstep": ZeRO-2/3 reduce in every backward, ZeRO-3 gathers in every forward), ranks
that come up short get fillers: one or two rows of two tokens with an all-zero loss mask, which
run the same collectives at almost no compute and add nothing to the gradient.

With the ranks' measured costs (speed.RankCost: seconds per micro-batch plus per token), each
rank is handed a contiguous run of the batch so that the slowest predicted rank is as fast as
it can be:
- not lockstep (ZeRO-0/1 train, forwards below ZeRO-3): a run of the same micro-batches, so the
  sums are exactly those of any other split;
- lockstep: a run of rows, cut into a count of micro-batches chosen with the runs (more let a
  fast rank hold more rows, each within micro_batch_size, but cost every rank its fixed time per
  micro-batch), so a slow rank's micro-batches hold fewer rows and every rank reaches each
  reduction together (the micro-batches differ from an even split's: the sums are equal to
  rounding).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import replace

import torch

from rayllm.data.stream import RowRefs, resolve_rows
from rayllm.group.speed import RankCost


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
        return {**mb, "refs": replace(mb["refs"], ids=mb["refs"].ids[:2]), "filler": True}
    T = mb["input_ids"].shape[1]
    keep = min(2, T)
    out = {}
    for k, v in mb.items():
        if torch.is_tensor(v) and v.dim() == 2:  # [B, T] per token, or [B, T-1] per target
            v = v[:2, :keep] if v.shape[1] == T else v[:2, : keep - 1]
        out[k] = v
    return {**out, "loss_mask": torch.zeros_like(out["loss_mask"]), "filler": True}


def _partition(costs: list[float], ranks: list[RankCost], count: int | None = None,
               cap: int | None = None) -> tuple[list[tuple[int, int]], float]:
    """Contiguous [start, end) runs of items (of `costs` tokens each), one per rank in order,
    that minimise the slowest rank's predicted seconds, and those seconds. A rank's time is
    `ranks[r].seconds(micro-batches, tokens)`, where each item is a micro-batch, or, in
    lockstep, every rank runs `count` micro-batches and takes at most `cap` items. Each rank
    keeps at least one item while there are enough, so a slow rank's speed is still measured
    as it drifts. The smallest feasible time is found by bisection; for a given time, greedily
    giving each rank all it can finish is optimal for contiguous runs."""
    n, k = len(costs), len(ranks)
    cum = [0.0]
    for c in costs:
        cum.append(cum[-1] + c)

    def seconds(r: int, i: int, j: int) -> float:
        return ranks[r].seconds(count if count is not None else j - i, cum[j] - cum[i])

    def greedy(limit: float) -> list[int] | None:
        bounds = [0]
        for r in range(k):
            i = bounds[-1]
            keep = 1 if n - i >= k - r else 0  # this rank gets one
            hi = n - (k - r - 1 if n >= k else 0)  # and leaves one for each after it
            if cap is not None:
                hi = min(hi, i + cap)
            j = bisect.bisect_right(range(i, hi + 1), limit, key=lambda j: seconds(r, i, j)) - 1 + i
            bounds.append(max(j, i + keep))
        return bounds if bounds[-1] >= n else None

    lo, hi = 0.0, max(seconds(r, 0, n) for r in range(k)) + 1e-9
    best = greedy(hi)
    if best is None:  # the caps cannot hold every item (count too small): no plan at this count
        return [], math.inf
    for _ in range(40):
        mid = (lo + hi) / 2
        got = greedy(mid)
        if got is None:
            lo = mid
        else:
            best, hi = got, mid
    best[-1] = n
    runs = list(zip(best[:-1], best[1:]))
    return runs, max(seconds(r, a, b) for r, (a, b) in enumerate(runs))


def _micro_batches(rows, micro_batch_size: int, pad_id: int) -> list[dict]:
    if isinstance(rows, RowRefs):
        return [{"refs": replace(rows, ids=rows.ids[i: i + micro_batch_size]), "pad_id": pad_id}
                for i in range(0, len(rows), micro_batch_size)]
    return [collate(rows[i: i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]


def _cost(rows) -> list[float]:
    """Tokens per row: a rank's work (rows by reference are packed, all of one length)."""
    if isinstance(rows, RowRefs):
        return [float(rows.row_tokens or 1)] * len(rows)
    return [float(len(r["input_ids"])) for r in rows]


def plan(rows: list[dict] | RowRefs, world_size: int, micro_batch_size: int, pad_id: int,
         costs: list[RankCost] | None = None, lockstep: bool = True, unit: int = 1,
         by_rows: bool = True) -> list[list[dict]]:
    """Per-rank lists of micro-batches (see the module docstring): an even split without
    `costs`, else runs that balance the ranks' predicted times. `lockstep`: every rank gets the
    same number. `unit`: rows that stay together in one micro-batch (2 for the pairwise loss's
    pairs). `by_rows=False` keeps runs of whole micro-batches in lockstep too, topped up with
    fillers (measured against rows in docs/heterogeneous.md).

    Rows given as token lists are collated here; rows given by reference (RowRefs into a packed
    dataset) become references to micro-batches, which each rank reads itself (`materialize`).
    """
    if not len(rows):
        raise ValueError("empty batch")
    if costs is not None and len(costs) != world_size:
        raise ValueError(f"{len(costs)} rank costs for {world_size} ranks")
    if costs is None or not lockstep or not by_rows:
        mbs = _micro_batches(rows, micro_batch_size, pad_id)
        if costs is None:
            per_rank = math.ceil(len(mbs) / world_size)
            shards = [mbs[r * per_rank: (r + 1) * per_rank] for r in range(world_size)]
        else:
            mb_cost = [sum(c) for c in _chunks(_cost(rows), micro_batch_size)]
            shards = [mbs[a:b] for a, b in _partition(mb_cost, costs)[0]]
        count = max(len(s) for s in shards) if lockstep else 1
        return [s + [filler(mbs[-1])] * (count - len(s)) for s in shards]
    # Lockstep with costs: runs of rows (whole units), each cut into the same number of
    # micro-batches. More micro-batches let a fast rank hold more rows (each stays within
    # micro_batch_size) but cost every rank its per-micro-batch time: try each count.
    unit_cost = [sum(c) for c in _chunks(_cost(rows), unit)]
    per_mb = max(1, micro_batch_size // unit)  # units per micro-batch
    least = math.ceil(len(unit_cost) / (world_size * per_mb))
    best_t, runs, count = math.inf, [], least
    for c in range(least, math.ceil(len(unit_cost) / per_mb) + 1):
        if c * min(r.per_micro_batch_s for r in costs) >= best_t:
            break  # the fixed cost alone exceeds the best plan so far
        got, t = _partition(unit_cost, costs, count=c, cap=c * per_mb)
        if t < best_t:
            best_t, runs, count = t, got, c
    shards = []
    for a, b in runs:
        units = b - a
        sizes = [units // count + (1 if i < units % count else 0) for i in range(count)]
        out, at = [], a * unit
        for size in sizes:
            if size:
                end = min(at + size * unit, len(rows))
                out += _micro_batches(_slice(rows, at, end), end - at, pad_id)
                at = end
        shards.append(out)
    some = next(s[0] for s in shards if s)
    return [s + [filler(some)] * (count - len(s)) for s in shards]


def _slice(rows, a: int, b: int):
    return replace(rows, ids=rows.ids[a:b]) if isinstance(rows, RowRefs) else rows[a:b]


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
