"""Property-based tests of batch normalization over random layouts, dtypes,
momenta, epsilons and masks (hypothesis, bounded and derandomized)."""

import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import canonical_axes
from helpers import compiled
from helpers import expand_mask
from helpers import numpy_batch_norm_train
from helpers import param_shape
from helpers import random_loss_weights
from helpers import random_mask
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_bn
from keras_bn.ops import batch_norm_inference
from keras_bn.ops import batch_norm_train


def bounded(max_examples):
    """Few, reproducible examples: the same ones on every run and machine."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# Layer dtype policies and the dtype each computes its output in.
POLICIES = {
    "float32": "float32",
    "float64": "float64",
    "mixed_float16": "float16",
    "mixed_bfloat16": "bfloat16",
}
# Relative resolution of each output dtype (float32/64: the math's own error).
RESOLUTION = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 1e-5}
RESOLUTION["float64"] = 1e-10


def _tolerance(dtype, values):
    """Absolute tolerance for values rounded to `dtype`, twice the rounding."""
    return 2 * RESOLUTION[dtype] * max(1.0, float(np.max(np.abs(values))))


@st.composite
def layouts(draw, max_elements=48, fused_axis=False):
    """(shape, axis): rank 2 to 5, each feature seeing at least 2 positions.

    `axis` is an int or a list, spelled with positive or negative entries;
    with `fused_axis`, a single axis, 1 or the last, as the fused kernels take.
    """
    rank = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    if fused_axis:
        axes = [draw(st.sampled_from([1, rank - 1]))]
    else:
        n = draw(st.integers(1, min(2, rank - 1)))
        axes = sorted(
            draw(
                st.lists(st.integers(0, rank - 1), min_size=n, max_size=n, unique=True)
            )
        )
    while math.prod(shape) > max_elements:
        shape[int(np.argmax(shape))] -= 1
    reduced = [i for i in range(rank) if i not in axes]
    if math.prod(shape[i] for i in reduced) < 2:
        shape[reduced[0]] = 2
    spelled = [a - rank if draw(st.booleans()) else a for a in axes]
    axis = spelled[0] if len(spelled) == 1 and draw(st.booleans()) else spelled
    return tuple(shape), axis


@st.composite
def inputs(draw, shape, max_offset=10.0):
    """Float32 inputs `offset + spread * N(0, 1)`, |offset| <= max_offset * spread."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = 10.0 ** draw(st.floats(-2.0, 3.0))
    offset = spread * draw(st.floats(-max_offset, max_offset))
    return rng.normal(offset, spread, size=shape).astype(np.float32), rng


def _as_computed(x, dtype):
    """`x` as the layer computes on it (rounded to `dtype`), in float64."""
    return tf.cast(tf.cast(x, dtype), tf.float64).numpy()


def _full_rank(mask, shape, axis):
    """`mask` (inputs without the feature axes) with size-1 feature axes."""
    if mask is None:
        return None
    return expand_mask(mask, len(shape), canonical_axes(axis, len(shape)))


def _per_feature(values, axis, mask):
    """`values` as [positions, features], unmasked positions only."""
    rank = values.ndim
    axes = canonical_axes(axis, rank)
    reduced = [i for i in range(rank) if i not in axes]
    moved = np.transpose(values, reduced + axes)
    flat = moved.reshape(math.prod(values.shape[i] for i in reduced), -1)
    if mask is not None:
        flat = flat[np.asarray(mask).reshape(-1)]
    return flat


@bounded(25)
@given(
    layout=layouts(),
    policy=st.sampled_from(list(POLICIES)),
    epsilon=st.floats(1e-5, 1e-1),
    masked=st.booleans(),
    data=st.data(),
)
def test_training_output_is_normalized_per_feature(
    layout, policy, epsilon, masked, data
):
    shape, axis = layout
    x, rng = data.draw(inputs(shape))
    mask = random_mask(rng, shape, axis) if masked else None
    layer = keras_bn.BatchNormalization(axis=axis, epsilon=epsilon, dtype=policy)
    y = layer(
        x, training=True, mask=_full_rank(mask, shape, axis)
    )  # gamma = 1, beta = 0
    dtype = POLICIES[policy]
    assert y.dtype == dtype
    y = _per_feature(tf.cast(y, tf.float64).numpy(), axis, mask)
    variance = _per_feature(_as_computed(x, dtype), axis, mask).var(axis=0)
    tol = _tolerance(dtype, y)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=tol)
    # Unit standard deviation, short of the epsilon in the denominator.
    np.testing.assert_allclose(
        y.std(axis=0), np.sqrt(variance / (variance + epsilon)), atol=tol
    )


@bounded(15)
@given(
    layout=layouts(max_elements=36),
    op=st.sampled_from(["train", "inference"]),
    epsilon=st.floats(1e-3, 1e-1),
    masked=st.booleans(),
    center=st.booleans(),
    scale=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_hand_written_gradients_match_finite_differences(
    layout, op, epsilon, masked, center, scale, seed
):
    shape, axis = layout
    rng = np.random.default_rng(seed)
    pshape = param_shape(shape, axis)
    x = tf.constant(rng.normal(0.5, 2.0, size=shape))
    params = {
        "gamma": rng.uniform(0.5, 1.5, size=pshape) if scale else None,
        "beta": rng.normal(size=pshape) if center else None,
    }
    wy, wm, wv = random_loss_weights(rng, shape, axis)
    if op == "train":
        mask = random_mask(rng, shape, axis) if masked else None
        if mask is not None:  # masked outputs are padding: the loss skips them
            axes = canonical_axes(axis, len(shape))
            kept = np.broadcast_to(expand_mask(mask, len(shape), axes), shape)
            wy = wy * kept.astype(np.float64)

        def loss(x, **p):
            y, mean, variance = batch_norm_train(
                x, p.get("gamma"), p.get("beta"), axis, epsilon, mask=mask
            )
            return (
                tf.reduce_sum(wy * y * y)
                + tf.reduce_sum(wm * mean)
                + tf.reduce_sum(wv * variance)
            )
    else:
        params["mean"] = rng.normal(size=pshape)
        params["variance"] = rng.uniform(0.2, 3.0, size=pshape)

        def loss(x, **p):
            y = batch_norm_inference(
                x, p["mean"], p["variance"], p.get("gamma"), p.get("beta"), axis,
                epsilon,
            )  # fmt: skip
            return tf.reduce_sum(wy * y * y)

    names = [name for name, value in params.items() if value is not None]
    theoretical, numerical = tf.test.compute_gradient(
        lambda x, *values: loss(x, **dict(zip(names, values))),
        [x] + [tf.constant(params[name]) for name in names],
        delta=1e-6,
    )
    for name, t, n in zip(["x", *names], theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-5, err_msg=name)


def _gradients(fn, x, params, weights):
    """Values of `fn(x, gamma, beta)` and the gradients of a loss using them all."""
    wy, wm, wv = weights
    with tf.GradientTape() as tape:
        tape.watch([x, *params])
        y, mean, variance = fn(x, *params)
        loss = (
            tf.reduce_sum(wy * tf.cast(y, tf.float32))
            + tf.reduce_sum(wm * mean)
            + tf.reduce_sum(wv * variance)
        )
    return [y, mean, variance, *tape.gradient(loss, [x, *params])]


def _layer_step(layer, x, wy):
    """A training call's output and the gradients of a loss on it."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(wy * tf.cast(y, tf.float32))
    return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]


def _assert_close(got, want, dtype, err_msg=""):
    got = tf.cast(got, tf.float64).numpy()
    want = tf.cast(want, tf.float64).numpy()
    np.testing.assert_allclose(
        got, want, rtol=0, atol=_tolerance(dtype, want), err_msg=err_msg
    )


@bounded(15)
@given(
    layout=layouts(fused_axis=True),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    epsilon=st.floats(1.1e-5, 1e-1),
    momentum=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_fused_and_closed_form_paths_agree(layout, dtype, epsilon, momentum, data):
    shape, axis = layout
    x32, rng = data.draw(inputs(shape, max_offset=3.0))
    x = tf.constant(x32, dtype)
    pshape = param_shape(shape, axis)
    params = [
        tf.constant(rng.uniform(0.5, 1.5, size=pshape), tf.float32),
        tf.constant(rng.normal(size=pshape), tf.float32),
    ]
    weights = [tf.cast(w, tf.float32) for w in random_loss_weights(rng, shape, axis)]
    names = ["y", "mean", "variance", "dx", "dgamma", "dbeta"]
    # The op: fused kernels, closed form, and the automatic choice.
    results = {
        fused: _gradients(
            lambda x, g, b, fused=fused: batch_norm_train(
                x, g, b, axis=axis, epsilon=epsilon, fused=fused
            ),
            x,
            params,
            weights,
        )
        for fused in (True, False, None)
    }
    for fused in (True, None):
        for name, got, want in zip(names, results[fused], results[False]):
            _assert_close(got, want, dtype, f"fused={fused}: {name}")
    moving = [tf.constant(rng.normal(size=pshape), tf.float32)]
    moving.append(tf.constant(rng.uniform(0.5, 2.0, size=pshape), tf.float32))
    inference = {
        fused: batch_norm_inference(x, *moving, *params, axis, epsilon, fused=fused)
        for fused in (True, False)
    }
    _assert_close(inference[True], inference[False], dtype, "inference")

    # The layer: outputs, gradients and moving statistics.
    policy = {"float32": "float32", "float16": "mixed_float16"}.get(
        dtype, "mixed_bfloat16"
    )
    layers = {}
    for fused in (True, False):
        layer = keras_bn.BatchNormalization(
            axis=axis, momentum=momentum, epsilon=epsilon, fused=fused, dtype=policy
        )
        layer.build(shape)
        layer.set_weights([params[0], params[1], *moving])
        layers[fused] = layer
    steps = {
        fused: _layer_step(layer, x, weights[0]) for fused, layer in layers.items()
    }
    for name, got, want in zip(["y", "dx", "dgamma", "dbeta"], *steps.values()):
        _assert_close(got, want, dtype, f"layer: {name}")
    for a, b in zip(layers[True].weights, layers[False].weights):
        _assert_close(a, b, "float32", f"layer: {a.path}")
    _assert_close(layers[True](x), layers[False](x), dtype, "layer inference")


@bounded(20)
@given(
    layout=layouts(),
    policy=st.sampled_from(list(POLICIES)),
    epsilon=st.floats(1e-5, 1e-1),
    masked=st.booleans(),
    data=st.data(),
)
def test_property_momentum_zero_inference_equals_training_output(
    layout, policy, epsilon, masked, data
):
    shape, axis = layout
    x, rng = data.draw(inputs(shape))
    mask = random_mask(rng, shape, axis) if masked else None
    layer = keras_bn.BatchNormalization(
        axis=axis,
        momentum=0.0,
        epsilon=epsilon,
        gamma_initializer="random_uniform",
        beta_initializer="random_normal",
        dtype=policy,
    )
    trained = layer(x, training=True, mask=_full_rank(mask, shape, axis))
    dtype = POLICIES[policy]
    _assert_close(layer(x, training=False), trained, dtype)


@bounded(20)
@given(
    layout=layouts(),
    policy=st.sampled_from(list(POLICIES)),
    momentum=st.floats(0.0, 1.0),
    epsilon=st.floats(1e-5, 1e-1),
    masked=st.booleans(),
    data=st.data(),
)
def test_property_moving_statistics_follow_the_closed_form(
    layout, policy, momentum, epsilon, masked, data
):
    shape, axis = layout
    x, rng = data.draw(inputs(shape))
    mask = random_mask(rng, shape, axis) if masked else None
    layer = keras_bn.BatchNormalization(
        axis=axis, momentum=momentum, epsilon=epsilon, dtype=policy
    )
    layer.build(shape)
    pshape = param_shape(shape, axis)
    old_mean = rng.normal(size=pshape) * x.std()
    old_variance = rng.uniform(0.5, 2.0, size=pshape) * x.var()
    layer.moving_mean.assign(old_mean)
    layer.moving_variance.assign(old_variance)
    old_mean = layer.moving_mean.numpy().astype(np.float64)  # as stored
    old_variance = layer.moving_variance.numpy().astype(np.float64)
    layer(x, training=True, mask=_full_rank(mask, shape, axis))
    dtype = POLICIES[policy]
    _, mean, variance = numpy_batch_norm_train(
        _as_computed(x, dtype), None, None, axis, epsilon, mask
    )
    # Errors scale with each feature's spread (means may be near 0).
    rtol = 1e-10 if dtype == "float64" else 1e-5
    spread = np.sqrt(variance + old_variance)
    _assert_within(
        layer.moving_mean,
        old_mean * momentum + mean * (1 - momentum),
        rtol * (spread + np.abs(mean)),
    )
    _assert_within(
        layer.moving_variance,
        old_variance * momentum + variance * (1 - momentum),
        10 * rtol * spread**2,
    )


def _assert_within(got, want, tolerance):
    """|got - want| <= tolerance, elementwise (a tolerance per element)."""
    error = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(error <= tolerance), f"got {got}, want {want}, error {error}"


def _bad_call(kind, x, axis):
    """Arguments of a training call that must raise, and the error expected."""
    rank = x.ndim
    axes = canonical_axes(axis, rank)
    if kind == "mask":  # a mask has at most the rank of the inputs
        return x, np.ones(x.shape + (1,), bool), ValueError
    if kind == "features":
        shape = list(x.shape)
        shape[axes[0]] += 1
        return np.ones(shape, np.float32), None, ValueError
    return x[..., None], None, ValueError


@bounded(20)
@given(
    layout=layouts(),
    policy=st.sampled_from(list(POLICIES)),
    renorm=st.booleans(),
    kind=st.sampled_from(["mask", "features", "rank"]),
    mode=st.sampled_from(["eager", "function"]),
    data=st.data(),
)
def test_a_call_that_raises_leaves_state_unchanged(
    layout, policy, renorm, kind, mode, data
):
    shape, axis = layout
    x, _ = data.draw(inputs(shape))
    layer = keras_bn.BatchNormalization(
        axis=axis, momentum=0.5, renorm=renorm, dtype=policy
    )
    layer(x, training=True)
    before = [w.numpy() for w in layer.weights]
    bad_x, bad_mask, error = _bad_call(kind, x, axis)
    call = compiled(lambda x, mask: layer(x, training=True, mask=mask), mode)
    with pytest.raises(error):
        call(bad_x, bad_mask)
    for w, value in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), value, err_msg=w.path)
    # The layer still works, and a good call changes its statistics.
    layer(x, training=True)
    assert not np.array_equal(layer.moving_variance.numpy(), before[3])
