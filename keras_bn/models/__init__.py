"""Tools for models with batch normalization.

Sequential and Functional models (nested ones included), with
`keras.layers.BatchNormalization` or `keras_bn.BatchNormalization` layers.
"""

from keras_bn.models.batch_norm_layers import batch_normalization_layers
from keras_bn.models.batch_norm_layers import is_batch_normalization
from keras_bn.models.recompute import recompute_statistics

__all__ = [
    "batch_normalization_layers",
    "is_batch_normalization",
    "recompute_statistics",
]
