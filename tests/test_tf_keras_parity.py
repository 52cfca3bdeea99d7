"""keras_bn against tf-keras 2 (the `tf-keras` test extra) where a user
migrating from it would notice: ghost batch grouping, integer inputs, and
the `synchronized`/`fused` checks."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import random_batch_norm_weights

import keras_bn

tf_keras = pytest.importorskip("tf_keras", reason="the 'test' extra")


def _ghost_pair(rng, shape, axis, v):
    ours = keras_bn.BatchNormalization(axis=axis, virtual_batch_size=v, momentum=0.5)
    theirs = tf_keras.layers.BatchNormalization(
        axis=axis, virtual_batch_size=v, momentum=0.5
    )
    ours.build(shape)
    theirs.build(shape)
    features = ours.gamma.shape
    weights = random_batch_norm_weights(rng, features)
    ours.set_weights(weights)
    # tf-keras keeps ghost-BN weights at broadcast shape ([1, 1, C] here).
    theirs.set_weights([w.reshape(v.shape) for w, v in zip(weights, theirs.weights)])
    return ours, theirs


def _step(layer, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * dy)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [tf.reshape(t, [-1]) for t in [y, *grads]] + [
        tf.reshape(w, [-1]) for w in (layer.moving_mean, layer.moving_variance)
    ]


def test_ghost_batches_interleave_examples_as_tf_keras_does():
    """Batch 6, v = 3: tf-keras's virtual batches are examples 0, 2, 4 and
    1, 3, 5 (moving variance 72.9 for x = arange(6)**2, momentum 0)."""
    x = (np.arange(6, dtype="float32") ** 2)[:, None]
    ours = keras_bn.BatchNormalization(virtual_batch_size=3, momentum=0.0)
    theirs = tf_keras.layers.BatchNormalization(virtual_batch_size=3, momentum=0.0)
    np.testing.assert_allclose(
        ours(x, training=True), theirs(x, training=True), rtol=1e-5, atol=1e-6
    )
    want = np.mean([np.var(x[0::2]), np.var(x[1::2])])  # 72.888...
    np.testing.assert_allclose(ours.moving_variance, [want], rtol=1e-6)
    np.testing.assert_allclose(
        np.ravel(theirs.moving_variance), ours.moving_variance, rtol=1e-6
    )


@pytest.mark.parametrize(
    "shape,axis", [((12, 5), -1), ((8, 3, 4), -1), ((6, 2, 3, 4), 1)]
)
def test_ghost_batches_give_tf_keras_s_outputs_gradients_and_statistics(
    rng, shape, axis
):
    ours, theirs = _ghost_pair(rng, shape, axis, v=shape[0] // 2)
    x = tf.constant(rng.normal(2.0, 3.0, shape), tf.float32)
    dy = tf.constant(rng.normal(size=shape), tf.float32)
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, a, b in zip(names, _step(ours, x, dy), _step(theirs, x, dy)):
        # float32 sums over at most a few dozen terms of size ~10.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_the_consecutive_grouping_stays_available_and_serializes():
    x = (np.arange(6, dtype="float32") ** 2)[:, None]
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=3, momentum=0.0, virtual_batch_grouping="consecutive"
    )
    y = layer(x, training=True).numpy()
    for part in (slice(0, 3), slice(3, 6)):
        want = (x[part] - x[part].mean()) / np.sqrt(x[part].var() + 1e-3)
        np.testing.assert_allclose(y[part], want, rtol=1e-5, atol=1e-5)
    config = layer.get_config()
    assert config["virtual_batch_grouping"] == "consecutive"
    twin = keras_bn.BatchNormalization.from_config(config)
    assert twin.virtual_batch_grouping == "consecutive"
    with pytest.raises(ValueError, match="virtual_batch_grouping"):
        keras_bn.BatchNormalization(virtual_batch_grouping="strided")


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8"])
@pytest.mark.parametrize("training", [True, False])
def test_integer_inputs_are_cast_as_tf_keras_and_keras_do(rng, dtype, training):
    x = rng.integers(0, 50, size=(16, 4)).astype(dtype)
    ours = keras_bn.BatchNormalization(momentum=0.5)
    theirs = tf_keras.layers.BatchNormalization(momentum=0.5)
    y_ours, y_theirs = ours(x, training=training), theirs(x, training=training)
    assert y_ours.dtype == y_theirs.dtype == tf.float32
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ours.moving_variance, theirs.moving_variance, rtol=1e-5, atol=1e-5
    )


def test_synchronized_and_fused_are_refused_in_the_constructor():
    with pytest.raises(ValueError, match="fused"):
        tf_keras.layers.BatchNormalization(synchronized=True, fused=True)
    with pytest.raises(ValueError, match=r"`fused=True`.*synchronized=True"):
        keras_bn.BatchNormalization(synchronized=True, fused=True)
    keras_bn.BatchNormalization(synchronized=True, fused=None)  # automatic: fine


def test_fused_stays_as_passed_where_tf_keras_resolves_it(rng):
    """A documented difference (docs/layer.md): tf-keras fixes its path in
    `build`; keras_bn's `fused=None` chooses per call, so the attribute and
    the config keep the value passed."""
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    theirs = tf_keras.layers.BatchNormalization()
    theirs(x)
    assert theirs.fused is True  # resolved by rank
    for fused in (None, True, False):
        ours = keras_bn.BatchNormalization(fused=fused)
        ours(x)
        assert ours.fused is fused and ours.get_config()["fused"] is fused
