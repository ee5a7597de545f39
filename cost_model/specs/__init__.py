"""Typed specs: model, cluster, training setup and parallel mapping.

Field names follow Megatron-LM's arguments and ../shared/CONTRACT.md exactly. These are the
values every other package passes around; they validate what can be checked on their own
(a model's heads divide by its query groups, a mapping's sizes are positive). Checks that need
two specs together (tp divides heads, the world-size products) live in `validate.py`. One module per spec; import them from here.
"""

from .cluster import MAX_WORLD_SIZE, ClusterSpec, GPUSpec, NetworkTier
from .common import PositiveInt
from .mapping import Mapping
from .model import HFConfigRef, ModelInput, ModelSpec, PresetRef
from .training import TrainingSpec

__all__ = ["MAX_WORLD_SIZE", "ClusterSpec", "GPUSpec", "NetworkTier", "HFConfigRef", "Mapping", "ModelInput",
           "ModelSpec", "PositiveInt", "PresetRef", "TrainingSpec"]
