"""Keras layers built on keras_bn's ops."""

from keras_bn.layers.batch_normalization import BatchNormalization
from keras_bn.layers.softmax import Softmax

__all__ = ["BatchNormalization", "Softmax"]
