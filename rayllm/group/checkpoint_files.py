"""A disk checkpoint is every rank's snapshot (rayllm.group.state) as files: its fragments in
safetensors, the fragment layout and the shared scalars in JSON. Any world size assembles them,
so a run resumes on a different number of ranks, and nothing in a checkpoint is a pickle.

    <dir>/<tag>/rank0.safetensors, rank0.json, ..., rayllm.json   (written as <tag>.partial, then renamed)

DeepSpeed's own checkpoints are tied to the world size they were taken at (its universal
checkpoints convert them offline) and are pickles, which run code when loaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayllm.group.state import Snapshot

_SEP = "::"  # parameter name :: state key ("value", "exp_avg", ...) as the safetensors key


def _jsonable(x):
    if torch.is_tensor(x):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def write_snapshot(snap: Snapshot, directory: str | Path, rank: int) -> None:
    """Rank `rank`'s snapshot into `directory` (each file written to a temporary name, then renamed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, layout = {}, {}
    for name, frag in snap["params"].items():
        layout[name] = {k: frag[k] for k in ("start", "numel", "full")}
        for key, t in frag.items():
            if torch.is_tensor(t):
                tensors[f"{name}{_SEP}{key}"] = t.contiguous()
    tmp = directory / f".rank{rank}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / f"rank{rank}.safetensors")
    tmp = directory / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "params": layout, "scalars": snap["scalars"]}, default=_jsonable))
    os.replace(tmp, directory / f"rank{rank}.json")


def read_snapshots(directory: str | Path, world_size: int) -> list[Snapshot]:
    """The snapshots of all `world_size` ranks a checkpoint was taken on; a missing file is named."""
    directory = Path(directory)
    out = []
    for r in range(world_size):
        meta_path, data_path = directory / f"rank{r}.json", directory / f"rank{r}.safetensors"
        for p in (meta_path, data_path):
            if not p.is_file():
                raise FileNotFoundError(f"checkpoint {directory} lacks {p.name} (taken on {world_size} ranks)")
        meta, tensors = json.loads(meta_path.read_text()), load_file(str(data_path))
        params = {name: dict(lay) for name, lay in meta["params"].items()}
        for key, t in tensors.items():
            name, state_key = key.rsplit(_SEP, 1)
            params[name][state_key] = t
        out.append({"params": params, "scalars": meta["scalars"]})
    return out
