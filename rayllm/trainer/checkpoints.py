"""Resuming a stage from its DeepSpeed checkpoints."""
from __future__ import annotations

from pathlib import Path


def resume_state(group, ckpt_dir: Path, fingerprint: str, stage_name: str) -> dict:
    """The client state of the latest checkpoint in ckpt_dir ({"step": 0, ...} when there is
    none). A checkpoint taken on other data is refused: resuming it would feed the wrong rows."""
    state = group.load_checkpoint(ckpt_dir) or {"step": 0, "data": fingerprint}
    if state.get("data") != fingerprint:
        raise ValueError(f"{stage_name}: the checkpoint in {ckpt_dir} was taken on other data "
                         f"({state.get('data')} != {fingerprint}); remove it to start over")
    return state
