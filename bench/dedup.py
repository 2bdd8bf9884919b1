"""Near-duplicate removal: rayllm (MinHash LSH on Ray Data) against single-process datasketch
(`MinHash.bulk` + `MinHashLSH`) on the same documents with planted near duplicates.

    python bench/dedup.py [--docs 20000] [--json out.json]

For each edit rate (3% and 8% of words replaced) it prints docs/s, recall and precision for
both, and the speed ratio; rayllm is run at Ray Data parallelism 1 and 2, and again on
--scaling-docs documents (default 100k), where the work outlasts Ray Data's ramp-up, to show scaling.
Goals: recall >= 0.99 at 3% and >= 0.95 at 8%, precision >= 0.99, >= 2x datasketch's docs/s.

Each method is timed --repeats times and its median is reported (the machine may be shared).
rayllm's time is the whole `near_duplicates` call on an already materialised Dataset (as
datasketch gets its documents as an in-memory list). Before any timing, rayllm runs once on a
small Dataset at each parallelism so that Ray's worker processes are started and have imported
the code: otherwise whichever run comes first pays ~1-3 s of start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_corpus(n: int, edit: float, dup_share: float = 0.2, seed: int = 0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    n_base = int(n / (1 + dup_share))
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(100, 300))) for _ in range(n_base)]
    truth = {}
    for i in rng.sample(range(n_base), n - n_base):
        words = docs[i].split()
        for j in rng.sample(range(len(words)), max(1, round(edit * len(words)))):
            words[j] = rng.choice(vocab)
        truth[len(docs)] = i
        docs.append(" ".join(words))
    return docs, truth


def score(found: dict[int, int], truth: dict[int, int]) -> tuple[float, float]:
    """Recall: planted copies removed; precision: removed documents that were planted copies.
    Removing either member of a planted pair counts (which one a method keeps is its choice)."""
    pairs = {frozenset((d, o)) for d, o in truth.items()}
    hit = sum(1 for d, o in truth.items() if d in found or o in found)
    good = sum(1 for d, r in found.items() if frozenset((d, r)) in pairs or d in truth)
    return hit / max(1, len(truth)), good / max(1, len(found))


def datasketch_dedup(docs: list[str], threshold: float, num_perm: int, k: int) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH

    from rayllm.data.minhash import components

    shingles = []
    for t in docs:
        w = t.lower().split()
        shingles.append([" ".join(w[i:i + k]).encode() for i in range(max(1, len(w) - k + 1))])
    mhs = MinHash.bulk(shingles, num_perm=num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, m in enumerate(mhs):
        lsh.insert(i, m)
    edges = [(min(i, j), max(i, j)) for i, m in enumerate(mhs) for j in lsh.query(m) if j != i]
    rep = components(sorted(set(edges)))
    return {i: r for i, r in rep.items() if i != r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle-words", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scaling-docs", type=int, default=100000,
                    help="also time rayllm alone at 1 and 2 workers on this many docs (0: skip)")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from rayllm.data.minhash import MinHashConfig, near_duplicates

    ray.init(num_cpus=4, object_store_memory=1024**3, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    res = {"docs": a.docs, "num_perm": a.num_perm, "shingle_words": a.shingle_words, "repeats": a.repeats}
    rows = []

    def timed(fn):
        """(result, median seconds) of `repeats` calls."""
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, statistics.median(times)

    warm, _ = make_corpus(1000, 0.03)
    warm_ds = ray.data.from_items([{"id": i, "text": d} for i, d in enumerate(warm)], override_num_blocks=8)
    for par in (1, 2):
        near_duplicates(warm_ds, MinHashConfig(threshold=0.5), concurrency=par)
    for edit, threshold in ((0.03, 0.5), (0.08, 0.3)):
        docs, truth = make_corpus(a.docs, edit)
        tag = f"edit{round(edit * 100)}pct"
        base, base_s = timed(lambda: datasketch_dedup(docs, threshold, a.num_perm, a.shingle_words))
        res[f"{tag}_datasketch_docs_per_s"] = len(docs) / base_s
        res[f"{tag}_datasketch_recall"], res[f"{tag}_datasketch_precision"] = score(base, truth)
        rows.append(("datasketch (1 process)", edit, len(docs) / base_s, *score(base, truth)))
        cfg = MinHashConfig(threshold=threshold, num_perm=a.num_perm, shingle_words=a.shingle_words)
        ds = ray.data.from_items([{"id": i, "text": d} for i, d in enumerate(docs)],
                                 override_num_blocks=8).materialize()
        for par in (1, 2):
            found, s = timed(lambda: near_duplicates(ds, cfg, concurrency=par))
            rec, prec = score(found, truth)
            res[f"{tag}_rayllm_p{par}_docs_per_s"] = len(docs) / s
            res[f"{tag}_rayllm_p{par}_recall"], res[f"{tag}_rayllm_p{par}_precision"] = rec, prec
            rows.append((f"rayllm Ray Data, {par} worker(s)", edit, len(docs) / s, rec, prec))
        res[f"{tag}_rayllm_p2_over_datasketch_docs_per_s_ratio"] = (
            res[f"{tag}_rayllm_p2_docs_per_s"] / res[f"{tag}_datasketch_docs_per_s"])
        res[f"{tag}_rayllm_p2_over_p1_docs_per_s_ratio"] = (
            res[f"{tag}_rayllm_p2_docs_per_s"] / res[f"{tag}_rayllm_p1_docs_per_s"])
    if a.scaling_docs:
        # Scaling needs a corpus whose signature stage outlasts Ray Data's ramp-up (~1 s).
        docs, truth = make_corpus(a.scaling_docs, 0.03)
        ds = ray.data.from_items([{"id": i, "text": d} for i, d in enumerate(docs)],
                                 override_num_blocks=16).materialize()
        cfg = MinHashConfig(threshold=0.5, num_perm=a.num_perm, shingle_words=a.shingle_words)
        for par in (1, 2):
            t = time.perf_counter()
            found = near_duplicates(ds, cfg, concurrency=par)
            res[f"scaling_{a.scaling_docs}_rayllm_p{par}_docs_per_s"] = len(docs) / (time.perf_counter() - t)
            res[f"scaling_{a.scaling_docs}_rayllm_p{par}_recall"] = score(found, truth)[0]
        res[f"scaling_{a.scaling_docs}_rayllm_p2_over_p1_docs_per_s_ratio"] = (
            res[f"scaling_{a.scaling_docs}_rayllm_p2_docs_per_s"] / res[f"scaling_{a.scaling_docs}_rayllm_p1_docs_per_s"])
    ray.shutdown()
    print(f"\nnear-dedup of {a.docs} docs (100-300 words, 20% planted near copies), "
          f"{a.num_perm} perms, {a.shingle_words}-word shingles, median of {a.repeats} runs")
    print(f"{'method':<32}{'edits':>7}{'docs/s':>10}{'recall':>9}{'precision':>11}")
    for name, edit, dps, rec, prec in rows:
        print(f"{name:<32}{edit:>7.0%}{dps:>10,.0f}{rec:>9.3f}{prec:>11.3f}")
    for tag in ("edit3pct", "edit8pct"):
        print(f"{tag}: rayllm (2 workers) / datasketch = {res[f'{tag}_rayllm_p2_over_datasketch_docs_per_s_ratio']:.2f}x,"
              f" 2 workers / 1 worker = {res[f'{tag}_rayllm_p2_over_p1_docs_per_s_ratio']:.2f}x")
    if a.scaling_docs:
        k = f"scaling_{a.scaling_docs}_rayllm"
        print(f"scaling, {a.scaling_docs} docs at 3% edits (1 run each): 1 worker {res[f'{k}_p1_docs_per_s']:,.0f} docs/s,"
              f" 2 workers {res[f'{k}_p2_docs_per_s']:,.0f} docs/s, ratio {res[f'{k}_p2_over_p1_docs_per_s_ratio']:.2f}x")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
