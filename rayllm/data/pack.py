"""Best-fit-decreasing packing of tokenized documents into full rows of `seq_len` tokens.

Every row carries per-document `position_ids` that restart at 0 and the document boundaries
(`cu_seqlens`), so attention never crosses a document: transformers derives a block-diagonal
causal mask from such position_ids (sdpa on CPU), flash-attn takes cu_seqlens on GPU. Documents
longer than `seq_len` are first cut into chunks that overlap by `overlap` tokens. Loss masks
travel with their tokens, and the first token of each document gets no loss: nothing before it
in the row may predict it.

The bin search keeps the distinct remaining capacities in a sorted list (at most seq_len of
them), so each document is placed with one bisect; each piece is then copied once into its
slot of a preallocated [rows, seq_len] array.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass
class Packed:
    """Packed rows. position_ids are derived from cu_seqlens when first asked for (as TRL keeps
    sequence lengths and derives positions in its collator): they restart at 0 per document, and
    the padding tail of a row counts as one more document."""

    input_ids: np.ndarray  # [rows, seq_len] int32
    loss_mask: np.ndarray  # [rows, seq_len] int8
    cu_seqlens: list[np.ndarray]  # per row: [0, end_1, ..., end_k] of real documents
    doc_index: list[np.ndarray]  # per row: index of the input document of each slot, in slot order
    pad_tokens: int

    @cached_property
    def position_ids(self) -> np.ndarray:
        R, T = self.input_ids.shape
        pos = np.empty((R, T), dtype=np.int32)
        ar = np.arange(T, dtype=np.int32)
        for r, cu in enumerate(self.cu_seqlens):
            starts = np.append(cu[:-1], cu[-1]) if cu[-1] < T else cu[:-1]
            pos[r] = ar - np.repeat(starts, np.diff(np.append(starts, T)))
        return pos

    @property
    def padding_share(self) -> float:
        return self.pad_tokens / max(1, self.input_ids.size)

    def rows(self) -> list[dict]:
        return [
            {"input_ids": self.input_ids[i].tolist(), "position_ids": self.position_ids[i].tolist(),
             "loss_mask": self.loss_mask[i].tolist(), "cu_seqlens": self.cu_seqlens[i].tolist()}
            for i in range(len(self.input_ids))
        ]


def chunk(length: int, seq_len: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most seq_len covering [0, length); each starts `overlap` tokens
    before the previous one ends, so with overlap 0 no token is repeated (the last window is
    the shorter remainder)."""
    if not 0 <= overlap < seq_len:
        raise ValueError(f"overlap must be in [0, seq_len), got {overlap} for seq_len {seq_len}")
    windows, s = [], 0
    while True:
        e = min(s + seq_len, length)
        windows.append((s, e))
        if e == length:
            return windows
        s = e - overlap


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices; items in each bin in input order. Ties broken by index, so the
    result is a pure function of the lengths."""
    caps: list[int] = []  # sorted distinct remaining capacities that have an open bin
    open_bins: dict[int, list[int]] = {}
    bins: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        n = int(lengths[i])
        if n > capacity or n <= 0:
            raise ValueError(f"item {i} has length {n}, outside 1..{capacity}")
        j = bisect_left(caps, n)
        if j == len(caps):
            b, rem = len(bins), capacity - n
            bins.append([])
        else:
            c = caps[j]
            stack = open_bins[c]
            b, rem = stack.pop(), c - n
            if not stack:
                del caps[j], open_bins[c]
        bins[b].append(i)
        if rem:
            if rem not in open_bins:
                insort(caps, rem)
                open_bins[rem] = []
            open_bins[rem].append(b)
    return [sorted(b) for b in bins]


def pack(docs: list[np.ndarray], seq_len: int, loss_masks: list[np.ndarray] | None = None, overlap: int = 0,
         pad_id: int = 0) -> Packed:
    """Pack token arrays (and optional per-token loss masks) into rows of exactly seq_len."""
    # 1. Split over-long documents into (doc, start, end) pieces.
    pieces: list[tuple[int, int, int]] = []
    for k, d in enumerate(docs):
        if loss_masks is not None and len(loss_masks[k]) != len(d):
            raise ValueError(f"document {k}: {len(d)} tokens but {len(loss_masks[k])} loss-mask values")
        if len(d) <= seq_len:
            if len(d):
                pieces.append((k, 0, len(d)))
        else:
            pieces += [(k, s, e) for s, e in chunk(len(d), seq_len, overlap)]
    if not pieces:
        raise ValueError("nothing to pack: every document is empty")
    lengths = np.fromiter((e - s for _, s, e in pieces), dtype=np.int64, count=len(pieces))
    # 2. Assign pieces to rows.
    bins = best_fit_decreasing(lengths, seq_len)
    # 3. Copy each piece into its slot (one slice assignment per piece; no per-token index math).
    R = len(bins)
    # np.empty, not full/zeros: every element is written exactly once below, which halves the
    # memory traffic of these (large) arrays.
    ids = np.empty((R, seq_len), dtype=np.int32)
    mask = np.empty((R, seq_len), dtype=np.int8)
    cu, docs_in_row = [], []
    used_total = 0
    for r, b in enumerate(bins):
        off, ends, row_docs = 0, [0], []
        for i in b:
            k, s, e = pieces[i]
            n = e - s
            ids[r, off:off + n] = docs[k][s:e]
            if loss_masks is not None:
                mask[r, off:off + n] = loss_masks[k][s:e]
            off += n
            ends.append(off)
            row_docs.append(k)
        if loss_masks is None:
            mask[r, :off] = 1
        mask[r, ends[:-1]] = 0  # a document's first token has no predictor in the row
        ids[r, off:] = pad_id
        mask[r, off:] = 0
        cu.append(np.asarray(ends, dtype=np.int32))
        docs_in_row.append(np.asarray(row_docs, dtype=np.int64))
        used_total += off
    return Packed(ids, mask, cu, docs_in_row, int(R * seq_len - used_total))
