"""keras_bn.BatchNormalization: parity with Keras, semantics, saving, errors."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import compiled
from helpers import numpy_batch_norm_train
from helpers import param_shape
from helpers import twin_batch_norm_layers

import keras_bn

CONFIGS = {
    "dense": ((16, 6), {}),
    "nhwc": ((4, 5, 5, 3), {}),
    "nchw": ((4, 3, 5, 5), {"axis": 1}),
    "rank3_no_center_no_scale": ((8, 4, 3), {"center": False, "scale": False}),
    "renorm": (
        (16, 6),
        {
            "renorm": True,
            "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3},
            "renorm_momentum": 0.8,
        },
    ),
    "masked": ((4, 6, 3), {}),
}


def _train_step(layer, x, wy, mask):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        out = y if mask is None else y * tf.cast(mask, y.dtype)[..., None]
        loss = tf.reduce_sum(wy * out) + 0.1 * tf.reduce_sum(out**2)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    for w, g in zip(layer.trainable_weights, grads[1:]):
        w.assign_sub(0.1 * g)
    return [y, *grads]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_steps_match_keras(rng, mode, dtype, config):
    shape, kwargs = CONFIGS[config]
    ours, theirs = twin_batch_norm_layers(
        rng, shape, momentum=0.7, dtype=dtype, **kwargs
    )
    steps = {}
    for layer in (ours, theirs):
        fn = lambda x, wy, m, layer=layer: _train_step(layer, x, wy, m)  # noqa: E731
        steps[layer] = compiled(fn, mode)
    tol = 1e-4 if dtype == "float32" else 1e-9
    if config == "masked" and dtype == "float64":
        tol = 1e-6  # Keras divides masked sums by count + 1e-7, we by count.
    for _ in range(3):
        x = tf.constant(rng.normal(1.0, 2.0, size=shape), dtype)
        wy = tf.constant(rng.normal(size=shape), dtype)
        mask = None
        if config == "masked":
            mask = tf.constant(rng.random(shape[:-1]) < 0.7)
        got, want = steps[ours](x, wy, mask), steps[theirs](x, wy, mask)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        for a, b in zip(ours.get_weights(), theirs.get_weights()):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    # Inference with the learned moving statistics agrees too.
    np.testing.assert_allclose(ours(x), theirs(x), rtol=tol, atol=tol)


def test_weights_names_order_and_transfer_both_ways(rng):
    for kwargs in ({}, {"renorm": True}):
        ours = keras_bn.BatchNormalization(**kwargs)
        theirs = keras.layers.BatchNormalization(**kwargs)
        ours.build((None, 4))
        theirs.build((None, 4))
        assert [w.path.split("/")[-1] for w in ours.weights] == [
            w.path.split("/")[-1] for w in theirs.weights
        ]
        assert [w.trainable for w in ours.weights] == [
            w.trainable for w in theirs.weights
        ]
        values = [rng.uniform(0.5, 2, size=4).astype("float32") for _ in ours.weights]
        theirs.set_weights(values)
        ours.set_weights(theirs.get_weights())
        for a, b in zip(ours.get_weights(), values):
            np.testing.assert_array_equal(a, b)
        ours.set_weights([v + 1 for v in values])
        theirs.set_weights(ours.get_weights())
        for a, b in zip(theirs.get_weights(), values):
            np.testing.assert_array_equal(a, b + 1)


def test_moving_statistics_follow_the_closed_form(rng):
    layer = keras_bn.BatchNormalization(momentum=0.9)
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for _ in range(4):
        x = rng.normal(2.0, 3.0, size=(32, 3)).astype("float32")
        y = layer(x, training=True)
        _, mean, var = numpy_batch_norm_train(x, None, None, -1, 1e-3)
        moving_mean = moving_mean * 0.9 + mean * 0.1
        moving_var = moving_var * 0.9 + var * 0.1  # biased batch variance
        np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, moving_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, moving_var, rtol=1e-5)


def test_inference_uses_moving_statistics_and_changes_nothing(rng):
    layer = keras_bn.BatchNormalization(epsilon=1e-2)
    layer.build((None, 2))
    layer.set_weights(
        [np.array(v, "float32") for v in ([2, 3], [1, -1], [5, 6], [4, 9])]
    )
    x = rng.normal(size=(10, 2)).astype("float32")
    for training in (None, False):
        y = layer(x, training=training)
        expected = (x - [5, 6]) / np.sqrt(np.array([4, 9]) + 1e-2) * [2, 3] + [1, -1]
        np.testing.assert_allclose(y, expected, rtol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean, [5, 6])


def test_momentum_zero_inference_equals_training_output(rng):
    layer = keras_bn.BatchNormalization(momentum=0.0)
    x = rng.normal(3.0, 2.0, size=(20, 4, 3)).astype("float32")
    np.testing.assert_allclose(layer(x, training=True), layer(x), atol=1e-5)


def test_trainable_false_forces_inference_and_freezes_state(rng):
    layer = keras_bn.BatchNormalization()
    x = rng.normal(3.0, 2.0, size=(16, 3)).astype("float32")
    layer(x, training=True)
    layer.trainable = False
    before = layer.get_weights()
    np.testing.assert_allclose(layer(x, training=True), layer(x, training=False))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_list_axis_normalizes_each_feature_pair(rng):
    x = rng.normal(1.0, 2.0, size=(6, 3, 4, 2)).astype("float32")
    layer = keras_bn.BatchNormalization(axis=[1, 3], momentum=0.5)
    y = layer(x, training=True)
    assert layer.gamma.shape == (3, 2) and layer.moving_mean.shape == (3, 2)
    y_ref, mean, _ = numpy_batch_norm_train(x, None, None, [1, 3], 1e-3)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, 0.5 * mean, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_moving_statistics_update_when_compiled(rng, mode):
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer.build((None, 3))
    x = rng.normal(4.0, 1.0, size=(64, 3)).astype("float32")
    call = compiled(lambda x: layer(x, training=True), mode)
    call(x)
    call(x)
    np.testing.assert_allclose(layer.moving_mean, 0.75 * x.mean(axis=0), rtol=1e-5)


def test_masks_from_a_model_exclude_padding(rng):
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    embedding = keras.layers.Embedding(10, 3, mask_zero=True)
    layer = keras_bn.BatchNormalization(momentum=0.0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer(embedding(inputs)))
    model(tokens, training=True)
    vectors = embedding(tokens).numpy()[tokens > 0]
    np.testing.assert_allclose(layer.moving_mean, vectors.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, vectors.var(axis=0), atol=1e-6)


def test_fully_masked_batch_keeps_state_and_gives_no_nan(rng):
    layer = keras_bn.BatchNormalization()
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    layer(x, training=True)
    before = layer.get_weights()
    y = layer(x, training=True, mask=np.zeros((2, 5), bool))
    assert np.all(np.isfinite(y))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_mixed_precision_keeps_float32_weights(rng):
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = keras_bn.BatchNormalization()
        y = layer(rng.normal(size=(8, 3)).astype("float32"), training=True)
    finally:
        keras.config.set_dtype_policy(policy)
    assert y.dtype == tf.float16
    assert all(w.dtype == "float32" for w in layer.weights)


def _models(seed):
    def build(bn):
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16),
                bn(momentum=0.8),
                keras.layers.ReLU(),
                keras.layers.Dense(1),
            ]
        )

    return build(keras_bn.BatchNormalization), build(keras.layers.BatchNormalization)


def test_fit_matches_keras_and_learns(rng):
    x = rng.normal(size=(128, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    ours, theirs = _models(seed=3)
    theirs.set_weights(ours.get_weights())
    histories = []
    for model in (ours, theirs):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        histories.append(
            model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        )
    losses = histories[0].history["loss"]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, histories[1].history["loss"], rtol=1e-4)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.abs(ours.layers[1].moving_mean.numpy()).max() > 0.01


def test_config_round_trip_and_registered_name():
    layer = keras_bn.BatchNormalization(
        axis=[1, 2],
        momentum=0.9,
        epsilon=1e-4,
        center=False,
        gamma_initializer="random_normal",
        gamma_regularizer="l2",
        beta_constraint="non_neg",
        renorm=True,
        renorm_clipping={"rmax": 2.0},
        renorm_momentum=0.5,
        name="bn",
    )
    config = layer.get_config()
    clone = keras_bn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert keras.saving.get_registered_name(type(layer)) == (
        "keras_bn>BatchNormalization"
    )
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert isinstance(restored, keras_bn.BatchNormalization)
    assert restored.get_config() == config


@pytest.mark.slow
def test_keras_file_round_trip_in_a_fresh_process(rng, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3),
            keras_bn.BatchNormalization(momentum=0.5),
            keras.layers.Flatten(),
            keras_bn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0}),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
    model.fit(x, rng.normal(size=(32, 2)), epochs=2, verbose=0)
    path, data = tmp_path / "model.keras", tmp_path / "data.npz"
    model.save(path)
    np.savez(data, x=x)
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, keras_bn
        model = keras.saving.load_model({str(path)!r})
        x = np.load({str(data)!r})["x"]
        np.savez({str(tmp_path / "out.npz")!r}, y=model.predict(x, verbose=0),
                 *[w.numpy() for w in model.weights])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["y"], model.predict(x, verbose=0))
    for i, w in enumerate(model.weights):
        np.testing.assert_array_equal(out[f"arr_{i}"], w.numpy())
    assert np.abs(model.layers[1].moving_mean.numpy()).max() > 0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"momentum": 1.5}, ValueError, r"`momentum` must be in \[0, 1\]"),
        ({"momentum": -0.1}, ValueError, r"`momentum` must be in \[0, 1\]"),
        ({"epsilon": 0.0}, ValueError, r"`epsilon` must be > 0"),
        ({"epsilon": -1e-3}, ValueError, r"`epsilon` must be > 0"),
        ({"axis": "last"}, TypeError, r"`axis` must be an int"),
        ({"axis": []}, TypeError, r"`axis` must be an int or a non-empty"),
        ({"renorm_clipping": {"rmax": 2}}, ValueError, r"only used with renorm=True"),
        (
            {"renorm": True, "renorm_clipping": {"r_max": 2}},
            ValueError,
            r"invalid keys for `renorm_clipping` argument: \['r_max'\]",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 1, "rmin": 2}},
            ValueError,
            r"rmax should be >= rmin",
        ),
        (
            {"renorm": True, "renorm_clipping": {"dmax": -1}},
            ValueError,
            r"dmax should be non-negative",
        ),
        ({"renorm": True, "renorm_momentum": 2}, ValueError, r"`renorm_momentum`"),
        ({"virtual_batch_size": 0}, ValueError, r"`virtual_batch_size` must be"),
        ({"virtual_batch_size": 2.5}, TypeError, r"`virtual_batch_size` must be"),
        (
            {"virtual_batch_size": 4, "synchronized": True},
            ValueError,
            r"`virtual_batch_size` cannot be combined with synchronized=True",
        ),
        (
            {"moving_variance_estimator": "bessel"},
            ValueError,
            r"`moving_variance_estimator` must be one of \['biased', 'unbiased'\]",
        ),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_bn.BatchNormalization(**kwargs)


@pytest.mark.parametrize(
    "axis,shape,match",
    [
        (3, (2, 4), r"`axis` has an axis 3 out of range for an input of rank 2"),
        (-3, (2, 4), r"`axis` has an axis -3 out of range"),
        ([1, -1], (2, 4), r"`axis` repeats an axis"),
        (-1, (4,), r"Inputs need a rank of at least 2"),
        (-1, (2, None), r"feature axis \[1\] of the input must have a known size"),
    ],
)
def test_build_rejects_bad_shapes(axis, shape, match):
    layer = keras_bn.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=match):
        layer.build(shape)


def _assert_state_unchanged(layer, before):
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_bad_mask_raises_before_any_state_change(rng):
    layer = keras_bn.BatchNormalization()
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    layer(x, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match=r"`mask` of layer .* one axis less"):
        layer(x, training=True, mask=np.ones((4, 3), bool))
    _assert_state_unchanged(layer, before)


def test_different_channel_size_raises_before_any_state_change(rng):
    layer = keras_bn.BatchNormalization()
    layer(rng.normal(size=(4, 3)).astype("float32"), training=True)
    before = layer.get_weights()
    with pytest.raises(
        ValueError, match=r"expected axis 1 of input shape to have value 3"
    ):
        layer(rng.normal(size=(4, 5)).astype("float32"), training=True)
    _assert_state_unchanged(layer, before)


def test_param_shape_helper_matches_layer():
    layer = keras_bn.BatchNormalization(axis=[1, -1])
    layer.build((2, 3, 4, 5))
    assert tuple(layer.gamma.shape) == param_shape((2, 3, 4, 5), [1, -1]) == (3, 5)
