"""Gradients of gradients through the layer: a gradient-penalty training step
equals the same model on Keras's layer, and ghost and synchronized batch
normalization give exact second-order gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import autodiff_batch_norm_train
from helpers import penalty_gradients
from helpers import weighted_loss

import keras_bn


def _model(bn_layer):
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8),
            bn_layer,
            keras.layers.Activation("tanh"),
            keras.layers.Dense(1),
        ]
    )


def _gradient_penalty_step(model, optimizer, x):
    """One WGAN-GP style step: mean output plus 10 * (|d out / d x| - 1)^2."""
    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            inner.watch(x)
            out = model(x, training=True)
            total = tf.reduce_sum(out)
        gx = inner.gradient(total, x)
        norm = tf.sqrt(tf.reduce_sum(tf.square(gx), axis=1) + 1e-12)
        loss = tf.reduce_mean(out) + 10.0 * tf.reduce_mean(tf.square(norm - 1.0))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


class ExactBatchNormalization(keras.layers.Layer):
    """Keras's layer's contract in plain TF ops: the reference for a
    gradient-penalty step. Keras's own layer takes its statistics from
    `tf.nn.moments`, whose `stop_gradient` on the mean inside the variance is
    exact to first order only (see the test below)."""

    def __init__(self, momentum, epsilon=1e-3):
        super().__init__()
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.gamma = self.add_weight(shape=shape, name="gamma", initializer="ones")
        self.beta = self.add_weight(shape=shape, name="beta", initializer="zeros")
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean", initializer="zeros", trainable=False
        )
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance", initializer="ones", trainable=False
        )

    def call(self, x, training=None):
        y, mean, variance = autodiff_batch_norm_train(
            x, self.gamma, self.beta, -1, self.epsilon
        )
        for variable, value in (
            (self.moving_mean, mean),
            (self.moving_variance, variance),
        ):
            variable.assign(variable * self.momentum + value * (1 - self.momentum))
        return y


def _run_gradient_penalty_training(model, compiled):
    optimizer = keras.optimizers.SGD(0.05)
    step = tf.function(_gradient_penalty_step) if compiled else _gradient_penalty_step
    losses = []
    for i in range(3):
        x = tf.constant(np.random.default_rng(i).normal(size=(16, 5)), tf.float32)
        losses.append(float(step(model, optimizer, x)))
    return losses, model.get_weights()


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_penalty_training_matches_exact_reference(fused, compiled):
    ours = _model(keras_bn.BatchNormalization(momentum=0.5, fused=fused))
    reference = _model(ExactBatchNormalization(momentum=0.5))
    reference.set_weights(ours.get_weights())
    (ours_losses, ours_weights), (ref_losses, ref_weights) = (
        _run_gradient_penalty_training(model, compiled) for model in (ours, reference)
    )
    # float32 steps through one second-order pass: a few hundred roundings.
    np.testing.assert_allclose(ours_losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_weights, ref_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The penalty moved gamma away from its initial ones.
    assert not np.allclose(ours_weights[2], 1.0, atol=1e-3)


def test_keras_layer_second_derivatives_are_inexact_where_ours_are_exact(rng):
    """The difference the README's comparison table states: Keras's layer's
    second derivatives miss the mean's term inside the variance (its
    `tf.nn.moments` stops the gradient there), about 2% here; ours match
    finite differences to rounding. Both are float64."""
    x = tf.constant(rng.normal(size=(6, 3)) * 2 + 1, tf.float64)
    w = tf.constant(rng.normal(size=(6, 3)), tf.float64)
    errors = {}
    for name, layer in (
        ("ours", keras_bn.BatchNormalization(dtype="float64", fused=False)),
        ("keras", keras.layers.BatchNormalization(dtype="float64")),
    ):
        layer.build((None, 3))

        def gradient(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(w * tf.square(layer(x, training=True)))
            return tape.gradient(loss, x)

        theoretical, numerical = tf.test.compute_gradient(gradient, [x], delta=1e-5)
        errors[name] = (
            np.abs(theoretical[0] - numerical[0]).max() / np.abs(numerical[0]).max()
        )
    assert errors["ours"] < 1e-8
    assert errors["keras"] > 1e-3


def test_ghost_batches_have_exact_second_order_gradients(rng):
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=4, epsilon=1e-3, virtual_batch_grouping="consecutive"
    )
    layer.build((None, 3))
    x = tf.constant(rng.normal(size=(12, 3)) * 2 + 1, tf.float64)
    gamma = tf.constant(rng.uniform(0.5, 1.5, 3), tf.float64)
    beta = tf.constant(rng.normal(size=3), tf.float64)
    w = tf.constant(rng.normal(size=(12, 3)), tf.float64)

    def ours(x, gamma, beta):
        layer.gamma.assign(tf.cast(gamma, tf.float32))
        layer.beta.assign(tf.cast(beta, tf.float32))
        return keras_bn.ops.batch_norm_train(
            tf.reshape(x, [3, 4, 3]),
            tf.broadcast_to(gamma, [3, 3]),
            tf.broadcast_to(beta, [3, 3]),
            axis=[0, 2],
            epsilon=1e-3,
        )[0]

    def reference(x, gamma, beta):
        parts = [
            autodiff_batch_norm_train(x[i : i + 4], gamma, beta, -1, 1e-3)[0]
            for i in range(0, 12, 4)
        ]
        return tf.reshape(tf.concat(parts, 0), [3, 4, 3])

    w3 = tf.reshape(w, [3, 4, 3])
    inputs = [x, gamma, beta]
    got = penalty_gradients(weighted_loss(ours, w3, quadratic=True), inputs)
    want = penalty_gradients(weighted_loss(reference, w3, quadratic=True), inputs)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)

    # And the layer itself (float32) agrees with the same reference.
    def layer_penalty_gradients(layer, x, w):
        x32 = tf.cast(x, tf.float32)
        with tf.GradientTape() as outer:
            outer.watch(x32)
            with tf.GradientTape() as inner:
                inner.watch(x32)
                y = layer(x32, training=True)
                loss = tf.reduce_sum(tf.cast(w, tf.float32) * tf.square(y))
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x32)))
        return outer.gradient(penalty, [x32, layer.gamma])

    layer_dx, layer_dgamma = layer_penalty_gradients(layer, x, w)
    np.testing.assert_allclose(layer_dx, want[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(layer_dgamma, want[1], rtol=2e-3, atol=2e-3)
    # The default, interleaved grouping (tf-keras's) takes examples j, j + 3,
    # j + 6, j + 9: on x reordered so, its virtual batches are the ones above.
    interleaved = keras_bn.BatchNormalization(virtual_batch_size=4, epsilon=1e-3)
    interleaved.build((None, 3))
    interleaved.set_weights(layer.get_weights())
    order = np.arange(12).reshape(3, 4).T.reshape(-1)  # [0, 4, 8, 1, 5, ...]
    layer_dx, layer_dgamma = layer_penalty_gradients(
        interleaved, tf.gather(x, order), tf.gather(w, order)
    )
    np.testing.assert_allclose(
        layer_dx, tf.gather(want[0], order), rtol=2e-3, atol=2e-3
    )
    np.testing.assert_allclose(layer_dgamma, want[1], rtol=2e-3, atol=2e-3)


def test_synchronized_second_order_gradients_equal_one_device(rng, strategy):
    """Each replica's penalty gradient equals the global-batch one."""
    x = rng.normal(size=(10, 3)).astype(np.float32) * 2 + 1
    w = rng.normal(size=(10, 3)).astype(np.float32)
    parts = [(x[:4], w[:4]), (x[4:], w[4:])]
    with strategy.scope():
        layer = keras_bn.BatchNormalization(synchronized=True, momentum=0.5)
        layer.build((None, 3))
        layer.gamma.assign([0.7, 1.3, 1.1])

    def replica_step(x, w):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(w * tf.square(layer(x, training=True)))
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
        return outer.gradient(penalty, [x, layer.gamma])

    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group][0])
    )
    ws = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group][1])
    )
    dx, dgamma = tf.function(lambda a, b: strategy.run(replica_step, args=(a, b)))(
        xs, ws
    )
    dx = np.concatenate(strategy.experimental_local_results(dx))
    dgamma = strategy.reduce("SUM", dgamma, axis=None)

    gamma = tf.constant([0.7, 1.3, 1.1])
    want = penalty_gradients(
        weighted_loss(
            lambda x, g, b: autodiff_batch_norm_train(x, g, b, -1, 1e-3)[0],
            tf.constant(w),
            quadratic=True,
        ),
        [tf.constant(x), gamma, tf.zeros([3])],
    )
    np.testing.assert_allclose(dx, want[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dgamma, want[1], rtol=2e-3, atol=2e-3)
