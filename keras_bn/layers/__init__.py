"""Keras layers built on keras_bn's ops."""

from keras_bn.layers.batch_normalization import BatchNormalization
from keras_bn.layers.linear_cross_entropy_head import LinearCrossEntropyHead
from keras_bn.layers.linear_cross_entropy_head import per_token_loss
from keras_bn.layers.softmax import Softmax

__all__ = [
    "BatchNormalization",
    "LinearCrossEntropyHead",
    "Softmax",
    "per_token_loss",
]
