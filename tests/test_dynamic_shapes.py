"""Shapes known only at run time: the same results as known shapes, and the
same errors, raised when the graph runs, with state unchanged."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn import ops

UNKNOWN = tf.TensorSpec([None, None, None], tf.float32)


@pytest.mark.parametrize("fused", [None, True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_ops_with_an_unknown_feature_size_match_known_shapes(rng, fused, affine):
    x = tf.constant(rng.normal(size=(4, 5, 3)), tf.float32)
    gamma = tf.constant(rng.uniform(0.5, 2.0, 3), tf.float32) if affine else None
    beta = tf.constant(rng.normal(size=3), tf.float32) if affine else None
    mean, variance = tf.constant([0.1, 0.2, -0.3]), tf.constant([1.0, 2.0, 0.5])

    def both(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, m, v = ops.batch_norm_train(x, gamma, beta, fused=fused)
            loss = tf.reduce_sum(tf.sin(y))
        inference = ops.batch_norm_inference(
            x, mean, variance, gamma, beta, fused=fused, statistics_gradients=False
        )
        return y, m, v, tape.gradient(loss, x), inference

    known = both(x)
    unknown = tf.function(both, input_signature=[UNKNOWN])(x)
    for a, b in zip(unknown, known):
        # Same kernels either way; only the reshapes are built differently.
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_with_an_unknown_feature_size_matches_keras(rng, training, affine):
    ours = keras_bn.BatchNormalization(center=affine, scale=affine, momentum=0.5)
    theirs = keras.layers.BatchNormalization(center=affine, scale=affine, momentum=0.5)
    for layer in (ours, theirs):
        layer.build((None, 5, 3))
    theirs.set_weights(ours.get_weights())
    x = tf.constant(rng.normal(2.0, 3.0, size=(4, 5, 3)), tf.float32)
    outputs = [
        tf.function(
            lambda x, layer=layer: layer(x, training=training),
            input_signature=[UNKNOWN],
        )(x)
        for layer in (ours, theirs)
    ]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _transposed_mask_call(layer_or_op, jit_compile):
    spec = [UNKNOWN, tf.TensorSpec([None, None], tf.bool)]
    return tf.function(layer_or_op, input_signature=spec, jit_compile=jit_compile)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_transposed_mask_known_only_at_run_time_raises(rng, jit_compile):
    x = tf.constant(rng.normal(size=(4, 5, 3)), tf.float32)
    transposed = tf.ones([5, 4], tf.bool)  # inputs without the feature axis: (4, 5)
    step = _transposed_mask_call(
        lambda x, m: ops.batch_norm_train(x, mask=m)[1], jit_compile
    )
    match = "mask" if not jit_compile else "broadcast|mask"
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        step(x, transposed)
    # The right shape passes, and equals the static-shape result.
    right = tf.constant(rng.random((4, 5)) < 0.7)
    np.testing.assert_allclose(
        step(x, right), ops.batch_norm_train(x, mask=right)[1], rtol=1e-6
    )


def test_a_layer_given_a_transposed_mask_raises_and_keeps_its_state(rng):
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer.build((None, 5, 3))
    before = [w.copy() for w in layer.get_weights()]
    x = tf.constant(rng.normal(size=(4, 5, 3)), tf.float32)
    step = _transposed_mask_call(
        lambda x, m: layer(x, training=True, mask=m), jit_compile=False
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="`mask` must"):
        step(x, tf.ones([5, 4], tf.bool))
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_virtual_batch_size_not_dividing_a_run_time_batch_raises(rng):
    layer = keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.5)
    layer.build((None, 3))
    before = [w.copy() for w in layer.get_weights()]
    step = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec([None, 3], tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="`virtual_batch_size`"):
        step(tf.constant(rng.normal(size=(6, 3)), tf.float32))
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    # A batch it divides runs, with two virtual batches of 4 (interleaved).
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = step(x).numpy()
    for half in (y[0::2], y[1::2]):
        np.testing.assert_allclose(half.mean(axis=0), 0.0, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("op", ["dense", "sparse", "linear"])
def test_labels_of_a_permuted_shape_known_only_at_run_time_raise(rng, op, jit_compile):
    """Labels `[3, 2]` for logits `[2, 3, classes]` hold as many entries as
    the right `[2, 3]`: only a check of each size catches them (a reshape
    would quietly pair labels with the wrong rows)."""
    logits = tf.constant(rng.normal(size=(2, 3, 5)), tf.float32)
    if op == "dense":
        fn, labels = ops.softmax_cross_entropy, tf.nn.softmax(logits)
        spec = [UNKNOWN, UNKNOWN]
        permuted = tf.transpose(labels, [1, 0, 2])
    else:
        labels = tf.constant(rng.integers(0, 5, size=(2, 3)), tf.int32)
        spec = [tf.TensorSpec([None, None], tf.int32), UNKNOWN]
        permuted = tf.transpose(labels)
        fn = ops.sparse_softmax_cross_entropy
    if op == "linear":
        kernel = tf.constant(rng.normal(size=(5, 7)), tf.float32)
        spec[1] = tf.TensorSpec([None, None, 5], tf.float32)

        def fn(labels, hidden):
            return ops.linear_softmax_cross_entropy(labels, hidden, kernel)

    step = tf.function(fn, input_signature=spec, jit_compile=jit_compile)
    match = "labels" if not jit_compile else "broadcast|labels|shape"
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        step(permuted, logits)
    np.testing.assert_allclose(step(labels, logits), fn(labels, logits), rtol=1e-6)
