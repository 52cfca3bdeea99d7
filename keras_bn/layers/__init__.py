"""Keras layers built on keras_bn's ops."""

from keras_bn.layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]
