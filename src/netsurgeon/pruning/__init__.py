"""Pruning methods: one module per paper."""

from .magnitude import magnitude_mask as magnitude_mask
from .magnitude import prune_and_retrain as prune_and_retrain
from .magnitude import prune_magnitude as prune_magnitude
from .magnitude import quality_mask as quality_mask
