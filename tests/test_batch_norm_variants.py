"""Ghost batches, cumulative moving averages and the unbiased estimator."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import cumulative_average_model
from helpers import numpy_batch_norm_train

import keras_bn


@pytest.mark.parametrize("grouping", ["interleaved", "consecutive"])
@pytest.mark.parametrize("shape,axis", [((12, 3), -1), ((8, 3, 2, 2), 1)])
def test_ghost_batches_normalize_each_virtual_batch(rng, shape, axis, grouping):
    layer = keras_bn.BatchNormalization(
        axis=axis, virtual_batch_size=4, momentum=0.5, virtual_batch_grouping=grouping
    )
    x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
    y = layer(x, training=True).numpy()
    means, variances = [], []
    count = shape[0] // 4  # virtual batches
    for j in range(count):
        # Interleaved (tf-keras): examples j, j + count, ...; else 4j to 4j + 3.
        part = (
            slice(j, None, count)
            if grouping == "interleaved"
            else slice(4 * j, 4 * j + 4)
        )
        y_ref, mean, var = numpy_batch_norm_train(x[part], None, None, axis, 1e-3)
        np.testing.assert_allclose(y[part], y_ref, atol=1e-5)
        means.append(mean)
        variances.append(var)
    np.testing.assert_allclose(layer.moving_mean, 0.5 * np.mean(means, 0), atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance, 0.5 + 0.5 * np.mean(variances, 0), rtol=1e-5
    )


def test_ghost_batch_gradients_match_finite_differences(rng):
    layer = keras_bn.BatchNormalization(virtual_batch_size=3, dtype="float64")
    layer.build((6, 2))
    layer.set_weights([rng.uniform(0.5, 1.5, size=2) for _ in range(4)])
    x = tf.constant(rng.normal(size=(6, 2)))
    wy = tf.constant(rng.normal(size=(6, 2)))

    def loss(x, gamma, beta):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        return tf.reduce_sum(wy * layer(x, training=True) ** 2)

    args = [x, tf.constant(layer.gamma.numpy()), tf.constant(layer.beta.numpy())]
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf.reduce_sum(wy * layer(x, training=True) ** 2)
    dx, dgamma, dbeta = tape.gradient(out, [x, layer.gamma, layer.beta])
    _, numerical = tf.test.compute_gradient(loss, args, delta=1e-6)
    for got, want in zip([dx, dgamma, dbeta], numerical):
        np.testing.assert_allclose(np.ravel(got), np.ravel(want), rtol=1e-5, atol=1e-6)


def test_ghost_batches_with_a_mask_raise_before_state_changes(rng):
    layer = keras_bn.BatchNormalization(virtual_batch_size=2)
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    layer.build(x.shape)
    before = layer.get_weights()
    with pytest.raises(ValueError, match=r"`virtual_batch_size` cannot be combined"):
        layer(x, training=True, mask=rng.random((4, 3)) > 0.3)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Inference ignores virtual batches, so a mask is fine there.
    layer(x, training=False, mask=rng.random((4, 3)) > 0.3)


def test_ghost_batch_size_must_divide_the_batch(rng):
    layer = keras_bn.BatchNormalization(virtual_batch_size=5)
    layer.build((None, 3))
    before = layer.get_weights()
    with pytest.raises(ValueError, match=r"`virtual_batch_size` \(5\) must divide"):
        layer(rng.normal(size=(8, 3)).astype(np.float32), training=True)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"cannot also be a feature axis"):
        keras_bn.BatchNormalization(axis=[0, 2], virtual_batch_size=2).build((4, 3, 2))


def test_momentum_none_is_the_cumulative_average(rng):
    layer = keras_bn.BatchNormalization(momentum=None)
    batches = [
        rng.normal(i, 1.0 + i, size=(16, 3)).astype(np.float32) for i in range(5)
    ]
    for x in batches:
        layer(x, training=True)
    np.testing.assert_allclose(
        layer.moving_mean, np.mean([x.mean(0) for x in batches], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance, np.mean([x.var(0) for x in batches], 0), rtol=1e-5
    )
    np.testing.assert_array_equal(layer.num_batches_tracked, 5)
    assert [w.path.split("/")[-1] for w in layer.weights][-1] == "num_batches_tracked"


def test_momentum_none_counter_saves_and_loads(rng, tmp_path):
    model = cumulative_average_model(rng)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.layers[0].num_batches_tracked, 3)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    for m in (model, loaded):
        m(x, training=True)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_unbiased_estimator_stores_the_bessel_corrected_variance(rng, fused):
    layer = keras_bn.BatchNormalization(
        momentum=0.0, moving_variance_estimator="unbiased", fused=fused
    )
    x = rng.normal(1.0, 2.0, size=(10, 4, 4, 3)).astype(np.float32)
    y = layer(x, training=True)
    flat = x.reshape(-1, 3)
    np.testing.assert_allclose(layer.moving_variance, flat.var(0, ddof=1), rtol=1e-5)
    # Training still normalizes with the biased variance.
    y_ref, _, _ = numpy_batch_norm_train(x, None, None, -1, 1e-3)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_pytorch_port_recipe_matches_the_pytorch_update_rule(rng):
    """PyTorch: running = (1 - m) * running + m * unbiased_var, m = 0.1."""
    layer = keras_bn.BatchNormalization(
        momentum=0.9, moving_variance_estimator="unbiased", epsilon=1e-5
    )
    running_mean, running_var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=(6, 3)).astype(np.float32)
        layer(x, training=True)
        running_mean = 0.9 * running_mean + 0.1 * x.mean(0)
        running_var = 0.9 * running_var + 0.1 * x.var(0, ddof=1)
    np.testing.assert_allclose(layer.moving_mean, running_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, running_var, rtol=1e-5)


def test_variant_arguments_round_trip_through_config():
    for kwargs in (
        {
            "momentum": None,
            "virtual_batch_size": 4,
            "moving_variance_estimator": "unbiased",
            "skip_nonfinite_updates": False,
            "fused": False,
            "virtual_batch_grouping": "consecutive",
        },
        {"synchronized": True, "fused": False},
    ):
        config = keras_bn.BatchNormalization(**kwargs).get_config()
        for key, value in kwargs.items():
            assert config[key] == value
        assert keras_bn.BatchNormalization.from_config(config).get_config() == config
