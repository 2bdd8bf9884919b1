"""Feed packed Parquet rows to training ranks by reference, in a deterministic, resumable order.

The driver never reads the corpus: it holds the row *count* of every Parquet row group (from
file footers) and hands each rank the global ids of the rows of its micro-batches; the rank reads
them itself. The order of an epoch is a pure function of (seed, epoch), so the consumed position
is one integer (the optimizer step) saved with every checkpoint, and a resumed run neither
repeats nor skips a row, whatever the number of ranks.

Shuffling is two-level, as in MosaicML Streaming and Megatron's blended datasets: the row groups
are permuted, then rows are shuffled within windows of `window` consecutive row groups. A rank
then needs only the few row groups of the current window at a time (kept in a small cache)
instead of seeking to a random row of a random file for every row.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

COLUMNS = ["input_ids", "position_ids", "loss_mask"]


class PackedDataError(ValueError):
    """A packed dataset that is missing or not what rayllm writes; the message names it."""


@dataclass(frozen=True)
class RowRefs:
    """Rows of a packed dataset named by global id: what a rank is sent instead of the rows."""

    path: str
    ids: tuple[int, ...]
    row_tokens: int = 0  # tokens in each packed row (all one length), for speed plans; 0: unknown

    def __len__(self) -> int:
        return len(self.ids)


class PackedSource:
    """Random access by global row id to the packed rows under `path` (a `packed/` directory of
    Parquet files, or a prepared dataset directory holding one)."""

    def __init__(self, path: str | Path, cache_row_groups: int = 8):
        import pyarrow.parquet as pq

        root = Path(path)
        if (root / "packed").is_dir():
            root = root / "packed"
        self.path = str(root)
        self.files = sorted(str(f) for f in root.glob("*.parquet")) if root.is_dir() else []
        if not self.files:
            raise PackedDataError(f"{path}: no packed Parquet files (write them with `rayllm data prepare`)")
        groups = []
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - any unreadable footer
                raise PackedDataError(f"{f}: not a readable Parquet file ({e})") from None
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise PackedDataError(f"{f}: missing column(s) {missing}; is it a packed dataset?")
            groups += [(f, g, pf.metadata.row_group(g).num_rows) for g in range(pf.metadata.num_row_groups)]
        self.groups = [(f, g) for f, g, n in groups if n]
        self.starts = np.cumsum([0] + [n for _, _, n in groups if n])
        self._files: dict[str, object] = {}
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_row_groups

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @cached_property
    def seq_len(self) -> int:
        return int(self._group(0)["input_ids"].shape[1])

    def _group(self, g: int) -> dict[str, np.ndarray]:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        import pyarrow.parquet as pq

        f, rg = self.groups[g]
        if f not in self._files:
            self._files[f] = pq.ParquetFile(f)
        table = self._files[f].read_row_group(rg, columns=COLUMNS)
        cols = {}
        for c in COLUMNS:
            arr = table.column(c).combine_chunks()
            arr = getattr(arr, "storage", arr)  # Ray's tensor extension type wraps a list array
            cols[c] = arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), -1)
        self._cache[g] = cols
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return cols

    def rows(self, ids) -> list[dict]:
        """Rows as dicts of token lists (the form `batching.collate` takes), in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row id out of range [0, {len(self)}) for {self.path}")
        g = np.searchsorted(self.starts, ids, side="right") - 1
        out = []
        for i, gi in zip(ids, g):
            cols = self._group(int(gi))
            j = int(i - self.starts[gi])
            out.append({c: cols[c][j].tolist() for c in COLUMNS})
        return out

    def order(self, seed: int, epoch: int, window: int = 4) -> np.ndarray:
        """Global row ids of one epoch: row groups permuted, rows shuffled within each window of
        `window` consecutive row groups."""
        rng = np.random.default_rng([seed, epoch])
        sizes = np.diff(self.starts)
        perm = rng.permutation(self.num_groups)
        out = []
        for w in range(0, len(perm), window):
            ids = np.concatenate([np.arange(self.starts[g], self.starts[g] + sizes[g]) for g in perm[w:w + window]])
            out.append(rng.permutation(ids))
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


class SourceCache:
    """One PackedSource per dataset per process (ranks keep theirs, with its row-group cache),
    rebuilt if the files under the path change (a dataset prepared again in place)."""

    _sources: dict[str, tuple[tuple, PackedSource]] = {}

    @classmethod
    def get(cls, path: str) -> PackedSource:
        stamp = tuple((f.name, f.stat().st_mtime_ns) for f in sorted(Path(path).glob("*.parquet")))
        if path not in cls._sources or cls._sources[path][0] != stamp:
            cls._sources[path] = (stamp, PackedSource(path))
        return cls._sources[path][1]


def resolve_rows(refs: RowRefs) -> list[dict]:
    return SourceCache.get(refs.path).rows(refs.ids)
