"""Corpus steps on Ray Data agree with their single-process references."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_minhash import corpus  # noqa: E402

from rayllm.data.minhash import MinHashConfig, near_duplicates, near_duplicates_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_distributed_near_dedup_matches_local_reference():
    import ray

    docs, truth = corpus(120, edit=0.03, seed=4)
    cfg = MinHashConfig(threshold=0.5)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(docs)], override_num_blocks=6)
    got = near_duplicates(ds, cfg)
    assert got == near_duplicates_local(list(range(len(docs))), docs, cfg)
    assert sum(got.get(d) == o for d, o in truth.items()) / len(truth) >= 0.99
