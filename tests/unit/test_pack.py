import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rayllm.data.pack import best_fit_decreasing, chunk, pack


def test_chunk_windows_overlap_and_cover():
    assert chunk(5, 8, 2) == [(0, 5)]
    assert chunk(20, 8, 2) == [(0, 8), (6, 14), (12, 20)]
    assert chunk(16, 8, 0) == [(0, 8), (8, 16)]
    assert chunk(10, 8, 0) == [(0, 8), (8, 10)]  # no token repeated without overlap
    with pytest.raises(ValueError):
        chunk(10, 8, 8)


def test_best_fit_decreasing_fills_tightest_bin():
    bins = best_fit_decreasing(np.array([6, 5, 4, 3, 2]), 10)
    assert sorted(map(sorted, bins)) == [[0, 2], [1, 3, 4]]  # 6+4 and 5+3+2: no waste


docs_st = st.lists(st.lists(st.integers(1, 50), min_size=0, max_size=60), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(docs=docs_st, seq_len=st.integers(4, 64), overlap_frac=st.floats(0, 0.9))
def test_packing_keeps_every_token_in_order_and_never_overflows(docs, seq_len, overlap_frac):
    if not any(docs):
        return
    overlap = int(overlap_frac * (seq_len - 1))
    arrays = [np.array(d, dtype=np.int32) for d in docs]
    p = pack(arrays, seq_len, overlap=overlap, pad_id=0)
    assert p.input_ids.shape[1] == seq_len
    expected = sorted((k, s, e) for k, d in enumerate(arrays) if len(d) for s, e in chunk(len(d), seq_len, overlap))
    seen = []
    for r in range(len(p.input_ids)):
        cu, docs_in_row = p.cu_seqlens[r], p.doc_index[r]
        assert cu[-1] <= seq_len and len(cu) == len(docs_in_row) + 1
        for j, k in enumerate(docs_in_row):
            a, b = cu[j], cu[j + 1]
            toks = p.input_ids[r, a:b]
            # The slot is one chunk of document k, in order, with positions restarting at 0.
            match = [(s, e) for kk, s, e in expected if kk == k and np.array_equal(arrays[k][s:e], toks)]
            assert match, (k, toks)
            seen.append((k, b - a))
            assert p.position_ids[r, a:b].tolist() == list(range(b - a))
        assert p.position_ids[r, cu[-1]:].tolist() == list(range(seq_len - cu[-1]))
    # Nothing lost, nothing duplicated: one slot per chunk.
    assert sorted(seen) == sorted((k, e - s) for k, s, e in expected)
    assert p.pad_tokens == p.input_ids.size - sum(e - s for _, s, e in expected)


def test_loss_mask_travels_with_tokens():
    docs = [np.arange(1, 6), np.arange(10, 14), np.arange(20, 23)]
    masks = [np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1]), np.array([1, 1, 1])]
    p = pack(docs, 8, loss_masks=masks)
    for r in range(len(p.input_ids)):
        for j, k in enumerate(p.doc_index[r]):
            a, b = p.cu_seqlens[r][j], p.cu_seqlens[r][j + 1]
            want = masks[k].copy()
            want[0] = 0  # the document's first token is never a target
            assert p.loss_mask[r, a:b].tolist() == want.tolist()
        assert p.loss_mask[r, p.cu_seqlens[r][-1]:].sum() == 0


def test_packed_row_logits_equal_each_document_alone(tiny_path):
    """No token attends across a document boundary: transformers builds the block-diagonal
    mask from the restarting position_ids (sdpa, CPU)."""
    from transformers import AutoModelForCausalLM

    worst = 0.0
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 1000, size=n) for n in (17, 5, 30, 9, 12, 40)]
    p = pack(docs, 64)
    assert len(p.input_ids) == 2  # 113 tokens need two 64-token rows, and best fit needs no third
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers does not look for packed sequences.
        packed = model(input_ids=torch.as_tensor(p.input_ids, dtype=torch.long), use_cache=False,
                       position_ids=torch.as_tensor(p.position_ids, dtype=torch.long)).logits
        for r in range(len(p.input_ids)):
            for j, k in enumerate(p.doc_index[r]):
                a, b = p.cu_seqlens[r][j], p.cu_seqlens[r][j + 1]
                alone = model(input_ids=torch.as_tensor(docs[k][None], dtype=torch.long)).logits[0]
                worst = max(worst, (packed[r, a:b] - alone).abs().max().item())
    assert worst <= 1e-5, worst
    with torch.no_grad():  # the same row without restarting positions does leak across documents
        leaky = model(input_ids=torch.as_tensor(p.input_ids[:1], dtype=torch.long), use_cache=False).logits
    a, b = p.cu_seqlens[0][1], p.cu_seqlens[0][2]
    assert (leaky[0, a:b] - packed[0, a:b]).abs().max() > 1e-3
