"""Quantization and weight sharing."""

from .kmeans import SharedWeights as SharedWeights
from .kmeans import kmeans_1d as kmeans_1d
from .kmeans import share_weights as share_weights
from .kmeans import share_weights_global as share_weights_global
