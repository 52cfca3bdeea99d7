"""Tests for keras_bn.ops.linear_cross_entropy, against TensorFlow's autodiff
of the dense path (`reduce_logsumexp` of `hidden @ kernel + bias`)."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import compiled

from keras_bn.ops import linear_softmax_cross_entropy
from keras_bn.ops import sparse_softmax_cross_entropy


def dense_reference(labels, hidden, kernel, bias, smoothing=0.0, ignore_class=None):
    """The loss by TF autodiff ops only: `lse - (1 - s) x_y - s mean(x)`."""
    logits = tf.tensordot(hidden, kernel, 1)
    if bias is not None:
        logits += bias
    safe = labels
    if ignore_class is not None:
        safe = tf.where(labels == ignore_class, 0, labels)
    picked = tf.gather(logits, safe, batch_dims=labels.shape.rank)
    loss = tf.reduce_logsumexp(logits, -1) - (1 - smoothing) * picked
    loss -= smoothing * tf.reduce_mean(logits, -1)
    if ignore_class is not None:
        loss = tf.where(labels == ignore_class, tf.zeros_like(loss), loss)
    return loss


def problem(shape, features, classes, dtype=tf.float64, seed=0):
    rng = np.random.default_rng(seed)
    hidden = tf.constant(rng.normal(size=shape + [features]), dtype)
    kernel = tf.constant(rng.normal(size=(features, classes)), dtype)
    bias = tf.constant(rng.normal(size=classes), dtype)
    labels = tf.constant(rng.integers(0, classes, size=shape), tf.int32)
    # Any upstream gradient: per-token weights of both signs, and zeros (masks).
    upstream = rng.normal(size=shape) * (rng.uniform(size=shape) > 0.3)
    return labels, hidden, kernel, bias, tf.constant(upstream, dtype)


def value_and_grads(fn, labels, inputs, upstream):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = fn(labels, *inputs)
    return [loss] + tape.gradient(loss, inputs, output_gradients=upstream)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape,classes,chunk_size",
    [([12], 16, 4), ([3, 4], 23, 5), ([2, 3], 7, None), ([5], 9, 32), ([4], 10, 1)],
)
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.2}, {"ignore_class": 3}, {"use_bias": False}],
)
def test_matches_dense_autodiff_in_float64(mode, shape, classes, chunk_size, options):
    options = dict(options)
    use_bias = options.pop("use_bias", True)
    labels, hidden, kernel, bias, upstream = problem(shape, 6, classes)
    if "ignore_class" in options:  # some tokens are padding
        labels = tf.tensor_scatter_nd_update(
            tf.reshape(labels, [-1]), [[0], [2]], [3, 3]
        )
        labels = tf.reshape(labels, shape)
    inputs = [hidden, kernel] + ([bias] if use_bias else [])

    def fused(labels, hidden, kernel, bias=None):
        return linear_softmax_cross_entropy(
            labels, hidden, kernel, bias, chunk_size=chunk_size, **options
        )

    def dense(labels, hidden, kernel, bias=None):
        return dense_reference(
            labels,
            hidden,
            kernel,
            bias,
            options.get("label_smoothing", 0.0),
            options.get("ignore_class"),
        )

    got = compiled(lambda: value_and_grads(fused, labels, inputs, upstream), mode)()
    want = value_and_grads(dense, labels, inputs, upstream)
    assert got[0].shape == labels.shape
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


def test_equals_the_sparse_op_on_the_logits():
    labels, hidden, kernel, bias, _ = problem([2, 5], 4, 11, tf.float32)
    fused = linear_softmax_cross_entropy(
        labels, hidden, kernel, bias, label_smoothing=0.1, chunk_size=3
    )
    logits = tf.tensordot(hidden, kernel, 1) + bias
    dense = sparse_softmax_cross_entropy(labels, logits, label_smoothing=0.1)
    # float32 rounding of logsumexps of about 11 terms of size ~5.
    np.testing.assert_allclose(fused.numpy(), dense.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_second_order_is_exact(mode):
    """A Hessian-vector product through the backward pass (a gradient
    penalty on `dhidden`, differentiated to the kernel) equals autodiff's."""
    labels, hidden, kernel, bias, upstream = problem([6], 4, 9)
    direction = tf.constant(np.random.default_rng(1).normal(size=hidden.shape))

    def penalty_gradient(fn):
        with tf.GradientTape() as outer:
            outer.watch([kernel, bias])
            with tf.GradientTape() as inner:
                inner.watch(hidden)
                loss = fn(labels, hidden, kernel, bias)
            dh = inner.gradient(loss, hidden, output_gradients=upstream)
            penalty = tf.reduce_sum(dh * direction)
        return outer.gradient(penalty, [kernel, bias])

    def fused(*args):
        return linear_softmax_cross_entropy(*args, label_smoothing=0.1, chunk_size=4)

    def dense(*args):
        return dense_reference(*args, smoothing=0.1)

    got = compiled(lambda: penalty_gradient(fused), mode)()
    want = penalty_gradient(dense)
    for g, w in zip(got, want):
        assert g is not None
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    labels, hidden, kernel, bias, upstream = problem([16], 8, 40, tf.float32)
    low = [tf.cast(t, dtype) for t in (hidden, kernel, bias)]
    got = value_and_grads(
        lambda y, *a: linear_softmax_cross_entropy(y, *a, chunk_size=16),
        labels,
        low,
        tf.cast(upstream, tf.float32),
    )
    exact = [tf.cast(t, tf.float32) for t in low]  # the same rounded inputs
    want = value_and_grads(dense_reference, labels, exact, upstream)
    assert got[0].dtype == tf.float32
    assert [g.dtype for g in got[1:]] == [dtype] * 3
    # The loss is float32 math on exact inputs.
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-4)
    assert_rounded_once(got[1:], want[1:], dtype)


def assert_rounded_once(got, want, dtype):
    """Gradients in float32 math, each rounded once to `dtype` (8 bits of
    mantissa for bfloat16, 11 for float16), against float32 `want`."""
    eps = 2.0**-8 if dtype == tf.bfloat16 else 2.0**-11
    for g, w in zip(got, want, strict=True):
        w = w.numpy()
        tol = eps * np.abs(w) + 1e-3 * np.abs(w).max()
        assert np.all(np.abs(tf.cast(g, tf.float32).numpy() - w) <= tol)


def test_graph_out_of_range_label_gives_nan_for_that_token():
    labels, hidden, kernel, bias, _ = problem([4], 3, 5, tf.float32)
    labels = tf.constant([0, 7, 2, -1])
    loss = tf.function(linear_softmax_cross_entropy)(labels, hidden, kernel, bias)
    assert np.isnan(loss.numpy()[[1, 3]]).all()
    assert np.isfinite(loss.numpy()[[0, 2]]).all()


def test_errors_name_the_argument():
    labels, hidden, kernel, bias, _ = problem([4], 3, 5, tf.float32)
    with pytest.raises(ValueError, match="`labels` must be class ids in"):
        linear_softmax_cross_entropy(tf.constant([0, 5, 1, 2]), hidden, kernel)
    with pytest.raises(ValueError, match="`kernel` must have shape"):
        linear_softmax_cross_entropy(labels, hidden, tf.zeros([4, 5]))
    with pytest.raises(ValueError, match="`bias` must have shape"):
        linear_softmax_cross_entropy(labels, hidden, kernel, tf.zeros([4]))
    with pytest.raises(ValueError, match="`labels` must have the shape of `hidden`"):
        linear_softmax_cross_entropy(tf.constant([0, 1]), hidden, kernel)
    with pytest.raises(TypeError, match="`kernel` must have the dtype of `hidden`"):
        linear_softmax_cross_entropy(labels, hidden, tf.cast(kernel, tf.float64))
    with pytest.raises(TypeError, match="`labels` must be an int32 or int64"):
        linear_softmax_cross_entropy(tf.cast(labels, tf.float32), hidden, kernel)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        linear_softmax_cross_entropy(labels, hidden, kernel, chunk_size=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_softmax_cross_entropy(labels, hidden, kernel, label_smoothing=2.0)
    with pytest.raises(TypeError, match="`gradient_in_forward` must be True or False"):
        linear_softmax_cross_entropy(labels, hidden, kernel, gradient_in_forward=1)
    # Unknown sizes are checked when the graph runs.
    fn = tf.function(
        linear_softmax_cross_entropy,
        input_signature=[
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, 3], tf.float32),
            tf.TensorSpec([3, 5], tf.float32),
        ],
    )
    with pytest.raises(tf.errors.InvalidArgumentError):
        fn(tf.constant([0, 1]), hidden, kernel)


def test_sample_weight_of_another_run_time_shape_raises():
    """Weights `[1]` for 4 tokens whose number is known only at run time
    raise, instead of weighing every token by the one value."""
    labels, hidden, kernel, _, _ = problem([4], 3, 5, tf.float32)
    labels = tf.cast(labels, tf.int32)
    spec = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 3], tf.float32)]

    @tf.function(input_signature=spec + [tf.TensorSpec([None], tf.float32)])
    def weighted(labels, hidden, weights):
        return linear_softmax_cross_entropy(
            labels, hidden, kernel, sample_weight=weights
        )

    match = "`sample_weight` must have the shape of `labels`"
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        weighted(labels, hidden, tf.fill([1], 2.0))
    want = 2.0 * linear_softmax_cross_entropy(labels, hidden, kernel)
    got = weighted(labels, hidden, tf.fill([4], 2.0))
    np.testing.assert_allclose(got, want, rtol=1e-6)
