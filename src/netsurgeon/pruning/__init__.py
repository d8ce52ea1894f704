"""Pruning methods: one module per paper."""

from .autoprune import AutoPrune as AutoPrune
from .dns import DNS as DNS
from .dns import calibrate_c_rate as calibrate_c_rate
from .dns import dns_thresholds as dns_thresholds
from .dns import dns_update_mask as dns_update_mask
from .dns import surgery_probability as surgery_probability
from .magnitude import magnitude_mask as magnitude_mask
from .magnitude import prune_and_retrain as prune_and_retrain
from .magnitude import prune_magnitude as prune_magnitude
from .magnitude import quality_mask as quality_mask
from .schedules import GradualPruning as GradualPruning
from .schedules import polynomial_sparsity as polynomial_sparsity
from .woodfisher import FisherConfig as FisherConfig
from .woodfisher import OneShotPruner as OneShotPruner
from .woodfisher import one_shot_prune as one_shot_prune
