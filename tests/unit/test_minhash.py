import random

import numpy as np
import pyarrow as pa
import pytest

from rayllm.data.minhash import (MinHashConfig, bucket_pairs, components, lsh_params, near_duplicates_local,
                                 shingle_hashes, signatures, similarity)

WORDS = [f"w{i}" for i in range(5000)]


def corpus(n_base=150, edit=0.03, dup_every=3, seed=0):
    """Random documents plus, for every `dup_every`-th one, a copy with `edit` of its words replaced."""
    rng = random.Random(seed)
    docs, truth = [], {}
    for i in range(n_base):
        docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300))))
    for i in range(0, n_base, dup_every):
        words = docs[i].split()
        for j in rng.sample(range(len(words)), max(1, int(edit * len(words)))):
            words[j] = rng.choice(WORDS)
        truth[len(docs)] = i
        docs.append(" ".join(words))
    return docs, truth


def exact_jaccard(a, b, k=5):
    x, y = set(shingle_hashes(a, k).tolist()), set(shingle_hashes(b, k).tolist())
    return len(x & y) / len(x | y)


def test_signature_agreement_estimates_jaccard():
    docs, truth = corpus(20, edit=0.05)
    cfg = MinHashConfig(num_perm=256)
    sigs = signatures(docs, cfg)
    for dup, orig in truth.items():
        assert similarity(sigs[dup], sigs[orig]) == pytest.approx(exact_jaccard(docs[dup], docs[orig]), abs=0.1)
    assert similarity(sigs[0], sigs[1]) < 0.05


def test_signature_estimates_are_unbiased():
    """Mean estimation error over many pairs stays near zero at several similarity levels (a weak
    hash family shows up here as a systematic offset, not in any single pair)."""
    rng = random.Random(1)
    for edit in (0.03, 0.1, 0.25):
        errs = []
        for _ in range(40):
            words = [rng.choice(WORDS) for _ in range(rng.randint(150, 300))]
            near = [rng.choice(WORDS) if rng.random() < edit else w for w in words]
            a, b = " ".join(words), " ".join(near)
            sigs = signatures([a, b], MinHashConfig(num_perm=128))
            errs.append(similarity(sigs[0], sigs[1]) - exact_jaccard(a, b))
        assert abs(np.mean(errs)) < 0.02, (edit, np.mean(errs))


def test_batch_signatures_match_one_text_at_a_time():
    """Vectorising over a batch (texts sharing and spanning hash chunks, empty and short texts)
    must not change any text's signature, or results would depend on block boundaries."""
    rng = random.Random(2)
    docs = ["", "   ", "one", "Two words", "a b c d e", "a b c d e f", "  Mixed\tCASE  and\n spaces here  ",
            "é ü ß 漢字 words", " ".join(rng.choice(WORDS) for _ in range(9000))]
    docs += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40))) for _ in range(30)]
    cfg = MinHashConfig(num_perm=64)
    batch = signatures(docs, cfg)
    assert batch.shape == (len(docs), 64) and batch.dtype == np.uint32
    assert np.array_equal(batch, np.vstack([signatures([d], cfg) for d in docs]))
    assert np.array_equal(batch, signatures(pa.chunked_array([docs[:5], docs[5:]]), cfg))


def test_shingles_fold_case_and_whitespace():
    assert np.array_equal(shingle_hashes("A  b\tC d\ne f", 5), shingle_hashes("a b c d e f", 5))
    assert len(shingle_hashes("a b c d e f", 5)) == 2
    assert len(shingle_hashes("a b", 5)) == 1 and len(shingle_hashes("", 5)) == 1
    assert not np.array_equal(shingle_hashes("a b", 5), shingle_hashes("b a", 5))


def test_bucket_pairs_are_all_pairs_sharing_a_key():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 40, size=300).astype(np.uint64)
    ids = rng.permutation(1000)[:300].astype(np.int64)
    want = {(min(ids[i], ids[j]), max(ids[i], ids[j])) for i in range(300) for j in range(i + 1, 300)
            if keys[i] == keys[j]}
    got = bucket_pairs(keys, ids)
    assert {tuple(p) for p in got.tolist()} == want and len(got) == len(want)
    assert bucket_pairs(np.arange(5, dtype=np.uint64), np.arange(5)).shape == (0, 2)


def test_lsh_params_put_the_s_curve_at_the_threshold():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128
    assert 0.6 < (1 / b) ** (1 / r) < 0.9


@pytest.mark.parametrize("edit, min_recall", [(0.03, 0.99), (0.08, 0.95)])
def test_planted_near_duplicates_are_found(edit, min_recall):
    docs, truth = corpus(150, edit=edit)
    # 5-word shingles: k edited words change up to 5k shingles, so Jaccard is ~0.74 at 3% edits
    # and ~0.45 at 8%; the threshold sits below that.
    cfg = MinHashConfig(threshold=0.3 if edit > 0.05 else 0.5)
    found = near_duplicates_local(list(range(len(docs))), docs, cfg)
    hits = sum(1 for d, o in truth.items() if found.get(d) == o)
    assert hits / len(truth) >= min_recall
    assert set(found) <= set(truth)  # precision 1.0: nothing unrelated removed
    assert all(found[d] < d for d in found)  # the representative kept is the smallest id


def test_components_pick_smallest_id():
    assert components([(5, 3), (3, 9), (7, 8)]) == {5: 3, 3: 3, 9: 3, 7: 7, 8: 7}
