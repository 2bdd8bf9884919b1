"""`rayllm data prepare`: read -> clean -> exact dedup -> near dedup -> decontaminate -> tokenize
-> pack, on Ray Data, writing packed Parquet rows, a quarantine file and stats.json.

Every input record ends with exactly one status, so the summary always balances:
records in = kept + exact duplicates + near duplicates + contaminated + quarantined.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from rayllm import console
from rayllm.config import DataPrepConfig
from rayllm.data.clean import content_hash, length_ok, normalize
from rayllm.data.decontam import EvalIndex
from rayllm.data.filters import apply_filters, load_filter
from rayllm.data.minhash import MinHashConfig, near_duplicates
from rayllm.data.records import Fields, parse_file
from rayllm.io import write_json_atomic

STATUSES = ["kept", "exact_duplicate", "near_duplicate", "contaminated", "quarantined"]


class SourceError(ValueError):
    """A source that cannot be read at all."""


def list_sources(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for p in patterns:
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.is_file())
        elif "://" in p:
            found = [p]  # any pyarrow filesystem URI; Ray Data reads it
        else:
            found = sorted(glob.glob(p, recursive=True))
        if not found:
            raise SourceError(f"data source {p!r} matches no readable file")
        files += found
    return files


def dedup_text(rec: dict, kind: str) -> str:
    """The content that defines a duplicate, per record kind."""
    if kind == "text":
        return rec["text"]
    if kind == "sft":
        if "messages" in rec:
            return "\n".join(m.get("content", "") for m in rec["messages"] if isinstance(m, dict))
        return f"{rec['prompt']}\n{rec['response']}"
    if kind == "preference":
        return f"{rec['prompt']}\n{rec['chosen']}\n{rec['rejected']}"
    return rec["prompt"]


SMALL_INPUT_BYTES = 1 << 30


def shuffle_strategy(choice: str, files: list[str]):
    """Ray Data's shuffle for the exact-dedup groupby and the sorts. Its hash shuffle (Ray's
    default) starts a pool of aggregator actors for every shuffle, seconds each on a small
    cluster: a 540-record SFT set took 30-38 s to prepare with it on this 2-core machine and
    2.5-3 s with the pull-based sort shuffle, which runs on ordinary tasks, with the same output
    (docs/data.md). The hash shuffle is Ray's choice for large data, so "auto" keeps it for 1 GiB
    of input or more, and for remote URIs, whose size is not looked up."""
    from ray.data.context import ShuffleStrategy

    if choice == "auto":
        local = all("://" not in f for f in files)
        small = local and sum(os.path.getsize(f) for f in files) < SMALL_INPUT_BYTES
        choice = "sort" if small else "hash"
    return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if choice == "sort" else ShuffleStrategy.HASH_SHUFFLE


def _fields(cfg: DataPrepConfig) -> Fields:
    return Fields(**cfg.fields.model_dump(), kind=cfg.kind, max_chars=cfg.max_chars)


def _parse(row: dict, cfg_json: str, source_index: dict[str, int]) -> list[dict]:
    cfg = DataPrepConfig.model_validate_json(cfg_json)
    source = row["path"]
    parsed = parse_file(source, row["bytes"], _fields(cfg))
    base = source_index[source] << 32
    out = []
    for q in parsed.quarantined:
        out.append({"id": base + q["_line"], "source": source, "line": q["_line"], "status": "quarantined",
                    "reason": q["reason"], "record": json.dumps({"raw": q["raw"]}), "text": "", "hash": ""})
    for r in parsed.records:
        rec = {k: v for k, v in r.items() if not k.startswith("_")}
        if cfg.kind == "text":
            rec["text"] = normalize(rec["text"])
        text = normalize(dedup_text(rec, cfg.kind))
        reason = length_ok(text, cfg.min_chars, cfg.max_chars) or apply_filters(cfg.filters, text, rec)
        out.append({"id": base + r["_line"], "source": source, "line": r["_line"],
                    "status": "quarantined" if reason else "kept", "reason": reason or "",
                    "record": json.dumps(rec), "text": text, "hash": content_hash(text)})
    return out


def _mark_exact(group: dict) -> dict:
    """Within one content hash, the smallest id stays; the others are exact duplicates."""
    kept = group["status"] == "kept"
    if kept.sum() > 1:
        first = group["id"][kept].min()
        dup = kept & (group["id"] != first)
        group["status"] = np.where(dup, "exact_duplicate", group["status"])
        group["reason"] = np.where(dup, "same content as id " + str(first), group["reason"])
    return group


def prepare(cfg: DataPrepConfig, progress: bool = True) -> dict:
    import ray
    from ray.data.expressions import col

    t0 = time.time()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    files = list_sources(cfg.sources)
    for spec in cfg.filters:
        load_filter(spec)  # a filter that cannot load fails here, on the driver, by name
    index = {f: i for i, f in enumerate(files)}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Ray Data's default of 200 shuffle partitions costs seconds per shuffle on a small cluster.
    ctx.default_hash_shuffle_parallelism = cfg.shuffle_partitions or max(
        2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    ctx.shuffle_strategy = shuffle_strategy(cfg.shuffle_strategy, files)
    say = console.say if progress else (lambda *a, **k: None)

    say(f"[rayllm data] {len(files)} file(s): parse, clean, exact dedup")
    try:
        raw = ray.data.read_binary_files(files, include_paths=True)
    except Exception as e:
        raise SourceError(f"cannot read data sources {cfg.sources}: {e}") from None
    rows = raw.flat_map(_parse, fn_kwargs={"cfg_json": cfg.model_dump_json(), "source_index": index})
    if cfg.exact_dedup:
        # A hash group can hold quarantined rows too (hash ""); _mark_exact leaves them alone.
        rows = rows.groupby("hash").map_groups(_mark_exact, batch_format="numpy")
    rows = rows.materialize()

    near: dict[int, int] = {}
    if cfg.near_dedup:
        say("[rayllm data] near-duplicate search (MinHash LSH)")
        m = cfg.minhash
        near = near_duplicates(rows.filter(expr=col("status") == "kept"),
                               MinHashConfig(m.threshold, m.num_perm, m.shingle_words, m.seed))
    eval_index = None
    if cfg.eval_sets:
        eval_texts = {}
        for path in list_sources(cfg.eval_sets):
            parsed = parse_file(path, Path(path).read_bytes(), Fields(kind="text", text=cfg.fields.eval_text))
            eval_texts.update({f"{path}:{r['_line']}": r[cfg.fields.eval_text] for r in parsed.records})
        eval_index = EvalIndex(eval_texts, cfg.decontam_ngram)

    def finish(batch: dict) -> dict:
        status, reason = batch["status"].copy(), batch["reason"].copy()
        for i, (rid, text) in enumerate(zip(batch["id"], batch["text"])):
            if status[i] != "kept":
                continue
            if int(rid) in near:
                status[i], reason[i] = "near_duplicate", f"near duplicate of id {near[int(rid)]}"
            elif eval_index is not None and (hit := eval_index.match(text)):
                status[i], reason[i] = "contaminated", f"shares a {eval_index.n}-gram with {hit}"
        batch["status"], batch["reason"] = status, reason
        return batch

    rows = rows.map_batches(finish, batch_format="numpy").materialize()
    counts = {s: 0 for s in STATUSES}
    for block in rows.select_columns(["status"]).iter_batches(batch_format="numpy", batch_size=None):
        for status, n in zip(*np.unique(block["status"], return_counts=True)):
            counts[str(status)] += int(n)
    records_in = rows.count()

    # Quarantine and removal report: everything not kept, with source, line and reason.
    dropped = rows.filter(expr=col("status") != "kept").select_columns(["source", "line", "status", "reason", "record"])
    with open(out / ".removed.jsonl.tmp", "w") as f:  # streamed, sorted by source and line
        for r in dropped.sort(["source", "line"]).iter_rows():
            f.write(json.dumps({k: (int(v) if k == "line" else v) for k, v in r.items()}) + "\n")
    os.replace(out / ".removed.jsonl.tmp", out / "removed.jsonl")

    stats = {
        "records_in": records_in, **counts,
        "balanced": records_in == sum(counts.values()),
        "sources": len(files),
    }
    kept = rows.filter(expr=col("status") == "kept").select_columns(["id", "record"]).sort("id")
    if cfg.kind in ("text", "sft"):
        say("[rayllm data] tokenize and pack")
        stats.update(_tokenize_and_pack(kept, cfg, out))
    else:  # pairs and prompts are not packed: write the cleaned records
        _replace_dir(out / "records", lambda tmp: kept.write_parquet(str(tmp)))
    stats["wall_time_s"] = time.time() - t0
    write_json_atomic(out / "stats.json", stats)
    return stats


def _replace_dir(path: Path, write) -> None:
    import shutil

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _tokenize_and_pack(kept, cfg: DataPrepConfig, out: Path) -> dict:
    from rayllm.models import bundled_tokenizer_path

    tok_path = cfg.tokenizer or str(bundled_tokenizer_path())
    cfg_json = cfg.model_dump_json()

    def tokenize(batch: dict) -> dict:
        from rayllm.config import SFTDataConfig
        from rayllm.datasets.sft import _tokenizer, to_messages, tokenize_chat

        c = DataPrepConfig.model_validate_json(cfg_json)
        tok = _tokenizer(tok_path)
        ids, masks = [], []
        for rec in batch["record"]:
            rec = json.loads(rec)
            if c.kind == "text":
                t = tok(rec["text"]).input_ids + [tok.eos_token_id]
                m = [1] * len(t)
            else:
                sft = SFTDataConfig(prompt_field="prompt", response_field="response", messages_field="messages",
                                    max_length=10**9)
                row = tokenize_chat(tok, to_messages(rec, sft), sft.max_length)
                t, m = row["input_ids"], row["loss_mask"]
            ids.append(np.asarray(t, dtype=np.int32))
            masks.append(np.asarray(m, dtype=np.int8))
        return {"id": batch["id"], "input_ids": ids, "loss_mask": masks,
                "length": np.asarray([len(t) for t in ids], dtype=np.int64)}

    def pack_window(batch: dict) -> dict:
        from rayllm.data.pack import pack

        c = DataPrepConfig.model_validate_json(cfg_json)
        p = pack(list(batch["input_ids"]), c.seq_len, loss_masks=list(batch["loss_mask"]), overlap=c.overlap,
                 pad_id=_pad_id(tok_path))
        return {"input_ids": list(p.input_ids), "position_ids": list(p.position_ids), "loss_mask": list(p.loss_mask),
                "cu_seqlens": p.cu_seqlens, "doc_ids": [batch["id"][d] for d in p.doc_index],
                "real_tokens": np.asarray([int(cu[-1]) for cu in p.cu_seqlens])}

    ctx_order = kept.context.execution_options.preserve_order
    kept.context.execution_options.preserve_order = True  # deterministic windows under a seed
    tokens = kept.map_batches(tokenize, batch_format="numpy", batch_size=256).materialize()
    doc_lens = _column(tokens, "length")
    # Windows are equal shares of the id-sorted documents, one block each. Batches of pack_window
    # rows were cut along the sort's blocks instead, whose sizes follow its sampled range bounds
    # and so differ from run to run; so did the packed rows, and an SFT rerun's eval loss.
    windows = max(1, math.ceil(len(doc_lens) / cfg.pack_window))
    packed = tokens.repartition(windows).map_batches(pack_window, batch_format="numpy", batch_size=None).materialize()
    kept.context.execution_options.preserve_order = ctx_order
    _replace_dir(out / "packed", lambda tmp: packed.write_parquet(str(tmp)))
    fill = _column(packed, "real_tokens")
    rows = len(fill)
    plot = _plot_lengths(doc_lens, fill, cfg.seq_len, out / "lengths.png")
    hist, edges = np.histogram(doc_lens, bins=20)
    return {
        "documents_tokenized": int(len(doc_lens)), "tokens": int(doc_lens.sum()), "rows": rows,
        "seq_len": cfg.seq_len, "padding_share": float(1 - fill.sum() / max(1, rows * cfg.seq_len)),
        "doc_length_histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
        "plot": str(plot), "tokenizer": tok_path,
    }


def _column(ds, name: str) -> np.ndarray:
    """One integer column of a dataset, read block by block."""
    parts = [b[name] for b in ds.select_columns([name]).iter_batches(batch_format="numpy", batch_size=None)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _pad_id(tok_path: str) -> int:
    from rayllm.datasets.sft import _tokenizer

    return _tokenizer(tok_path).pad_token_id


def _plot_lengths(doc_lens: np.ndarray, fill: np.ndarray, seq_len: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist(doc_lens, bins=40)
    axes[0].set(title="documents before packing", xlabel="tokens", ylabel="count")
    axes[1].hist(fill, bins=40, range=(0, seq_len))
    axes[1].set(title=f"rows after packing (seq_len {seq_len})", xlabel="real tokens per row")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
