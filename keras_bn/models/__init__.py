"""Tools for models with batch normalization: recompute, fold, convert.

Sequential and Functional models (nested ones, Functional subclasses such as
keras-hub backbones, and `keras.ops` calls included), with
`keras.layers.BatchNormalization` or `keras_bn.BatchNormalization` layers;
`batch_normalization_scope` for models built in Python.
"""

from keras_bn.models.batch_norm_layers import batch_normalization_layers
from keras_bn.models.convert import convert_batch_normalization
from keras_bn.models.fold import fold_batch_normalization
from keras_bn.models.recompute import recompute_statistics
from keras_bn.models.scope import batch_normalization_scope

__all__ = [
    "batch_normalization_layers",
    "batch_normalization_scope",
    "convert_batch_normalization",
    "fold_batch_normalization",
    "recompute_statistics",
]
