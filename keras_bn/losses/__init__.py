"""Keras losses built on the hand-written ops of `keras_bn.ops`."""

from keras_bn.losses.categorical_crossentropy import CategoricalCrossentropy
from keras_bn.losses.categorical_crossentropy import SparseCategoricalCrossentropy
from keras_bn.losses.softmax_cross_entropy import SoftmaxCrossEntropy

__all__ = [
    "CategoricalCrossentropy",
    "SoftmaxCrossEntropy",
    "SparseCategoricalCrossentropy",
]
