"""Where an SFT stage's rows come from, and the order it takes them in.

Two sources behind one interface (`batch(step)`, `len`, `fingerprint`):
- PackedRows: packed Parquet rows from `rayllm data prepare` (run on the fly on the stage's
  training split, or a directory made beforehand). The driver holds row ids only; ranks read
  the rows (rayllm.data.stream).
- PaddedRows: one right-padded row per example, tokenized on Ray Data (`data.packing: false`).

Either way the rows of step s are a pure function of (seed, s), so a resumed run continues at
the exact row where the checkpoint was taken.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rayllm.config import SFT, DataPrepConfig, FieldMap
from rayllm.data.stream import PackedSource, RowRefs
from rayllm.datasets.sft import load_records, split, tokenized_rows
from rayllm.io import write_json_atomic


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass
class PaddedRows:
    rows: list[dict]
    global_batch: int
    seed: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch

    def batch_ids(self, step: int) -> list[int]:
        """Indices of the rows of step `step` (the ledger's ids)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch_order(len(self.rows), self.seed, epoch)[k * self.global_batch: (k + 1) * self.global_batch]

    def batch(self, step: int) -> list[dict]:
        return [self.rows[i] for i in self.batch_ids(step)]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([r["input_ids"] for r in self.rows]).encode()).hexdigest()[:16]


@dataclass
class PackedRows:
    source: PackedSource
    global_batch: int
    seed: int
    window: int = 4
    exclude: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # held-out rows
    _cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.source) - len(self.exclude)

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            ids = self.source.order(self.seed, epoch, self.window)
            self._cached = (epoch, ids[~np.isin(ids, self.exclude)])
        return self._cached[1]

    def batch_ids(self, step: int) -> list[int]:
        """Packed-row ids of step `step` (the ledger's ids)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return [int(i) for i in self.order(epoch)[k * self.global_batch: (k + 1) * self.global_batch]]

    def batch(self, step: int) -> RowRefs:
        return RowRefs(self.source.path, tuple(self.batch_ids(step)), self.source.seq_len)

    @property
    def fingerprint(self) -> str:
        """Files and row-group sizes: a checkpoint taken on other data must not be resumed."""
        desc = json.dumps([[Path(f).name for f in self.source.files], self.source.starts.tolist(),
                           self.exclude.tolist()])
        return hashlib.sha256(desc.encode()).hexdigest()[:16]


def load_sft_data(stage: SFT, out_dir: Path, tok_path: str, seed: int, say=print):
    """(train rows, held-out rows, summary facts) for an SFT stage."""
    d, G = stage.data, stage.train.global_batch_size
    if d.prepared:
        source = PackedSource(d.prepared)
        n_eval = max(1, round(len(source) * d.eval_fraction))
        held_ids = np.sort(np.random.default_rng([seed, 7]).choice(len(source), n_eval, replace=False))
        train = PackedRows(source, G, seed, d.shuffle_window, held_ids)
        return train, RowRefs(source.path, tuple(int(i) for i in held_ids), source.seq_len), {
            "prepared": d.prepared, "packed_rows": len(source), "seq_len": source.seq_len}

    records = load_records(d, seed)
    train_rec, held_rec = split(records, d.eval_fraction, seed)
    held, _ = tokenized_rows(held_rec, tok_path, d)
    if not d.packing:
        rows, dropped = tokenized_rows(train_rec, tok_path, d)
        return PaddedRows(rows, G, seed), held, {"dropped_rows": dropped}

    stats = prepare_split(stage, out_dir / "data", train_rec, held_rec, tok_path, say)
    train = PackedRows(PackedSource(out_dir / "data"), G, seed, d.shuffle_window)
    keys = ("records_in", "kept", "exact_duplicate", "near_duplicate", "contaminated", "quarantined",
            "rows", "seq_len", "padding_share")
    return train, held, {k: stats[k] for k in keys if k in stats}


def prepare_split(stage: SFT, data_dir: Path, train_rec: list[dict], held_rec: list[dict], tok_path: str,
                  say=print) -> dict:
    """Run `rayllm data prepare` on the training records, decontaminated against the held-out
    ones, unless the same inputs were prepared before (a resumed run reuses them)."""
    from rayllm.data.prepare import prepare

    d = stage.data
    data_dir.mkdir(parents=True, exist_ok=True)
    fields = FieldMap(**{**d.prep.fields.model_dump(), "prompt": d.prompt_field, "response": d.response_field,
                         "messages": d.messages_field, "eval_text": "text"})
    cfg = DataPrepConfig(**{
        **d.prep.model_dump(), "fields": fields.model_dump(), "kind": "sft", "tokenizer": str(tok_path),
        "sources": [str(data_dir / "train.jsonl")], "output": str(data_dir),
        "eval_sets": [*d.prep.eval_sets, str(data_dir / "heldout.jsonl")]})
    train_lines = "".join(json.dumps(r) + "\n" for r in train_rec)
    held_lines = "".join(json.dumps({"text": _eval_text(r, d)}) + "\n" for r in held_rec)
    key = hashlib.sha256((cfg.model_dump_json() + train_lines + held_lines).encode()).hexdigest()[:16]
    stats_path = data_dir / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats.get("input_hash") == key and (data_dir / "packed").is_dir():
            say(f"[rayllm] {stage.name}: reusing prepared data in {data_dir}")
            return stats
    (data_dir / "train.jsonl").write_text(train_lines)
    (data_dir / "heldout.jsonl").write_text(held_lines)
    stats = prepare(cfg, progress=False)
    stats["input_hash"] = key
    write_json_atomic(stats_path, stats)
    return stats


def _eval_text(rec: dict, d) -> str:
    """The held-out record as the text decontamination compares against."""
    if d.messages_field in rec and isinstance(rec[d.messages_field], list):
        return "\n".join(str(m.get("content", "")) for m in rec[d.messages_field] if isinstance(m, dict))
    return f"{rec.get(d.prompt_field, '')}\n{rec.get(d.response_field, '')}"
