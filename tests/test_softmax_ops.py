"""Tests for keras_bn.ops.softmax_ops: softmax and log_softmax."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import compiled

from keras_bn.ops.softmax_ops import log_softmax
from keras_bn.ops.softmax_ops import softmax

CASES = [
    ([7], -1),
    ([3, 5], -1),
    ([3, 5], 0),
    ([2, 3, 4], 1),
    ([2, 3, 4, 5], [1, 2]),
    ([2, 3, 4, 5], (-1, 0)),
]
TOL = {tf.float32: 1e-6, tf.float64: 1e-12}


def reference(op, x, axis):
    """Autodiff-able reference built from TensorFlow's own ops."""
    lse = tf.reduce_logsumexp(x, axis=axis, keepdims=True)
    return tf.exp(x - lse) if op == "softmax" else x - lse


OPS = {"softmax": softmax, "log_softmax": log_softmax}


def value_and_vjp(fn, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y, tape.gradient(y, x, output_gradients=upstream)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_values_and_gradients_match_tensorflow(op, dtype, shape, axis):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape) * 3, dtype)
    upstream = tf.constant(rng.normal(size=shape), dtype)
    y, dx = value_and_vjp(lambda t: OPS[op](t, axis=axis), x, upstream)
    y_ref, dx_ref = value_and_vjp(lambda t: reference(op, t, axis), x, upstream)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(dx, dx_ref, rtol=TOL[dtype] * 10, atol=TOL[dtype])


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0, [0, 2]])
def test_gradient_matches_finite_differences(op, axis):
    x = tf.constant(np.random.default_rng(1).normal(size=[3, 4, 2]), tf.float64)
    theoretical, numerical = tf.test.compute_gradient(
        lambda t: OPS[op](t, axis=axis), [x]
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_eager_function_and_xla_agree(mode, op):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=[4, 6]), tf.float32)
    upstream = tf.constant(rng.normal(size=[4, 6]), tf.float32)

    def fn(x, upstream):
        return value_and_vjp(lambda t: OPS[op](t, axis=0), x, upstream)

    y, dx = compiled(fn, mode, autograph=False)(x, upstream)
    y_ref, dx_ref = value_and_vjp(lambda t: reference(op, t, 0), x, upstream)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype,scale", [(tf.float32, 1e4), (tf.float16, 6e4)])
def test_extreme_inputs_stay_finite_and_exact(op, dtype, scale):
    # Gaps up to 1.05 * scale: log-probabilities stay inside float16's range.
    values = np.array([[1.0, 0.0, 0.5, 0.02], [-0.05, 0.9, 1.0, 0.3]]) * scale
    x = tf.constant(values, dtype)
    upstream = tf.constant(np.random.default_rng(3).normal(size=values.shape), dtype)
    y, dx = value_and_vjp(lambda t: OPS[op](t), x, upstream)
    exact = tf.constant(tf.cast(x, tf.float64))
    y_ref, dx_ref = value_and_vjp(
        lambda t: reference(op, t, -1), exact, tf.cast(upstream, tf.float64)
    )
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(dx.numpy()))
    tol = 1e-3 if dtype == tf.float16 else 1e-6
    np.testing.assert_allclose(
        tf.cast(y, tf.float64), y_ref, rtol=tol, atol=tol * np.abs(y_ref).max()
    )
    np.testing.assert_allclose(tf.cast(dx, tf.float64), dx_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_softmax_low_precision_is_computed_in_float32(op, dtype):
    rng = np.random.default_rng(4)
    x = tf.cast(tf.constant(rng.normal(size=[5, 7]) * 4, tf.float32), dtype)
    upstream = tf.cast(tf.constant(rng.normal(size=[5, 7]), tf.float32), dtype)
    y, dx = value_and_vjp(lambda t: OPS[op](t), x, upstream)
    x32, up32 = tf.cast(x, tf.float32), tf.cast(upstream, tf.float32)
    y_ref, dx_ref = value_and_vjp(lambda t: reference(op, t, -1), x32, up32)
    assert y.dtype == dtype and dx.dtype == dtype
    # Computed in float32: only the final rounding differs (one ulp at most).
    ulp = np.finfo(np.float16).eps if dtype == tf.float16 else 2.0**-7
    np.testing.assert_allclose(
        tf.cast(y, tf.float32), y_ref, rtol=ulp, atol=ulp * np.abs(y_ref).max()
    )
    np.testing.assert_allclose(
        tf.cast(dx, tf.float32), dx_ref, rtol=1e-2, atol=1e-2 * np.abs(dx_ref).max()
    )


def test_negative_infinity_entries_get_zero_probability_and_gradient():
    x = tf.constant([[0.0, -np.inf, 1.0], [2.0, 2.0, -np.inf]])
    upstream = tf.constant([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]])
    y, dx = value_and_vjp(softmax, x, upstream)
    finite = tf.where(tf.math.is_inf(x), -1e30, x)
    y_ref, dx_ref = value_and_vjp(
        lambda t: reference("softmax", t, -1), finite, upstream
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_invalid_arguments_are_rejected(op):
    fn = OPS[op]
    with pytest.raises(TypeError, match="`x` must be a floating-point"):
        fn(tf.constant([1, 2, 3]))
    with pytest.raises(TypeError, match="`axis`"):
        fn(tf.ones([2, 3]), axis=True)
    with pytest.raises(TypeError, match="`axis`"):
        fn(tf.ones([2, 3]), axis=None)
    with pytest.raises(ValueError, match="out of range"):
        fn(tf.ones([2, 3]), axis=2)
    with pytest.raises(ValueError, match="repeats an axis"):
        fn(tf.ones([2, 3]), axis=[1, -1])
