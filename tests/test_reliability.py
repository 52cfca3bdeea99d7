"""keras_bn.BatchNormalization keeps its learned state: non-finite and empty
batches, constant channels, one-example batches and mixed precision."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compiled
from helpers import expand_param
from helpers import numpy_batch_norm_train
from helpers import twin_batch_norm_layers

import keras_bn

MODES = ["eager", "function"]


def _train_with_gradients(layer, x, wy, mode):
    """One training call: the output and the gradients of a weighted loss with
    respect to the inputs and the trainable weights."""

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(wy * tf.cast(y, wy.dtype))
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    return compiled(step, mode)(x)


def _weights_by_name(layer):
    return {w.path.split("/")[-1]: w.numpy() for w in layer.weights}


def _statistic_names(layer):
    return [w.path.split("/")[-1] for w in layer.non_trainable_weights]


# Non-finite batches.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("renorm", [False, True])
def test_nonfinite_batch_keeps_the_statistics_of_its_features(rng, mode, bad, renorm):
    ours, theirs = twin_batch_norm_layers(rng, (None, 4), momentum=0.7, renorm=renorm)
    x = rng.normal(1.0, 2.0, size=(16, 4)).astype("float32")
    x[3, 1] = bad  # feature 1 is poisoned, the others are clean
    before = _weights_by_name(ours)
    got = compiled(lambda x: ours(x, training=True), mode)(x)
    want = theirs(x, training=True)
    # The output is what the math gives: Keras's, NaN where Keras has NaN.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.isfinite(got.numpy()[:, 1]).any()
    after, keras_after = _weights_by_name(ours), _weights_by_name(theirs)
    clean = [0, 2, 3]
    for name in _statistic_names(ours):
        assert not np.isfinite(keras_after[name][1]), name  # Keras is poisoned
        assert after[name][1] == before[name][1], name  # we are not
        np.testing.assert_allclose(
            after[name][clean], keras_after[name][clean], rtol=1e-5, err_msg=name
        )
        assert not np.array_equal(after[name][clean], before[name][clean]), name
    # The next clean batch trains and infers normally, the feature included.
    x_clean = rng.normal(1.0, 2.0, size=(16, 4)).astype("float32")
    ours(x_clean, training=True)
    assert all(np.isfinite(w.numpy()).all() for w in ours.weights)
    assert np.isfinite(ours(x_clean, training=False).numpy()).all()


def test_skip_nonfinite_updates_false_updates_as_keras_does(rng):
    ours, theirs = twin_batch_norm_layers(
        rng, (None, 3), momentum=0.6, skip_nonfinite_updates=False
    )
    x = rng.normal(size=(8, 3)).astype("float32")
    x[0, 2] = np.nan
    ours(x, training=True)
    theirs(x, training=True)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5)  # NaN where Keras has NaN
    assert np.isnan(ours.moving_mean.numpy()[2])
    # The option is documented and survives serialization.
    assert "skip_nonfinite_updates:" in keras_bn.BatchNormalization.__doc__
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(ours)
    )
    assert restored.skip_nonfinite_updates is False
    assert keras_bn.BatchNormalization().skip_nonfinite_updates is True


# Empty batches.

EMPTY_LAYOUTS = [
    ((0, 3), -1, {}),
    ((0, 3, 4, 4), 1, {}),
    ((2, 0, 3), -1, {}),
    ((0, 5), -1, {"renorm": True, "renorm_clipping": {"rmax": 2.0}}),
]


@pytest.mark.parametrize("mode", ["eager", "dynamic_shape_function"])
@pytest.mark.parametrize("shape,axis,kwargs", EMPTY_LAYOUTS)
def test_empty_batch_gives_empty_output_and_changes_no_state(
    rng, mode, shape, axis, kwargs
):
    full = tuple(d if d else 4 for d in shape)
    layer = keras_bn.BatchNormalization(axis=axis, momentum=0.5, **kwargs)
    layer(rng.normal(2.0, 3.0, size=full).astype("float32"), training=True)
    before = layer.get_weights()
    x = tf.zeros(shape)
    wy = tf.zeros(shape)
    if mode == "eager":
        y, grads = _train_with_gradients(layer, x, wy, mode)
    else:
        # The batch is empty only at run time: the traced shape is unknown.
        spec = tf.TensorSpec([None if d == 0 else d for d in shape], tf.float32)
        step = tf.function(
            lambda x, wy: _train_with_gradients(layer, x, wy, "eager"),
            input_signature=[spec, spec],
        )
        y, grads = step(x, wy)
    assert y.shape == shape and y.dtype == tf.float32
    for g in grads[1:]:
        np.testing.assert_array_equal(g, np.zeros(g.shape))
    keras.optimizers.SGD(0.1).apply(grads[1:], layer.trainable_weights)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()


def test_empty_batch_in_train_on_batch_changes_no_weight(rng):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4),
            keras_bn.BatchNormalization(momentum=0.5),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(rng.normal(size=(16, 5)), rng.normal(size=(16, 1)), verbose=0)
    before = model.get_weights()
    loss = model.train_on_batch(np.zeros((0, 5), "float32"), np.zeros((0, 1)))
    assert np.isfinite(loss)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


# Constant channels and one-example batches.


@pytest.mark.parametrize("mode", MODES)
def test_constant_channel_gives_finite_outputs_and_gradients(rng, mode):
    ours, theirs = twin_batch_norm_layers(rng, (None, 3), momentum=0.5)
    x = rng.normal(size=(16, 3)).astype("float32")
    x[:, 1] = 0.5  # constant, and exact for Keras's one-pass variance too
    x[:, 2] = 1234.5  # constant at an offset where squares round
    wy = rng.normal(size=(16, 3)).astype("float32")
    before, before_mean = ours.moving_variance.numpy(), ours.moving_mean.numpy()
    y, (dx, dgamma, dbeta) = _train_with_gradients(
        ours, tf.constant(x), tf.constant(wy), mode
    )
    y_ref, grads_ref = _train_with_gradients(
        theirs, tf.constant(x), tf.constant(wy), "eager"
    )
    for g in (y, dx, dgamma, dbeta):
        assert np.isfinite(g.numpy()).all()
    # Features 0 and 1 against Keras's layer.
    for g, g_ref in zip((y, dx, dgamma, dbeta), (y_ref, *grads_ref)):
        np.testing.assert_allclose(g[..., :2], g_ref[..., :2], rtol=1e-4, atol=1e-5)
    # A constant feature, in closed form: x - mean = 0, so y = beta,
    # dx = gamma / sqrt(epsilon) * (dy - mean(dy)), dgamma = 0, dbeta = sum(dy).
    gamma, beta = ours.gamma.numpy(), ours.beta.numpy()
    for c in (1, 2):
        np.testing.assert_allclose(y.numpy()[:, c], beta[c], rtol=1e-6)
        np.testing.assert_allclose(
            dx.numpy()[:, c],
            gamma[c] / np.sqrt(1e-3) * (wy[:, c] - wy[:, c].mean()),
            rtol=1e-4,
            atol=1e-4,
        )
        assert abs(dgamma.numpy()[c]) < 1e-4
        np.testing.assert_allclose(dbeta.numpy()[c], wy[:, c].sum(), rtol=1e-5)
    # A constant feature's batch variance is 0: the moving variance halves.
    np.testing.assert_allclose(ours.moving_variance.numpy()[1:], before[1:] * 0.5)
    np.testing.assert_allclose(
        ours.moving_mean, 0.5 * before_mean + 0.5 * x.mean(axis=0), rtol=1e-6
    )


ONE_EXAMPLE_LAYOUTS = [((1, 4), -1), ((1, 1, 1, 3), -1), ((1, 3, 1, 1), 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", ONE_EXAMPLE_LAYOUTS)
def test_batch_of_one_is_finite_matches_keras_and_warns_once(rng, mode, shape, axis):
    ours, theirs = twin_batch_norm_layers(rng, shape, axis=axis, momentum=0.5)
    x = tf.constant(rng.normal(size=shape), tf.float32)
    wy = tf.constant(rng.normal(size=shape), tf.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the layer itself must warn only once
        y, grads = _train_with_gradients(ours, x, wy, mode)
        _train_with_gradients(ours, x, wy, mode)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "single example" in messages[0] and "meaningless" in messages[0]
    assert ours.name in messages[0]
    y_ref, grads_ref = _train_with_gradients(theirs, x, wy, "eager")
    beta = expand_param(ours.beta.numpy(), len(shape), [axis % len(shape)])
    np.testing.assert_allclose(y, np.broadcast_to(beta, shape), rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert np.isfinite(g.numpy()).all()
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    # A second layer warns for itself.
    other = keras_bn.BatchNormalization(axis=axis)
    with pytest.warns(UserWarning, match=f"Layer '{other.name}'.*single example"):
        other(x, training=True)


def test_one_example_with_many_positions_normalizes_without_warning(rng):
    layer = keras_bn.BatchNormalization()
    x = rng.normal(3.0, 2.0, size=(1, 4, 4, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x, training=True)
    np.testing.assert_allclose(
        y, numpy_batch_norm_train(x, None, None, -1, 1e-3)[0], atol=1e-5
    )


def test_fit_with_batch_size_one_warns_once_per_layer(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras_bn.BatchNormalization(name="bn_a"),
            keras.layers.Dense(3),
            keras_bn.BatchNormalization(name="bn_b"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            rng.normal(size=(3, 4)),
            rng.normal(size=(3, 1)),
            batch_size=1,
            epochs=2,
            verbose=0,
        )
    messages = sorted(
        str(w.message) for w in caught if "single example" in str(w.message)
    )
    assert len(messages) == 2, messages
    assert "'bn_a'" in messages[0] and "'bn_b'" in messages[1]
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.parametrize("source", ["dataset_batched_by_one", "last_batch_of_one"])
def test_batches_of_one_known_only_at_run_time_stay_finite(rng, source):
    # The traced batch size is unknown (None): a dataset's batch dimension, or
    # the retrace Keras makes for a smaller last batch. A compiled graph has no
    # host callback to warn from (it would break XLA), so no warning is
    # promised here; the state must still stay finite.
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras_bn.BatchNormalization(name="bn"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    if source == "dataset_batched_by_one":
        x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 1))
        data = {"x": tf.data.Dataset.from_tensor_slices((x, y)).batch(1)}
    else:  # 33 examples in batches of 32: the last batch holds one
        data = {"x": rng.normal(size=(33, 4)), "y": rng.normal(size=(33, 1))}
        data["batch_size"] = 32
    history = model.fit(**data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.isfinite(w).all() for w in model.get_weights())


# Mixed precision.


@pytest.fixture
def dtype_policy():
    """Sets a global dtype policy for one test and restores the previous one."""
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_state_and_normalizes_large_inputs(
    rng, dtype_policy, policy
):
    dtype_policy(policy)
    compute_dtype = tf.as_dtype(keras.config.dtype_policy().compute_dtype)
    layer = keras_bn.BatchNormalization(momentum=0.5)
    x = tf.constant(rng.normal(1000.0, 400.0, size=(256, 4)), tf.float32)
    x_low = tf.cast(x, compute_dtype)  # what the layer computes on
    if compute_dtype == tf.float16:  # where a one-pass E[x^2] overflows
        with np.errstate(over="ignore"):
            assert np.isinf(np.mean(np.square(x_low.numpy()), dtype=np.float16))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 3)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    assert y.dtype == compute_dtype
    assert [w.dtype for w in layer.weights] == ["float32"] * 4
    y = tf.cast(y, tf.float32).numpy()
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=2e-2)
    np.testing.assert_allclose(y.std(axis=0), 1.0, atol=2e-2)
    assert all(np.isfinite(tf.cast(g, tf.float32).numpy()).all() for g in grads)
    # Statistics of the inputs as the layer sees them, in float64.
    _, mean, var = numpy_batch_norm_train(
        tf.cast(x_low, tf.float64), None, None, -1, 1e-3
    )
    np.testing.assert_allclose(layer.moving_mean, 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, 0.5 + 0.5 * var, rtol=1e-5)
    y_inference = layer(x)
    assert y_inference.dtype == compute_dtype
    assert np.isfinite(tf.cast(y_inference, tf.float32).numpy()).all()


def test_fit_under_mixed_float16_with_loss_scaling_matches_keras(rng, dtype_policy):
    dtype_policy("mixed_float16")
    x = rng.normal(1000.0, 400.0, size=(128, 6)).astype("float32")
    y = ((x - 1000.0) / 400.0 @ rng.normal(size=(6, 1))).astype("float32")
    models = []
    for bn in (keras_bn.BatchNormalization, keras.layers.BatchNormalization):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,)),
                bn(momentum=0.5),
                keras.layers.Dense(8),
                keras.layers.ReLU(),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        models.append((model, history.history["loss"]))
    (ours, losses), (theirs, keras_losses) = models
    assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, keras_losses, rtol=1e-3)
    bn = ours.layers[0]
    assert [w.dtype for w in bn.weights] == ["float32"] * 4
    assert np.abs(bn.moving_mean.numpy() - 1000.0).max() < 200.0
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    out = ours.predict(x, verbose=0)
    assert np.isfinite(out).all()


# The cumulative average (momentum=None) counts per feature.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("renorm", [False, True])
def test_cumulative_average_counts_the_batches_each_feature_accepted(rng, mode, renorm):
    layer = keras_bn.BatchNormalization(momentum=None, renorm=renorm, epsilon=1e-2)
    call = compiled(lambda x, m: layer(x, training=True, mask=m), mode)
    first = rng.normal(1.0, 2.0, size=(4, 2, 3)).astype("float32")
    first[0, 0, 1] = np.nan  # feature 1 skips this batch
    second = rng.normal(1.0, 2.0, size=(4, 2, 3)).astype("float32")
    second[..., 1] = rng.normal(5.0, 1.0, size=(4, 2))
    second[..., 1] += 5.0 - second[..., 1].mean()  # its mean is 5.0
    everywhere = np.ones((4, 2), bool)
    call(first, everywhere)
    call(second, everywhere)
    call(second, np.zeros((4, 2), bool))  # a batch with nothing to count
    np.testing.assert_array_equal(layer.num_batches_tracked, [2, 1, 2])
    assert layer.num_batches_tracked.dtype == "int64"
    assert tuple(layer.num_batches_tracked.shape) == (3,)
    # Feature 1 averages the one batch it took in: 5.0, not (0 + 5.0) / 2.
    stats = [numpy_batch_norm_train(x, None, None, -1, 1e-2) for x in (first, second)]
    (_, mean_1, var_1), (_, mean_2, var_2) = stats
    want_mean = np.where([True, False, True], (mean_1 + mean_2) / 2, mean_2)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=1e-5)
    assert abs(float(layer.moving_mean[1]) - 5.0) < 1e-5
    if renorm:  # the variance follows from the averaged standard deviation
        std_1, std_2 = np.sqrt(var_1 + 1e-2), np.sqrt(var_2 + 1e-2)
        want_std = np.where([True, False, True], (std_1 + std_2) / 2, std_2)
        want_var = want_std**2 - 1e-2
    else:
        want_var = np.where([True, False, True], (var_1 + var_2) / 2, var_2)
    np.testing.assert_allclose(layer.moving_variance, want_var, rtol=1e-5)


def test_cumulative_average_without_skipping_counts_every_batch(rng):
    layer = keras_bn.BatchNormalization(momentum=None, skip_nonfinite_updates=False)
    x = rng.normal(size=(8, 3)).astype("float32")
    x[0, 1] = np.nan
    layer(x, training=True)
    np.testing.assert_array_equal(layer.num_batches_tracked, [1, 1, 1])
    assert np.isnan(layer.moving_mean.numpy()[1])  # as asked: poisoned
