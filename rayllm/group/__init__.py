"""Model groups: one model role per group, N Ray actors, one DeepSpeed rank each."""
from rayllm.group.model_group import ModelGroup
from rayllm.group.placement import BelowMinimum, Placement
from rayllm.group.recovery import StateLost

__all__ = ["BelowMinimum", "ModelGroup", "Placement", "StateLost"]
