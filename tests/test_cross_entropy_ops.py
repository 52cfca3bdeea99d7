"""Tests for keras_bn.ops.cross_entropy."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import compiled

from keras_bn.ops.cross_entropy import probability_cross_entropy
from keras_bn.ops.cross_entropy import softmax_cross_entropy
from keras_bn.ops.cross_entropy import sparse_probability_cross_entropy
from keras_bn.ops.cross_entropy import sparse_softmax_cross_entropy

CASES = [([6], 0), ([4, 5], -1), ([4, 5], 0), ([2, 3, 4], -1), ([2, 3, 4, 5], 1)]
TOL = {tf.float32: 2e-6, tf.float64: 1e-12}


def vjp(fn, inputs, upstream):
    """`(fn(*inputs), gradients of sum(fn * upstream) w.r.t. inputs)`."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = fn(*inputs)
    return loss, tape.gradient(loss, inputs, output_gradients=upstream)


def random_problem(shape, axis, dtype, seed=0):
    """Logits, label distributions along `axis`, class ids and an upstream."""
    rng = np.random.default_rng(seed)
    axis = axis % len(shape)
    logits = tf.constant(rng.normal(size=shape) * 3, dtype)
    labels = tf.nn.softmax(tf.constant(rng.normal(size=shape) * 2, dtype), axis=axis)
    ids_shape = [d for i, d in enumerate(shape) if i != axis]
    ids = tf.constant(rng.integers(0, shape[axis], size=ids_shape), tf.int32)
    upstream = tf.constant(rng.uniform(0.5, 2.0, size=ids_shape), dtype)
    return logits, labels, ids, upstream


def to_last(x, axis):
    return tf.experimental.numpy.moveaxis(x, axis, -1)


def smoothed(labels, axis, smoothing):
    return labels * (1 - smoothing) + smoothing / labels.shape[axis]


def test_published_golden_values():
    # TensorFlow's xent_op_test: testNpXent.
    logits = [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
    labels = [[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.0]]
    np.testing.assert_allclose(
        softmax_cross_entropy(labels, logits), [1.3862, 1.9401], atol=1e-4
    )


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_dense_matches_tensorflow(dtype, shape, axis):
    logits, labels, _, upstream = random_problem(shape, axis, dtype)
    loss, grads = vjp(
        lambda t, x: softmax_cross_entropy(t, x, axis=axis), [labels, logits], upstream
    )
    ref, ref_grads = vjp(
        lambda t, x: tf.nn.softmax_cross_entropy_with_logits(t, x, axis=axis),
        [labels, logits],
        upstream,
    )
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss, ref, rtol=TOL[dtype])
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_dense_gradient_is_exact_for_unnormalized_labels(smoothing):
    logits, labels, _, upstream = random_problem([4, 5], -1, tf.float64)
    labels = labels * tf.constant([[0.5], [1.0], [2.0], [3.5]], tf.float64)

    def naive(t, x):
        return -tf.reduce_sum(smoothed(t, -1, smoothing) * tf.nn.log_softmax(x), -1)

    loss, grads = vjp(
        lambda t, x: softmax_cross_entropy(t, x, label_smoothing=smoothing),
        [labels, logits],
        upstream,
    )
    ref, ref_grads = vjp(naive, [labels, logits], upstream)
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-14)
    # TensorFlow's kernel assumes normalized labels: its gradient differs here.
    tf_grad = vjp(tf.nn.softmax_cross_entropy_with_logits, [labels, logits], upstream)
    assert not np.allclose(tf_grad[1][1], ref_grads[1])


@pytest.mark.parametrize("axis", [-1, 1])
def test_dense_under_xla_is_exact_for_unnormalized_labels(axis):
    """XLA takes the loss and sum(t) from one stacked reduction; same values."""
    logits, labels, _, upstream = random_problem([4, 5, 3], axis, tf.float64)
    labels = labels * tf.constant([[[0.5]], [[1.0]], [[2.0]], [[3.5]]], tf.float64)

    def fn(t, x):
        return vjp(
            lambda t, x: softmax_cross_entropy(t, x, axis, label_smoothing=0.1),
            [t, x],
            upstream,
        )

    loss, grads = compiled(fn, "xla", autograph=False)(labels, logits)
    ref, ref_grads = fn(labels, logits)
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-14)
    # The stacked reduction (a Pack op) is traced under XLA only.
    for jit_compile in (False, True):
        traced = tf.function(fn, jit_compile=jit_compile, autograph=False)
        graph = traced.get_concrete_function(labels, logits).graph
        packed = any(op.type == "Pack" for op in graph.get_operations())
        assert packed == jit_compile


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape,axis", [([3, 4], -1), ([2, 3, 2, 2], 1)])
def test_gradients_match_finite_differences(smoothing, shape, axis):
    logits, labels, ids, _ = random_problem(shape, axis, tf.float64, seed=1)
    for fn, args in [
        (lambda t, x: softmax_cross_entropy(t, x, axis, smoothing), [labels, logits]),
        (lambda x: sparse_softmax_cross_entropy(ids, x, axis, smoothing), [logits]),
    ]:
        theoretical, numerical = tf.test.compute_gradient(fn, args)
        for th, nu in zip(theoretical, numerical):
            np.testing.assert_allclose(th, nu, atol=1e-7)


@pytest.mark.parametrize("shape,axis", [([4, 6], -1), ([2, 4, 3, 5], 1)])
def test_label_smoothing_uses_the_class_axis(shape, axis):
    logits, labels, ids, upstream = random_problem(shape, axis, tf.float64)
    loss = softmax_cross_entropy(labels, logits, axis=axis, label_smoothing=0.25)
    ref = tf.nn.softmax_cross_entropy_with_logits(
        smoothed(labels, axis, 0.25), logits, axis=axis
    )
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    onehot = tf.one_hot(ids, shape[axis], axis=axis, dtype=tf.float64)
    sparse, sparse_grad = vjp(
        lambda x: sparse_softmax_cross_entropy(ids, x, axis, 0.25), [logits], upstream
    )
    dense, dense_grad = vjp(
        lambda x: softmax_cross_entropy(onehot, x, axis, 0.25), [logits], upstream
    )
    np.testing.assert_allclose(sparse, dense, rtol=1e-12)
    np.testing.assert_allclose(sparse_grad[0], dense_grad[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("label_dtype", [tf.int32, tf.int64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_sparse_matches_tensorflow(dtype, label_dtype, shape, axis):
    logits, _, ids, upstream = random_problem(shape, axis, dtype)
    ids = tf.cast(ids, label_dtype)
    loss, grad = vjp(
        lambda x: sparse_softmax_cross_entropy(ids, x, axis=axis), [logits], upstream
    )
    # TensorFlow's op takes the classes on the last axis only.
    ref, ref_grad = vjp(
        lambda x: tf.nn.sparse_softmax_cross_entropy_with_logits(ids, to_last(x, axis)),
        [logits],
        upstream,
    )
    assert loss.dtype == dtype and loss.shape == ids.shape
    np.testing.assert_allclose(loss, ref, rtol=TOL[dtype])
    np.testing.assert_allclose(grad[0], ref_grad[0], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("ignore_class", [0, -1, 255])
@pytest.mark.parametrize("shape,axis", [([6, 4], -1), ([2, 4, 3, 2], 1)])
def test_ignored_labels_get_zero_loss_and_gradient(ignore_class, shape, axis):
    logits, _, ids, upstream = random_problem(shape, axis, tf.float64)
    ids = tf.where(ids == ignore_class, 1, ids)  # only the chosen ones ignored
    ignored = np.zeros(ids.shape, bool)
    ignored.flat[::3] = True
    ids = tf.where(ignored, ignore_class, ids)
    # Non-finite logits where the label is ignored must not leak.
    poison = tf.expand_dims(tf.constant(ignored), axis) & tf.ones_like(logits, tf.bool)
    poisoned = tf.where(poison, tf.constant(np.nan, tf.float64), logits)
    loss, grad = vjp(
        lambda x: sparse_softmax_cross_entropy(ids, x, axis, ignore_class=ignore_class),
        [poisoned],
        upstream,
    )
    kept = tf.where(ignored, 0, ids)
    ref, ref_grad = vjp(
        lambda x: sparse_softmax_cross_entropy(kept, x, axis), [logits], upstream
    )
    np.testing.assert_array_equal(loss.numpy()[ignored], 0.0)
    np.testing.assert_allclose(loss.numpy()[~ignored], ref.numpy()[~ignored])
    expected_grad = tf.where(poison, tf.zeros_like(logits), ref_grad[0])
    np.testing.assert_allclose(grad[0], expected_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_all_ignored_batch_gives_zero_loss_and_gradient(mode):
    logits = tf.random.normal([3, 4, 5], seed=1)
    ids = tf.fill([3, 4], -1)

    def fn(x):
        return vjp(
            lambda t: sparse_softmax_cross_entropy(
                ids, t, ignore_class=-1, label_smoothing=0.1
            ),
            [x],
            tf.ones([3, 4]),
        )

    loss, grad = compiled(fn, mode, autograph=False)(logits)
    np.testing.assert_array_equal(loss, np.zeros([3, 4]))
    np.testing.assert_array_equal(grad[0], np.zeros([3, 4, 5]))


@pytest.mark.parametrize("bad", [-1, 4, 1000])
def test_out_of_range_labels_raise_in_eager_mode(bad):
    logits = tf.zeros([3, 4])
    with pytest.raises(ValueError, match=rf"\[0, 4\).*\[{bad}\]"):
        sparse_softmax_cross_entropy([0, bad, 2], logits)
    with pytest.raises(ValueError, match="out-of-range"):
        sparse_probability_cross_entropy([0, bad, 2], tf.fill([3, 4], 0.25))
    if bad != -1:
        with pytest.raises(ValueError, match="ignore_class=-1"):
            sparse_softmax_cross_entropy([0, bad, -1], logits, ignore_class=-1)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_out_of_range_labels_give_nan_in_graphs(mode, axis):
    logits = tf.random.normal([4, 4], seed=2)
    ids = tf.constant([1, 7, -3, 2])
    upstream = tf.constant([1.0, 1.0, 1.0, 2.0])

    def fn(x):
        return vjp(lambda t: sparse_softmax_cross_entropy(ids, t, axis), [x], upstream)

    loss, grad = compiled(fn, mode, autograph=False)(logits)
    safe = tf.constant([1, 0, 0, 2])
    ref, ref_grad = vjp(
        lambda t: sparse_softmax_cross_entropy(safe, t, axis), [logits], upstream
    )
    bad = np.array([False, True, True, False])
    assert np.all(np.isnan(loss.numpy()[bad]))
    np.testing.assert_allclose(loss.numpy()[~bad], ref.numpy()[~bad], rtol=1e-6)
    grad = to_last(grad[0], axis).numpy()
    assert np.all(np.isnan(grad[bad]))
    np.testing.assert_allclose(
        grad[~bad], to_last(ref_grad[0], axis).numpy()[~bad], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse", [False, True])
def test_eager_function_and_xla_agree(mode, sparse):
    logits, labels, ids, upstream = random_problem([2, 5, 3, 3], 1, tf.float32)
    ids = tf.where(ids == 0, 9, ids)

    def fn(x):
        def loss(t):
            if sparse:
                return sparse_softmax_cross_entropy(ids, t, 1, 0.1, ignore_class=9)
            return softmax_cross_entropy(labels, t, 1, 0.1)

        return vjp(loss, [x], upstream)

    loss, grad = compiled(fn, mode, autograph=False)(logits)
    ref, ref_grad = fn(logits)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[0], ref_grad[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype,scale", [(tf.float32, 1e4), (tf.float16, 6e4)])
def test_extreme_logits_give_finite_exact_loss_and_gradients(sparse, dtype, scale):
    logits = tf.constant(
        np.array([[1.0, -1.0, 0.5], [-1.0, -0.99, 1.0], [0.3, 1.0, -1.0]]) * scale,
        dtype,
    )
    ids = tf.constant([1, 0, 2])
    labels = tf.one_hot(ids, 3, dtype=dtype)
    upstream = tf.ones([3], tf.float32)

    def loss_fn(x):
        if sparse:
            return sparse_softmax_cross_entropy(ids, x)
        return softmax_cross_entropy(labels, x)

    loss, grad = vjp(loss_fn, [logits], upstream)
    exact = tf.cast(logits, tf.float64)
    ref, ref_grad = vjp(
        lambda x: (
            -tf.reduce_sum(
                tf.one_hot(ids, 3, dtype=tf.float64) * tf.nn.log_softmax(x), -1
            )
        ),
        [exact],
        tf.cast(upstream, tf.float64),
    )
    assert loss.dtype == tf.float32 and grad[0].dtype == dtype
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad[0]))
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(tf.cast(grad[0], tf.float64), ref_grad[0], atol=1e-3)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_logits_give_float32_loss(dtype):
    logits, labels, ids, upstream = random_problem([4, 6], -1, tf.float32)
    low = tf.cast(logits, dtype)
    for fn, args in [
        (softmax_cross_entropy, [tf.cast(labels, dtype), low]),
        (lambda x: sparse_softmax_cross_entropy(ids, x), [low]),
    ]:
        loss, grads = vjp(fn, args, upstream)
        ref, _ = vjp(fn, [tf.cast(a, tf.float32) for a in args], upstream)
        assert loss.dtype == tf.float32
        assert [g.dtype for g in grads] == [dtype] * len(args)
        np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_incompatible_static_shapes_name_both():
    with pytest.raises(
        ValueError, match=r"labels.shape=\[4, 1\].*logits.shape=\[4, 3\]"
    ):
        softmax_cross_entropy(tf.ones([4, 1]), tf.ones([4, 3]))
    with pytest.raises(
        ValueError, match=r"labels.shape=\[4, 3\].*logits.shape=\[4, 3\]"
    ):
        sparse_softmax_cross_entropy(tf.ones([4, 3], tf.int32), tf.ones([4, 3]))
    with pytest.raises(
        ValueError, match=r"labels.shape=\[2, 3\].*logits.shape=\[2, 5, 3\]"
    ):
        sparse_softmax_cross_entropy(tf.ones([2, 3], tf.int32), tf.ones([2, 5, 3]))
    with pytest.raises(ValueError, match=r"probabilities.shape=\[4, 3\]"):
        probability_cross_entropy(tf.ones([4, 2]), tf.ones([4, 3]))


def test_incompatible_dynamic_shapes_fail_when_run():
    spec = tf.TensorSpec([None, None], tf.float32)

    @tf.function(input_signature=[spec, spec])
    def fn(labels, logits):
        return softmax_cross_entropy(labels, logits)

    np.testing.assert_allclose(
        fn(tf.ones([2, 3]) / 3, tf.zeros([2, 3])), [np.log(3)] * 2
    )
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="`labels` must have the shape of `logits`"
    ):
        fn(tf.ones([2, 1]), tf.zeros([2, 3]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="`labels` must have the shape of `logits`"
    ):
        fn(tf.ones([1, 3]) / 3, tf.zeros([2, 3]))  # would broadcast silently


def test_invalid_arguments_are_rejected():
    with pytest.raises(TypeError, match="`labels` must be a floating-point"):
        softmax_cross_entropy(tf.ones([2, 3], tf.int32), tf.ones([2, 3]))
    with pytest.raises(TypeError, match="`labels` must be an int32 or int64"):
        sparse_softmax_cross_entropy(tf.ones([2]), tf.ones([2, 3]))
    with pytest.raises(TypeError, match="`logits` must be a floating-point"):
        sparse_softmax_cross_entropy(tf.ones([2], tf.int32), tf.ones([2, 3], tf.int32))
    with pytest.raises(TypeError, match="`ignore_class`"):
        sparse_softmax_cross_entropy([0, 1], tf.ones([2, 3]), ignore_class=1.0)
    with pytest.raises(TypeError, match="`axis` must be a single int"):
        softmax_cross_entropy(tf.ones([2, 3]), tf.ones([2, 3]), axis=[0, 1])
    with pytest.raises(ValueError, match="`axis` has an axis 2 out of range"):
        sparse_softmax_cross_entropy([0, 1], tf.ones([2, 3]), axis=2)
    with pytest.raises(ValueError, match="`label_smoothing`"):
        softmax_cross_entropy(tf.ones([2, 3]), tf.ones([2, 3]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="`epsilon`"):
        probability_cross_entropy(tf.ones([2, 3]), tf.ones([2, 3]), epsilon=0.0)


def keras_probability_formula(labels, probabilities, axis, epsilon):
    """Keras's `categorical_crossentropy(from_logits=False)`, with autodiff."""
    q = probabilities / tf.reduce_sum(probabilities, axis, keepdims=True)
    q = tf.clip_by_value(q, epsilon, 1.0 - epsilon)
    return -tf.reduce_sum(labels * tf.math.log(q), axis)


def keras_sparse_probability_formula(ids, probabilities, epsilon):
    log_q = tf.math.log(tf.clip_by_value(probabilities, epsilon, 1.0 - epsilon))
    return tf.nn.sparse_softmax_cross_entropy_with_logits(ids, log_q)


@pytest.mark.parametrize("epsilon", [1e-7, 0.05])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_probability_ops_match_the_keras_formulas(epsilon, dtype):
    logits, labels, ids, upstream = random_problem([6, 5], -1, dtype, seed=3)
    # Unnormalized, with exact zeros and entries clipped at either end.
    probabilities = tf.nn.softmax(logits) * 1.5
    probabilities = tf.tensor_scatter_nd_update(
        probabilities, [[0, 1], [1, 2], [2, 0]], tf.constant([0.0, 1.0, 1.5], dtype)
    )
    loss, grads = vjp(
        lambda t, p: probability_cross_entropy(t, p, epsilon=epsilon),
        [labels, probabilities],
        upstream,
    )
    ref, ref_grads = vjp(
        lambda t, p: keras_probability_formula(t, p, -1, epsilon),
        [labels, probabilities],
        upstream,
    )
    np.testing.assert_allclose(loss, ref, rtol=TOL[dtype] * 5)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=TOL[dtype] * 5, atol=TOL[dtype])
    loss, grad = vjp(
        lambda p: sparse_probability_cross_entropy(ids, p, epsilon=epsilon),
        [probabilities],
        upstream,
    )
    ref, ref_grad = vjp(
        lambda p: keras_sparse_probability_formula(ids, p, epsilon),
        [probabilities],
        upstream,
    )
    np.testing.assert_allclose(loss, ref, rtol=TOL[dtype] * 5)
    np.testing.assert_allclose(
        grad[0], ref_grad[0], rtol=TOL[dtype] * 5, atol=TOL[dtype]
    )


def test_probability_ops_match_finite_differences():
    _, labels, ids, _ = random_problem([2, 3, 4], 1, tf.float64, seed=4)
    probabilities = tf.constant(
        np.random.default_rng(5).uniform(0.1, 0.6, size=[2, 3, 4]), tf.float64
    )
    for fn, args in [
        (lambda t, p: probability_cross_entropy(t, p, 1, 0.1), [labels, probabilities]),
        (lambda p: sparse_probability_cross_entropy(ids, p, 1, 0.1), [probabilities]),
    ]:
        # A small step: log(p) curves strongly at p = 0.1.
        theoretical, numerical = tf.test.compute_gradient(fn, args, delta=1e-6)
        for th, nu in zip(theoretical, numerical):
            np.testing.assert_allclose(th, nu, atol=1e-7)
