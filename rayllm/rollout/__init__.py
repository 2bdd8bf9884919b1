"""Rollout generation: vLLM (or HF `generate`) engines in Ray actors, with verified weight sync."""
from rayllm.rollout.pool import RolloutPool, SyncMismatch
from rayllm.rollout.sample import Sample

__all__ = ["RolloutPool", "Sample", "SyncMismatch"]
