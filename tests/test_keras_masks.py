"""Masks as Keras 3 reads them: every mask Keras's layer accepts gives
Keras's outputs, moving statistics and gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import random_batch_norm_weights

import keras_bn

# (input shape, axis, mask shape): a mask of one axis less is expanded at the
# last axis and broadcast, even where that axis is not a feature axis.
KERAS_MASKS = [
    ((5, 2, 3), 1, (5, 2)),  # Masking before axis=1: differs by feature
    ((5, 2, 3), -1, (5, 2)),
    ((1, 2, 3, 4), -1, (1, 2, 1)),  # broadcast over the batch's axes too
    ((6, 3, 4, 2), 1, (6, 3, 4)),
    ((6, 3, 4, 2), 2, (6, 1, 4)),
]


def _pair(axis, shape, rng):
    ours = keras_bn.BatchNormalization(axis=axis, momentum=0.5)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.5)
    for layer in (ours, theirs):
        layer.build(shape)
    features = ours.gamma.shape
    weights = random_batch_norm_weights(rng, features)
    for layer in (ours, theirs):
        layer.set_weights(weights)
    return ours, theirs


def _step(layer, x, mask, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        # dy is nonzero at masked positions too: their outputs depend on the
        # statistics, and Keras differentiates them like the others.
        loss = tf.reduce_sum(y * dy)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [y, *grads, layer.moving_mean, layer.moving_variance]


@pytest.mark.parametrize("shape,axis,mask_shape", KERAS_MASKS)
def test_every_keras_mask_gives_keras_s_results(rng, shape, axis, mask_shape):
    ours, theirs = _pair(axis, shape, rng)
    x = tf.constant(rng.normal(3.0, 2.0, shape), tf.float32)
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0] = True
    mask = tf.constant(mask)
    dy = tf.constant(rng.normal(size=shape), tf.float32)
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    got, want = _step(ours, x, mask, dy), _step(theirs, x, mask, dy)
    for name, a, b in zip(names, got, want):
        # float32 sums of a few dozen terms of size ~10: rounding ~1e-5.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_full_rank_mask_reaches_the_channels_first_layout(rng):
    """`mask[:, None]` masks positions of a channels-first input, where a
    mask of one axis less would follow Keras's rule."""
    x = rng.normal(size=(4, 3, 3)).astype("float32")  # (batch, channels, steps)
    positions = rng.random((4, 3)) < 0.6  # (batch, steps)
    positions[0, 0] = True
    layer = keras_bn.BatchNormalization(axis=1, center=False, scale=False)
    y = layer(x, training=True, mask=positions[:, None]).numpy()
    kept = x.transpose(0, 2, 1)[positions]  # (positions, channels)
    want = (x - kept.mean(0)[:, None]) / np.sqrt(kept.var(0)[:, None] + 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # The same (4, 3) mask without the channel axis means Keras's rule:
    # entry [b, c] masks channel c of example b at every step.
    keras_y = keras.layers.BatchNormalization(axis=1, center=False, scale=False)(
        x, training=True, mask=positions
    )
    np.testing.assert_allclose(
        layer(x, training=True, mask=positions), keras_y, rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(keras_y, want, atol=1e-3)


@pytest.mark.parametrize("mask_shape", [(4, 2), (4, 3, 5, 1), (3,)])
def test_masks_keras_refuses_raise_a_clear_error(rng, mask_shape):
    layer = keras_bn.BatchNormalization(axis=1)
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    layer(x, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match=r"`mask` of layer"):
        layer(x, training=True, mask=np.ones(mask_shape, bool))
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
