"""Tools for models with batch normalization: recompute, fold, convert.

Sequential and Functional models (nested ones included), with
`keras.layers.BatchNormalization` or `keras_bn.BatchNormalization` layers.
"""

from keras_bn.models.batch_norm_layers import batch_normalization_layers
from keras_bn.models.batch_norm_layers import is_batch_normalization
from keras_bn.models.convert import convert_batch_normalization
from keras_bn.models.fold import fold_batch_normalization
from keras_bn.models.recompute import recompute_statistics

__all__ = [
    "batch_normalization_layers",
    "convert_batch_normalization",
    "fold_batch_normalization",
    "is_batch_normalization",
    "recompute_statistics",
]
