"""Quantization and weight sharing."""

from ..forms.shared import SharedWeights as SharedWeights
from .fixed_point import FixedPointTraining as FixedPointTraining
from .fixed_point import fixed_point as fixed_point
from .kmeans import fisher_diagonal as fisher_diagonal
from .kmeans import kmeans_1d as kmeans_1d
from .kmeans import share_weights as share_weights
from .kmeans import share_weights_global as share_weights_global
from .uniform import QuantizationAwareTraining as QuantizationAwareTraining
from .uniform import quantize_int8 as quantize_int8
from .uniform import quantize_model_int8 as quantize_model_int8
