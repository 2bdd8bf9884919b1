"""Packed rows fed by reference: random access, deterministic two-level shuffle, resumable order."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayllm.data.pack import pack
from rayllm.data.stream import PackedDataError, PackedSource, RowRefs
from rayllm.group.batching import materialize, plan
from rayllm.trainer.sft_data import PackedRows

T = 16


def _write(tmp_path, n_files=3, groups_per_file=2, rows_per_group=5):
    """Packed rows whose first token is the global row id, in several files and row groups."""
    d = tmp_path / "packed"
    d.mkdir()
    rid = 0
    for f in range(n_files):
        writer = None
        for _ in range(groups_per_file):
            docs = [np.arange(rid * 100 + i * 10, rid * 100 + i * 10 + 6) for i in range(2 * rows_per_group)]
            p = pack(docs, T, pad_id=0)
            p.input_ids[:, 0] = np.arange(rid, rid + len(p.input_ids))
            rid += len(p.input_ids)
            table = pa.table({"input_ids": list(p.input_ids), "position_ids": list(p.position_ids),
                              "loss_mask": list(p.loss_mask)})
            writer = writer or pq.ParquetWriter(d / f"part-{f}.parquet", table.schema)
            writer.write_table(table)
        writer.close()
    return d, rid


def test_random_access_by_global_id(tmp_path):
    d, n = _write(tmp_path)
    src = PackedSource(tmp_path)  # the prepared directory or its packed/ folder both work
    assert len(src) == n and src.num_groups == 6 and src.seq_len == T
    ids = [n - 1, 0, 7, 3]
    rows = src.rows(ids)
    assert [r["input_ids"][0] for r in rows] == ids
    assert all(len(r["position_ids"]) == len(r["loss_mask"]) == T for r in rows)
    with pytest.raises(IndexError):
        src.rows([n])


def test_epoch_order_is_a_seeded_windowed_permutation(tmp_path):
    _write(tmp_path)
    src = PackedSource(tmp_path / "packed")
    a, b = src.order(seed=3, epoch=0, window=2), src.order(seed=3, epoch=0, window=2)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(len(src)))
    assert not np.array_equal(a, src.order(seed=3, epoch=1, window=2))
    assert not np.array_equal(a, src.order(seed=4, epoch=0, window=2))
    # Each window of rows comes from at most `window` row groups: ranks cache only a few.
    group_of = np.searchsorted(src.starts, a, side="right") - 1
    sizes = np.diff(src.starts)
    for w in range(0, len(a), 2 * sizes[0]):
        assert len(set(group_of[w: w + 2 * sizes[0]].tolist())) <= 2


def test_packed_rows_cover_each_epoch_once_and_resume_exactly(tmp_path):
    _write(tmp_path)
    src = PackedSource(tmp_path)
    held = np.array([2, 9])
    train = PackedRows(src, global_batch=4, seed=1, window=2, exclude=held)
    assert len(train) == len(src) - 2 and train.steps_per_epoch == len(train) // 4
    seen = [i for s in range(train.steps_per_epoch) for i in train.batch(s).ids]
    assert len(seen) == len(set(seen)) == train.steps_per_epoch * 4 and not set(seen) & set(held.tolist())
    # A fresh object (a resumed run) gives the same rows at the same step, in any epoch.
    again = PackedRows(PackedSource(tmp_path), global_batch=4, seed=1, window=2, exclude=held)
    for step in (0, 3, train.steps_per_epoch + 1):
        assert again.batch(step) == train.batch(step)
    assert again.fingerprint == train.fingerprint
    assert PackedRows(src, 4, 1, 2, np.array([2])).fingerprint != train.fingerprint


def test_plan_sends_references_that_ranks_materialize(tmp_path):
    _write(tmp_path)
    refs = RowRefs(str(tmp_path / "packed"), (5, 1, 8, 0, 11))
    shards = plan(refs, world_size=2, micro_batch_size=2, pad_id=0)
    assert [len(s) for s in shards] == [2, 2]
    assert shards[0][0]["refs"].ids == (5, 1) and shards[1][0]["refs"].ids == (11,)
    mb = materialize(shards[0][1])
    assert mb["input_ids"][:, 0].tolist() == [8, 0] and mb["position_ids"].shape == (2, T)
    assert mb["loss_mask"].tolist() == [list(r["loss_mask"]) for r in PackedSource(tmp_path).rows([8, 0])]
    fill = materialize(shards[1][1])  # the rank with fewer micro-batches gets a zero-weight filler
    assert fill["filler"] and fill["loss_mask"].sum() == 0


def test_bad_packed_dataset_is_named(tmp_path):
    with pytest.raises(PackedDataError, match="no packed Parquet files"):
        PackedSource(tmp_path)
    (tmp_path / "packed").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "packed" / "a.parquet")
    with pytest.raises(PackedDataError, match=r"a.parquet: missing column\(s\)"):
        PackedSource(tmp_path)
    (tmp_path / "packed" / "a.parquet").write_bytes(b"not parquet")
    with pytest.raises(PackedDataError, match="not a readable Parquet file"):
        PackedSource(tmp_path)
