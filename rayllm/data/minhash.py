"""Near-duplicate detection: MinHash over word shingles, LSH banding, connected components.

Signatures are computed with numpy for a whole batch of documents at once; on Ray Data they are
built in `map_batches`, documents are grouped by band key, candidate pairs are verified by their
estimated Jaccard similarity, and the verified edges are joined into clusters with union-find.
One representative per cluster is kept: the smallest document id, so the result does not depend
on block order or parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash



@dataclass(frozen=True)
class MinHashConfig:
    threshold: float = 0.8  # Jaccard similarity above which two documents are near duplicates
    num_perm: int = 128
    shingle_words: int = 5
    seed: int = 1

    def bands(self) -> tuple[int, int]:
        return lsh_params(self.threshold, self.num_perm)


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct k-word shingles of a lower-cased, whitespace-split text."""
    words = text.lower().split()
    if len(words) <= k:
        grams = [" ".join(words)]
    else:
        grams = [" ".join(words[i:i + k]) for i in range(len(words) - k + 1)]
    return np.unique(np.fromiter((xxhash.xxh32_intdigest(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)))


def _seeds(num_perm: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic): a strong mixer, so the minimum over a
    set behaves like a random permutation's minimum. Plain linear (a*x+b) mod p hashing was
    measurably biased here (estimates 0.86 for a true Jaccard of 0.66)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def signatures(texts: list[str], cfg: MinHashConfig) -> np.ndarray:
    """[len(texts), num_perm] uint64 MinHash signatures: permutation i is x -> mix(x + seed_i)."""
    seeds = _seeds(cfg.num_perm, cfg.seed)
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, t in enumerate(texts):
            x = shingle_hashes(t, cfg.shingle_words)
            out[i] = _mix(x[:, None] + seeds[None, :]).min(axis=0)
    return out


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the summed false-positive and false-negative probability mass
    around `threshold` (the criterion datasketch uses)."""
    s = np.linspace(0, 1, 1001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1 - (1 - s**r) ** b
        fp = np.trapezoid(np.where(s < threshold, p, 0), s)
        fn = np.trapezoid(np.where(s >= threshold, 1 - p, 0), s)
        if fp + fn < best_err:
            best, best_err = (b, r), fp + fn
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    return [xxhash.xxh64_intdigest(sig[i * rows:(i + 1) * rows].tobytes(), seed=i) for i in range(bands)]


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def verified_pairs(ids: list[int], sigs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs among documents sharing a band bucket whose estimated Jaccard reaches threshold."""
    out = []
    for i in range(len(ids)):
        same = (sigs[i + 1:] == sigs[i]).mean(axis=1) >= threshold
        out += [(ids[i], ids[i + 1 + j]) for j in np.flatnonzero(same)]
    return out


def components(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find: id -> representative (the smallest id of its component), for ids in edges."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def near_duplicates_local(ids: list[int], texts: list[str], cfg: MinHashConfig) -> dict[int, int]:
    """Single-process reference: id of each dropped duplicate -> id of the kept representative."""
    bands, rows = cfg.bands()
    sigs = signatures(texts, cfg)
    buckets: dict[int, list[int]] = {}
    for j, sig in enumerate(sigs):
        for key in band_keys(sig, bands, rows):
            buckets.setdefault(key, []).append(j)
    edges = set()
    for members in buckets.values():
        if len(members) > 1:
            edges.update((ids[a], ids[b]) for a, b in verified_pairs(members, sigs[members], cfg.threshold))
    rep = components(sorted(edges))
    return {i: r for i, r in rep.items() if i != r}


def near_duplicates(ds, cfg: MinHashConfig, id_col: str = "id", text_col: str = "text",
                    concurrency: int | None = None, num_partitions: int = 8) -> dict[int, int]:
    """The same on a Ray Dataset: signatures in map_batches; (band key, id) rows grouped by band
    key on Ray Data, each bucket emitting its candidate pairs; candidates verified against their
    signatures, and union-find of the verified edges on the driver.

    Only 16-byte (band, id) rows go through the shuffle, not the signatures: carrying them made
    the shuffle ~20x the cost of the hashing. The driver holds the signatures of candidate
    documents only.
    """
    bands, rows = cfg.bands()

    def sign(batch: dict) -> dict:
        return {"id": np.asarray(batch[id_col], dtype=np.int64), "sig": signatures(list(batch[text_col]), cfg)}

    def explode(batch: dict) -> dict:
        keys = [band_keys(sig, bands, rows) for sig in batch["sig"]]
        return {"band": np.asarray(keys, dtype=np.uint64).reshape(-1),
                "id": np.repeat(batch["id"], bands)}

    def pairs(group: dict) -> dict:
        ids = np.sort(group["id"])
        if len(ids) < 2:
            return {"a": np.empty(0, dtype=np.int64), "b": np.empty(0, dtype=np.int64)}
        a, b = np.triu_indices(len(ids), k=1)
        return {"a": ids[a], "b": ids[b]}

    sigs = ds.select_columns([id_col, text_col]).map_batches(sign, batch_format="numpy",
                                                             concurrency=concurrency).materialize()
    cand = (sigs.map_batches(explode, batch_format="numpy")
            .groupby("band", num_partitions=num_partitions).map_groups(pairs, batch_format="numpy"))
    candidates = {(int(r["a"]), int(r["b"])) for batch in cand.iter_batches(batch_format="numpy")
                  for r in ({"a": x, "b": y} for x, y in zip(batch["a"], batch["b"]))}
    if not candidates:
        return {}
    need = {i for p in candidates for i in p}
    by_id = {int(i): s for batch in sigs.iter_batches(batch_format="numpy")
             for i, s in zip(batch["id"], batch["sig"]) if int(i) in need}
    edges = sorted(p for p in candidates if similarity(by_id[p[0]], by_id[p[1]]) >= cfg.threshold)
    rep = components(edges)
    return {i: r for i, r in rep.items() if i != r}
