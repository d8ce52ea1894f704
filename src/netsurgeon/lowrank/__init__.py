"""Low-rank factorization and compact filters (the survey's second and third families, Cheng et al. Sec. 3-4):
truncated SVD of Linear layers (:mod:`.svd`), spatial / CP / Tucker / depthwise-separable factorizations of
convolutions (:mod:`.conv`), chosen per layer under one energy threshold or weight budget (:mod:`.factorize`),
registered as the methods ``lowrank`` and ``separable`` (:mod:`.methods`)."""

from . import methods  # noqa: F401  (registers the methods)
from .conv import CONV_KINDS, conv_structure, factorize_conv
from .factorize import factor_structure, factorize_layers, lowrank_factorize, match_outputs
from .methods import LowRankConfig, SeparableConfig, separable_factorize
from .svd import choose_ranks, energy_rank, factorize_linear, svd_ranks

__all__ = ["CONV_KINDS", "conv_structure", "factorize_conv", "factor_structure", "factorize_layers",
           "lowrank_factorize", "match_outputs", "LowRankConfig", "SeparableConfig", "separable_factorize",
           "choose_ranks", "energy_rank", "factorize_linear", "svd_ranks"]
