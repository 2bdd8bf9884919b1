"""Best-fit-decreasing packing of tokenized documents into full rows of `seq_len` tokens.

Every row carries per-document `position_ids` that restart at 0 and the document boundaries
(`cu_seqlens`), so attention never crosses a document: transformers derives a block-diagonal
causal mask from such position_ids (sdpa on CPU), flash-attn takes cu_seqlens on GPU. Documents
longer than `seq_len` are first cut into chunks that overlap by `overlap` tokens. Loss masks
travel with their tokens, and the first token of each document gets no loss: nothing before it
in the row may predict it.

The bin search keeps the distinct remaining capacities in a sorted list (at most seq_len of
them), so each document is placed with one bisect; rows are then assembled with a single
vectorized scatter instead of per-row concatenation.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np


@dataclass
class Packed:
    input_ids: np.ndarray  # [rows, seq_len] int32
    position_ids: np.ndarray  # [rows, seq_len] int32, restart at 0 per document (and for the padding tail)
    loss_mask: np.ndarray  # [rows, seq_len] int8
    cu_seqlens: list[np.ndarray]  # per row: [0, end_1, ..., end_k] of real documents
    doc_index: list[np.ndarray]  # per row: index of the input document of each slot, in slot order
    pad_tokens: int

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
    """[start, end) windows of at most seq_len covering [0, length), consecutive ones sharing
    `overlap` tokens."""
    if not 0 <= overlap < seq_len:
        raise ValueError(f"overlap must be in [0, seq_len), got {overlap} for seq_len {seq_len}")
    if length <= seq_len:
        return [(0, length)]
    stride = seq_len - overlap
    starts = list(range(0, length - seq_len, stride)) + [length - seq_len]
    return [(s, s + seq_len) for s in dict.fromkeys(starts)]


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
    if loss_masks is None:
        loss_masks = [np.ones(len(d), dtype=np.int8) for d in docs]
    # 1. Split over-long documents.
    pieces, piece_masks, piece_doc = [], [], []
    for k, (d, m) in enumerate(zip(docs, loss_masks)):
        if len(d) != len(m):
            raise ValueError(f"document {k}: {len(d)} tokens but {len(m)} loss-mask values")
        for s, e in chunk(len(d), seq_len, overlap) if len(d) else []:
            pieces.append(np.asarray(d[s:e], dtype=np.int32))
            piece_masks.append(np.asarray(m[s:e], dtype=np.int8))
            piece_doc.append(k)
    if not pieces:
        raise ValueError("nothing to pack: every document is empty")
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    # 2. Assign pieces to rows.
    bins = best_fit_decreasing(lengths, seq_len)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(pieces))
    row_of = np.repeat(np.arange(len(bins)), [len(b) for b in bins])
    ol = lengths[order]
    # Offset of each piece inside its row: cumulative length, restarted at each row.
    csum = np.cumsum(ol) - ol
    row_first = np.searchsorted(row_of, np.arange(len(bins)))
    offset_in_row = csum - csum[row_first][row_of]
    # 3. One scatter of all tokens into the [rows, seq_len] arrays.
    total = int(ol.sum())
    flat_tokens = np.concatenate([pieces[i] for i in order])
    flat_masks = np.concatenate([piece_masks[i] for i in order])
    within = np.arange(total) - np.repeat(csum, ol)
    dest = np.repeat(row_of * seq_len + offset_in_row, ol) + within
    R = len(bins)
    ids = np.full(R * seq_len, pad_id, dtype=np.int32)
    mask = np.zeros(R * seq_len, dtype=np.int8)
    ids[dest], mask[dest] = flat_tokens, flat_masks
    mask[dest[within == 0]] = 0  # a document's first token has no predictor in the row
    # Positions: within-document index; the padding tail of a row counts as one more document.
    pos = np.arange(R * seq_len, dtype=np.int64) % seq_len
    used = np.bincount(row_of, weights=ol, minlength=R).astype(np.int64)
    pos_real = np.zeros(R * seq_len, dtype=bool)
    pos_real[dest] = True
    pos = pos - np.repeat(used, seq_len) * ~pos_real  # padding: 0, 1, 2, ... after the last document
    pos[dest] = within
    ends = offset_in_row + ol
    cu, docs_in_row = [], []
    for r in range(R):
        sl = slice(row_first[r], row_first[r + 1] if r + 1 < R else len(order))
        cu.append(np.concatenate([[0], ends[sl]]).astype(np.int32))
        docs_in_row.append(np.asarray(piece_doc)[order[sl]])
    return Packed(ids.reshape(R, seq_len), pos.astype(np.int32).reshape(R, seq_len), mask.reshape(R, seq_len),
                  cu, docs_in_row, int(R * seq_len - total))
