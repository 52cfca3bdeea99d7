"""Keras's own BatchNormalization tests, run against keras_bn's class.

The `keras` wheel ships its layer's test module
(`keras/src/layers/normalization/batch_normalization_test.py`). This file
runs that module as it is, with `layers.BatchNormalization` swapped for
`keras_bn.BatchNormalization`, so the suite is always the one of the
installed Keras release (3.15.1 in CI), with no exception.
"""

import types

import pytest

import keras_bn

suite = pytest.importorskip("keras.src.layers.normalization.batch_normalization_test")


class _Layers(types.ModuleType):
    """`keras.src.layers` with keras_bn's BatchNormalization in it."""

    def __init__(self, layers):
        super().__init__(layers.__name__)
        self._layers = layers
        self.BatchNormalization = keras_bn.BatchNormalization

    def __getattr__(self, name):
        return getattr(self._layers, name)


@pytest.fixture(autouse=True)
def _keras_bn_class(monkeypatch):
    monkeypatch.setattr(suite, "layers", _Layers(suite.layers))


class TestKerasSuite(suite.BatchNormalizationTest):
    """Every test of Keras's suite, on keras_bn's class."""


def test_the_suite_runs_on_keras_bn_s_class():
    """The swap reaches the suite's module (else it would test Keras)."""
    assert suite.layers.BatchNormalization is keras_bn.BatchNormalization
