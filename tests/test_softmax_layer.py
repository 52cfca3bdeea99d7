"""Tests for keras_bn.layers.softmax.Softmax against keras.layers.Softmax."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compiled

from keras_bn.layers.softmax import Softmax

SHAPE = (2, 3, 4)
MASKS = {
    "none": None,
    "full": np.random.default_rng(0).uniform(size=SHAPE) > 0.3,
    "broadcast": np.array([[[True, True, False, True]], [[False, True, True, True]]]),
    "last_axis": np.array([True, False, True, True]),
    "float": np.random.default_rng(1).uniform(size=SHAPE).astype("float32"),
    "entire_slice": np.concatenate(
        [np.zeros((1, 3, 4), bool), np.ones((1, 3, 4), bool)], axis=0
    ),
}


def output_and_grad(layer, x, mask):
    x = tf.convert_to_tensor(x)
    upstream = tf.constant(np.random.default_rng(2).normal(size=x.shape), x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x) if mask is None else layer(x, mask=tf.constant(mask))
    return y, tape.gradient(y, x, output_gradients=upstream)


@pytest.mark.parametrize("axis", [-1, 1, [1, 2], (0, -1), [-1]])
@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
def test_matches_keras_layer(axis, mask):
    x = np.random.default_rng(3).normal(size=SHAPE).astype("float32") * 3
    ours = output_and_grad(Softmax(axis=axis), x, MASKS[mask])
    theirs = output_and_grad(keras.layers.Softmax(axis=axis), x, MASKS[mask])
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if mask == "entire_slice" and axis == -1:
        np.testing.assert_array_equal(ours[0][0], np.zeros((3, 4)))


@pytest.mark.parametrize("dtype", ["float16", "mixed_float16", "bfloat16", "float64"])
def test_dtypes_and_masking_constant_match_keras(dtype):
    x = np.random.default_rng(4).normal(size=SHAPE) * 4
    mask = MASKS["full"]
    ours = Softmax(dtype=dtype)(x, mask=mask)
    theirs = keras.layers.Softmax(dtype=dtype)(x, mask=mask)
    assert ours.dtype == theirs.dtype
    tol = 1e-2 if "16" in dtype else 1e-12
    np.testing.assert_allclose(
        tf.cast(ours, tf.float64), tf.cast(theirs, tf.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_compiles_under_tf_function_and_xla(mode):
    x = tf.random.normal(SHAPE, seed=5)
    mask = tf.constant(MASKS["full"])
    layer = Softmax(axis=1)

    def fn(x):
        return output_and_grad(layer, x, mask)

    result = compiled(fn, mode)(x)
    expected = output_and_grad(keras.layers.Softmax(axis=1), x, mask)
    for a, b in zip(result, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad_mask", [np.ones((1, 2, 3, 4), bool), np.ones((2, 3, 2), bool)]
)
def test_bad_masks_are_rejected_as_keras_does(bad_mask):
    x = np.ones(SHAPE, "float32")
    with pytest.raises(ValueError, match="broadcastable") as ours:
        Softmax()(x, mask=bad_mask)
    with pytest.raises(ValueError) as theirs:
        keras.layers.Softmax()(x, mask=bad_mask)
    assert str(ours.value) == str(theirs.value)


def test_invalid_axis_is_rejected():
    with pytest.raises(TypeError, match="`axis`"):
        Softmax(axis="last")
    with pytest.raises(TypeError, match="`axis`"):
        Softmax(axis=[])


@pytest.mark.parametrize("axis", [-1, [-1], [1, 2]])
def test_keras_losses_see_the_logits_as_for_keras_layer(axis):
    # Saturated logits: with probabilities, clipping would change the loss.
    logits = tf.constant(np.random.default_rng(6).normal(size=SHAPE) * 30, tf.float32)
    labels = tf.one_hot(np.random.default_rng(7).integers(0, 4, size=SHAPE[:2]), 4)
    loss = keras.losses.CategoricalCrossentropy()
    ours = loss(labels, Softmax(axis=axis)(logits))
    theirs = loss(labels, keras.layers.Softmax(axis=axis)(logits))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    from_logits = keras.losses.CategoricalCrossentropy(from_logits=True)(labels, logits)
    assert np.isclose(ours, from_logits, rtol=1e-6) == (axis != [1, 2])


def test_mask_propagates_as_keras():
    x = np.random.default_rng(8).normal(size=SHAPE).astype("float32")
    mask = tf.constant(MASKS["full"])
    ours, theirs = Softmax()(x, mask=mask), keras.layers.Softmax()(x, mask=mask)
    np.testing.assert_array_equal(ours._keras_mask, theirs._keras_mask)
    # A per-timestep mask (Masking, Embedding) does not broadcast against the
    # class axis: Keras's layer rejects it, and so does ours.
    inputs = keras.Input((3, 4))
    masked = keras.layers.Masking()(inputs)
    errors = []
    for layer in [Softmax(), keras.layers.Softmax()]:
        model = keras.Model(inputs, layer(masked))
        with pytest.raises(ValueError, match="broadcastable") as error:
            model(x)
        errors.append(str(error.value).split("Arguments received")[0])
    assert errors[0] == errors[1]


def test_config_and_keras_file_round_trip(tmp_path):
    layer = Softmax(axis=[1, 2], name="probs", dtype="float64")
    config = layer.get_config()
    assert config["axis"] == [1, 2]
    assert Softmax.from_config(config).get_config() == config
    assert keras.saving.get_registered_name(Softmax) == "keras_bn>Softmax"
    assert layer.compute_output_shape((None, 3, 4)) == (None, 3, 4)
    model = keras.Sequential([keras.Input((3, 4)), Softmax(axis=1)])
    path = os.path.join(tmp_path, "softmax.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored.layers[-1]) is Softmax
    assert restored.layers[-1].axis == 1
    x = np.random.default_rng(9).normal(size=(2, 3, 4))
    np.testing.assert_array_equal(restored(x), model(x))
