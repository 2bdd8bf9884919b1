"""Resuming a stage from its DeepSpeed checkpoints."""
from __future__ import annotations

from pathlib import Path

from rayllm.group.model_group import CheckpointRefused, checkpoint_meta


def resume_state(group, ckpt_dir: Path, fingerprint: str, stage_name: str) -> dict:
    """The client state of the latest checkpoint in ckpt_dir ({"step": 0, ...} when there is
    none). A checkpoint taken on other data is refused: resuming it would feed the wrong rows.
    The check reads the checkpoint's rayllm.json, before DeepSpeed unpickles anything."""
    found = checkpoint_meta(ckpt_dir)
    if found is None:
        return {"step": 0, "data": fingerprint}
    tag, meta = found
    if meta.get("data") != fingerprint:
        raise CheckpointRefused(f"{stage_name}: the checkpoint in {ckpt_dir} was taken on other data "
                                f"({meta.get('data')} != {fingerprint}); remove it to start over")
    return group.load_checkpoint(ckpt_dir, tag, data=fingerprint)
