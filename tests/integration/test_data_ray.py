"""Corpus steps on Ray Data agree with their single-process references."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_minhash import corpus  # noqa: E402

from rayllm.data.minhash import MinHashConfig, near_duplicates, near_duplicates_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize("concurrency, num_partitions", [(None, None), (2, 3)])
def test_distributed_near_dedup_matches_local_reference(concurrency, num_partitions):
    import ray

    docs, truth = corpus(120, edit=0.03, seed=4)
    cfg = MinHashConfig(threshold=0.5)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(docs)], override_num_blocks=6)
    got = near_duplicates(ds, cfg, concurrency=concurrency, num_partitions=num_partitions)
    assert got == near_duplicates_local(list(range(len(docs))), docs, cfg)
    assert sum(got.get(d) == o for d, o in truth.items()) / len(truth) >= 0.99


def test_prepare_accounts_for_every_record_and_packs(tmp_path):
    import json
    import random
    import sysconfig

    import numpy as np
    import pyarrow.parquet as pq

    from rayllm.config import DataPrepConfig
    from rayllm.data.prepare import prepare

    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(60, 150))) for _ in range(40)]
    near = base[2].split()
    near[7] = "edited"
    lines = [json.dumps({"text": t}) for t in base] + [
        json.dumps({"text": base[0]}),  # line 41: exact duplicate of line 1
        json.dumps({"text": "  " + base[1].upper() + "  "}),  # line 42: exact after case/space folding
        json.dumps({"text": " ".join(near)}),  # line 43: near duplicate of line 3
        "{broken json",  # line 44
        json.dumps({"title": "no text"}),  # line 45
        json.dumps({"text": "SPAM " + base[9]}),  # line 46: rejected by the user's filter hook
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": " ".join(base[5].split()[3:30])}) + "\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    (tmp_path / "hooks.py").write_text("def no_spam(text, record):\n    return 'spam' if 'SPAM' in text else None\n")
    cfg = DataPrepConfig(sources=[str(corpus), str(stdlib / "*.py")], eval_sets=[str(tmp_path / "eval.jsonl")],
                         seq_len=256, min_chars=20, output=str(tmp_path / "out"),
                         filters=[f"{tmp_path / 'hooks.py'}:no_spam"])
    stats = prepare(cfg, progress=False)

    n_std = len(list(stdlib.glob("*.py")))
    assert stats["records_in"] == 46 + n_std
    assert stats["records_in"] == (stats["kept"] + stats["exact_duplicate"] + stats["near_duplicate"]
                                   + stats["contaminated"] + stats["quarantined"])
    removed = {(Path(r["source"]).name, r["line"]): r for r in
               map(json.loads, (tmp_path / "out" / "removed.jsonl").read_text().splitlines())}
    assert removed[("corpus.jsonl", 41)]["status"] == "exact_duplicate"
    assert removed[("corpus.jsonl", 42)]["status"] == "exact_duplicate"
    assert removed[("corpus.jsonl", 43)]["status"] == "near_duplicate"
    assert removed[("corpus.jsonl", 6)]["status"] == "contaminated"
    assert removed[("corpus.jsonl", 44)]["reason"].startswith("malformed JSON")
    assert removed[("corpus.jsonl", 45)]["reason"] == "missing field(s) ['text']"
    assert removed[("corpus.jsonl", 46)]["status"] == "quarantined"
    assert removed[("corpus.jsonl", 46)]["reason"].endswith("hooks.py:no_spam: spam")

    table = pq.read_table(tmp_path / "out" / "packed").to_pydict()
    assert len(table["input_ids"]) == stats["rows"] > 0
    real = 0
    for ids, pos, cu in zip(table["input_ids"], table["position_ids"], table["cu_seqlens"]):
        pos, cu = np.asarray(pos).tolist(), np.asarray(cu).tolist()
        assert len(ids) == len(pos) == 256 and cu[-1] <= 256
        for a, b in zip(cu[:-1], cu[1:]):
            assert pos[a:b] == list(range(b - a))
        real += cu[-1]
    assert real == stats["tokens"]  # every kept token is in exactly one row (overlap 0)
    assert (tmp_path / "out" / "lengths.png").is_file()
    assert np.isclose(stats["padding_share"], 1 - real / (256 * stats["rows"]))


@pytest.mark.slow  # 80 s (the hash shuffle's actors); the suite's 25-minute budget
def test_packed_rows_do_not_depend_on_how_ray_data_splits_blocks_or_on_the_shuffle_strategy(tmp_path):
    # The sort by id samples its range boundaries, so block sizes change from run to run; packing
    # windows cut along blocks made an SFT stage's rows (and so its loss) differ between reruns.
    # The hash shuffle (Ray's default, "auto" at 1 GiB and up) and the pull-based sort shuffle
    # ("auto" below) must give the same rows.
    import json
    import random

    import numpy as np
    import pyarrow.parquet as pq

    from rayllm.config import DataPrepConfig
    from rayllm.data.prepare import prepare

    rng = random.Random(1)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(5, 90)))})
                              + "\n" for _ in range(300)))
    tables = []
    for strategy, parts in (("hash", 2), ("hash", 7), ("sort", 3)):
        out = tmp_path / f"out-{strategy}-{parts}"
        prepare(DataPrepConfig(sources=[str(corpus)], seq_len=128, min_chars=10, pack_window=37,
                               shuffle_partitions=parts, shuffle_strategy=strategy, output=str(out)), progress=False)
        t = pq.read_table(out / "packed").to_pydict()
        tables.append([[np.asarray(x).tolist() for x in t[k]] for k in ("input_ids", "doc_ids")])
    assert len(tables[0][0]) > 20
    assert tables[0] == tables[1] == tables[2]
