"""keras_bn.models.fold_batch_normalization: predictions of the folded copy.

Reference: the original model's own predictions (Keras's layers, BN applied
after the convolution), and for the weights a closed form in NumPy.

Tolerances: folding changes each kernel entry by one float32 rounding
(relative 6e-8) and regroups the per-channel affine map. An output sums
at most about 100 products here (a 3x3 kernel over 8 input channels), each
with relative error near 1e-7, so the difference stays below
1e-6 * max|output|; rtol=1e-5 of the largest output keeps a margin of ten.
The keras.applications models stack some 50 such layers, and errors grow
with depth and with the output scale; there the bound is 1e-4 of the largest
output, still far below the effect of a wrong scale or bias (of order 1).
"""

import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import APPLICATIONS
from helpers import assert_as_close_as_float32_allows

import keras_bn
from keras_bn.models import fold_batch_normalization

L = keras.layers
BN_CLASSES = {"keras": L.BatchNormalization, "keras_bn": keras_bn.BatchNormalization}


def randomize(model, seed=0):
    """Random BN weights and statistics, and random biases, everywhere."""
    rng = np.random.default_rng(seed)
    for layer in keras_bn.models.batch_normalization_layers(model):
        shape = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(0.0, 0.5, shape))
        layer.moving_variance.assign(rng.uniform(0.3, 2.0, shape))
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 0.5, shape))
    for layer in model.layers:
        if getattr(layer, "use_bias", False) and hasattr(layer, "bias"):
            layer.bias.assign(rng.normal(0.0, 0.5, layer.bias.shape))
    return model


def under_xla(model):
    """`model` for `assert_same_predictions`, run compiled by XLA.

    For channels-first convolutions: XLA's CPU convolution takes that layout,
    TensorFlow's own CPU Conv2D kernel only with oneDNN on
    (TF_ENABLE_ONEDNN_OPTS=1, the default on CPUs with AVX-512).
    """
    run = tf.function(lambda x: model(x, training=False), jit_compile=True)
    return lambda x, training: run(x)


def assert_same_predictions(model, folded, x, rtol=1e-5):
    expected = np.asarray(model(x, training=False))
    actual = np.asarray(folded(x, training=False))
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def batch_norm_count(model):
    return len(keras_bn.models.batch_normalization_layers(model))


LINEAR_LAYERS = {
    "Conv1D": (lambda: L.Conv1D(4, 3), (9, 3)),
    "Conv2D": (lambda: L.Conv2D(4, 3, use_bias=False), (6, 6, 3)),
    "Conv2D groups": (lambda: L.Conv2D(4, 3, groups=2), (6, 6, 4)),
    "Conv2D channels_first": (
        lambda: L.Conv2D(4, 3, data_format="channels_first"),
        (3, 7, 9),
    ),
    "Conv3D": (lambda: L.Conv3D(4, 2), (4, 4, 4, 2)),
    "Conv1DTranspose": (lambda: L.Conv1DTranspose(4, 3, strides=2), (5, 3)),
    # As many input as output channels: scaling the wrong axis cannot crash.
    "Conv2DTranspose": (lambda: L.Conv2DTranspose(4, 3, strides=2), (4, 4, 4)),
    "Conv3DTranspose": (lambda: L.Conv3DTranspose(4, 2), (3, 3, 3, 2)),
    "DepthwiseConv1D": (lambda: L.DepthwiseConv1D(3, depth_multiplier=2), (9, 3)),
    "DepthwiseConv2D": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (6, 6, 3)),
    "SeparableConv1D": (lambda: L.SeparableConv1D(4, 3, depth_multiplier=2), (9, 3)),
    "SeparableConv2D": (lambda: L.SeparableConv2D(4, 3, use_bias=False), (6, 6, 3)),
    "Dense": (lambda: L.Dense(4), (5,)),
    "Dense on sequences": (lambda: L.Dense(4, use_bias=False), (3, 5)),
}


@pytest.mark.parametrize("bn_class", list(BN_CLASSES))
@pytest.mark.parametrize("name", list(LINEAR_LAYERS))
def test_each_linear_layer_folds_with_equal_predictions(name, bn_class):
    make_layer, shape = LINEAR_LAYERS[name]
    linear = make_layer()
    inputs = keras.Input(shape)
    axis = 1 if "channels_first" in name else -1
    # Without beta (Keras's) or without gamma (keras_bn's): both defaults fold.
    options = {"center": False} if bn_class == "keras" else {"scale": False}
    outputs = BN_CLASSES[bn_class](axis=axis, **options)(linear(inputs))
    model = randomize(keras.Model(inputs, outputs))
    folded = fold_batch_normalization(model)
    assert batch_norm_count(folded) == 0
    assert [type(layer) for layer in folded.layers[1:]] == [type(linear)]
    assert folded.layers[1].use_bias and folded.layers[1].name == linear.name
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype("float32")
    if "channels_first" in name:
        model, folded = under_xla(model), under_xla(folded)
    assert_same_predictions(model, folded, x)


def test_folded_weights_follow_the_closed_form():
    inputs = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3)
    bn = keras_bn.BatchNormalization(epsilon=0.01)
    model = randomize(keras.Model(inputs, bn(conv(inputs))))
    kernel, bias = fold_batch_normalization(model).layers[1].get_weights()
    gamma, beta, mean, variance = (np.asarray(w, "float64") for w in bn.get_weights())
    for channel in range(4):
        scale = gamma[channel] / np.sqrt(variance[channel] + 0.01)
        expected_kernel = np.asarray(conv.kernel)[..., channel] * scale
        np.testing.assert_allclose(kernel[..., channel], expected_kernel, rtol=1e-6)
        expected_bias = (np.asarray(conv.bias)[channel] - mean[channel]) * scale
        np.testing.assert_allclose(
            bias[channel], expected_bias + beta[channel], rtol=1e-6
        )


def _branching_model():
    """Each BN here is of a kind that must not fold."""
    inputs = keras.Input((6, 6, 3))
    first = L.BatchNormalization(name="on_the_input")(inputs)
    relu_conv = L.Conv2D(4, 3, padding="same", activation="relu", name="relu_conv")
    after_activation = L.BatchNormalization(name="after_relu")(relu_conv(first))
    conv = L.Conv2D(4, 3, padding="same", name="two_consumers")
    hidden = conv(after_activation)
    branch = keras_bn.BatchNormalization(name="sibling")(hidden)
    added = L.Add()([hidden, branch])  # conv feeds the BN and the Add
    after_add = keras_bn.BatchNormalization(name="after_add")(added)
    shared = L.Conv2D(4, 1, name="shared")
    left = keras_bn.BatchNormalization(name="shared_left")(shared(after_add))
    right = shared(left)  # a layer called twice does not fold
    rows = keras_bn.BatchNormalization(axis=[1, 3], name="two_axes")(
        L.Conv2D(4, 1, name="before_two_axes")(right)
    )
    return randomize(keras.Model(inputs, rows))


def test_batch_normalization_that_cannot_fold_stays_and_predicts_the_same():
    model = _branching_model()
    with pytest.warns(UserWarning, match="'two_axes'.*several feature axes"):
        folded = fold_batch_normalization(model)
    kept = {layer.name: type(layer) for layer in folded.layers}
    for name in ("on_the_input", "after_relu", "sibling", "after_add", "shared_left"):
        assert kept[name] is L.BatchNormalization  # keras_bn's became Keras's
    assert kept["two_axes"] is keras_bn.BatchNormalization
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 3)).astype("float32")
    assert_same_predictions(model, folded, x)


def test_channels_first_with_as_many_columns_as_channels_stays_unfolded():
    inputs = keras.Input((3, 6, 6))  # output (4, 4, 4): width == channels
    conv = L.Conv2D(4, 3, data_format="channels_first")
    model = randomize(keras.Model(inputs, L.BatchNormalization(axis=1)(conv(inputs))))
    with pytest.warns(UserWarning, match="channels_first"):
        folded = fold_batch_normalization(model)
    assert batch_norm_count(folded) == 1
    x = np.random.default_rng(3).normal(size=(2, 3, 6, 6)).astype("float32")
    assert_same_predictions(under_xla(model), under_xla(folded), x)


def test_nested_sequential_folds_and_the_original_is_untouched():
    inner = keras.Sequential(
        [keras.Input((8,)), L.Dense(6), keras_bn.BatchNormalization(), L.ReLU()]
    )
    model = randomize(
        keras.Sequential([keras.Input((8,)), inner, L.Dense(3), L.BatchNormalization()])
    )
    randomize(inner, seed=1)
    before = [np.array(w) for w in model.weights]
    folded = fold_batch_normalization(model)
    assert isinstance(folded, keras.Sequential)
    assert isinstance(folded.layers[0], keras.Sequential)
    assert batch_norm_count(folded) == 0
    x = np.random.default_rng(4).normal(size=(5, 8)).astype("float32")
    assert_same_predictions(model, folded, x)
    for value, variable in zip(before, model.weights):
        np.testing.assert_array_equal(value, variable)
    shared = {id(v) for v in model.weights} & {id(v) for v in folded.weights}
    assert not shared


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)
        self.bn = L.BatchNormalization()

    def call(self, x):
        return self.bn(self.dense(x))


def test_a_subclassed_model_gets_a_clear_error():
    model = Subclassed()
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="subclassed model of class Subclassed.*fold"):
        fold_batch_normalization(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_keras_applications_fold_completely(name):
    keras.utils.set_random_seed(5)
    model = randomize(APPLICATIONS[name]())
    x = np.random.default_rng(5).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    wrapped = keras.Sequential([keras.Input((32, 32, 3)), model])  # nested
    folded = fold_batch_normalization(wrapped)
    assert batch_norm_count(model) > 50 and batch_norm_count(folded) == 0
    assert_as_close_as_float32_allows(name, model, folded, x)


SAVED_MODEL_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["keras_bn"] = None  # any import of keras_bn now fails
    import keras, numpy as np
    model = keras.saving.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], model.predict(x, verbose=0))
    """
)


@pytest.mark.slow
def test_folded_model_saves_and_loads_where_keras_bn_cannot_be_imported(tmp_path):
    inputs = keras.Input((8, 8, 3))
    hidden = keras_bn.BatchNormalization()(inputs)  # stays, as Keras's layer
    hidden = L.Conv2D(4, 3, use_bias=False)(hidden)
    hidden = keras_bn.BatchNormalization(virtual_batch_size=2, momentum=None)(hidden)
    hidden = L.ReLU()(hidden)
    outputs = keras_bn.BatchNormalization()(L.Dense(2)(L.Flatten()(hidden)))
    model = randomize(keras.Model(inputs, outputs))
    model.compile("adam", keras_bn.losses.SoftmaxCrossEntropy())
    folded = fold_batch_normalization(model)
    assert not folded.compiled  # its compile config would name keras_bn's loss
    folded.save(tmp_path / "folded.keras")
    x = np.random.default_rng(6).normal(size=(4, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    paths = [str(tmp_path / name) for name in ("folded.keras", "x.npy", "y.npy")]
    result = subprocess.run(
        [sys.executable, "-c", SAVED_MODEL_CHECK, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = np.asarray(model(x))
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), expected, atol=1e-5 * np.abs(expected).max()
    )
