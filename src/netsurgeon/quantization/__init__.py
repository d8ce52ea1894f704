"""Quantization and weight sharing."""

from .fixed_point import FixedPointTraining as FixedPointTraining
from .fixed_point import fixed_point as fixed_point
from .kmeans import SharedWeights as SharedWeights
from .kmeans import kmeans_1d as kmeans_1d
from .kmeans import share_weights as share_weights
from .kmeans import share_weights_global as share_weights_global
