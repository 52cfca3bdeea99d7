"""The eager fast paths compute what the graph path computes.

Eagerly, an op with no tape watching its inputs runs as its plain forward
pass; with one first-order tape it returns no hidden outputs; the sparse
cross-entropy runs on TensorFlow's kernel where that applies. Each must give
the values and gradients of the general path, which `tf.function` always
takes.
"""

import numpy as np
import pytest
import tensorflow as tf
from helpers import needs_internal

from keras_bn import ops
from keras_bn._internals import FIRST_ORDER
from keras_bn._internals import HIGHER_ORDER
from keras_bn._internals import NO_GRADIENT
from keras_bn._internals import gradient_order
from keras_bn._internals import tape_could_record


def _value_and_gradient(fn, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32)))
    return y, tape.gradient(loss, x)


def _both_paths(fn, x):
    return _value_and_gradient(fn, x), tf.function(_value_and_gradient)(fn, x)


def _tolerance(dtype):
    return {tf.float16: 2e-3, tf.float32: 1e-6, tf.float64: 1e-12}[dtype]


SPARSE_CASES = {
    "kernel": ({}, (64, 10)),
    "kernel_rank3": ({}, (8, 6, 10)),
    "smoothing": ({"label_smoothing": 0.1}, (64, 10)),
    "ignore_class": ({"ignore_class": 3}, (64, 10)),
    "class_axis_1": ({"axis": 1}, (8, 10, 6)),
}


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64])
@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_sparse_cross_entropy_eager_equals_graph(rng, case, dtype):
    kwargs, shape = SPARSE_CASES[case]
    axis = kwargs.get("axis", -1)
    logits = tf.constant(rng.normal(size=shape) * 3, dtype)
    label_shape = [d for i, d in enumerate(shape) if i != axis % len(shape)]
    labels = tf.constant(rng.integers(0, 10, size=label_shape), tf.int32)

    def loss(x):
        return ops.sparse_softmax_cross_entropy(labels, x, **kwargs)

    (eager, eager_grad), (graph, graph_grad) = _both_paths(loss, logits)
    tol = _tolerance(dtype)
    np.testing.assert_allclose(eager, graph, rtol=tol, atol=tol)
    np.testing.assert_allclose(eager_grad, graph_grad, rtol=tol, atol=tol)
    # And against the float64 closed form: -log softmax at the label.
    if not kwargs:
        log_p = tf.nn.log_softmax(tf.cast(logits, tf.float64), axis=-1).numpy()
        want = -np.take_along_axis(log_p, labels.numpy()[..., None], -1)[..., 0]
        np.testing.assert_allclose(eager, want, rtol=max(tol, 1e-6), atol=tol)


def test_eager_labels_out_of_range_still_raise():
    logits = tf.zeros([3, 4])
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[4, -1\]"):
        ops.sparse_softmax_cross_entropy([4, 1, -1], logits)
    # An ignored out-of-range label is fine, and costs the example nothing.
    loss = ops.sparse_softmax_cross_entropy([-1, 1, 2], logits, ignore_class=-1)
    np.testing.assert_allclose(loss, [0.0, np.log(4.0), np.log(4.0)], rtol=1e-6)


OPS = {
    "bn_closed_form": lambda x: ops.batch_norm_train(x, fused=False)[0],
    "bn_fused": lambda x: ops.batch_norm_train(x)[0],
    "softmax": lambda x: ops.softmax(x),
    "dense_ce": lambda x: ops.softmax_cross_entropy(ops.softmax(x * 0.5), x),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_without_a_tape_equal_ops_under_one(rng, name):
    x = tf.constant(rng.normal(size=(16, 5)), tf.float32)
    fn = OPS[name]
    plain = fn(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        taped = fn(x)
    np.testing.assert_array_equal(plain, taped)
    (eager, eager_grad), (graph, graph_grad) = _both_paths(fn, x)
    np.testing.assert_allclose(eager, graph, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eager_grad, graph_grad, rtol=1e-5, atol=1e-6)


@needs_internal("TensorFlow's tape set")
def test_gradient_order_reads_the_active_tapes():
    """The private TensorFlow function behind the eager fast paths: this test
    fails loudly if it moves or changes its answers."""
    x = tf.ones([2])
    assert gradient_order([x]) == NO_GRADIENT
    with tf.GradientTape() as tape:
        tape.watch(x)
        assert gradient_order([x]) == FIRST_ORDER
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            assert gradient_order([x]) == HIGHER_ORDER
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        assert gradient_order([x]) == HIGHER_ORDER
    assert tf.function(lambda x: tf.constant(gradient_order([x])))(x) == HIGHER_ORDER


@needs_internal("TensorFlow's tape set")
def test_tape_could_record_reads_the_tape_set():
    """The other private TensorFlow function behind custom_op: True only
    while a tape or forward accumulator records."""
    x = tf.ones([2])
    assert not tape_could_record()
    with tf.GradientTape():
        assert tape_could_record()
    with tf.autodiff.ForwardAccumulator(x, x):
        assert tape_could_record()
    with tf.GradientTape() as tape:
        with tape.stop_recording():
            assert not tape_could_record()


def test_sparse_kernel_path_gives_exact_jvps(rng):
    """A forward accumulator alone is first order: the kernel path runs, and
    its JVP is the transposed backward pass, `sum(tangent * (p - onehot))`."""
    logits = tf.constant(rng.normal(size=(16, 10)), tf.float64)
    tangent = tf.constant(rng.normal(size=(16, 10)), tf.float64)
    labels = tf.constant(rng.integers(0, 10, size=16), tf.int32)
    with tf.autodiff.ForwardAccumulator(logits, tangent) as acc:
        loss = ops.sparse_softmax_cross_entropy(labels, logits)
    p = tf.nn.softmax(logits)
    want = tf.reduce_sum(tangent * (p - tf.one_hot(labels, 10, dtype=tf.float64)), -1)
    np.testing.assert_allclose(acc.jvp(loss), want, rtol=1e-12, atol=1e-12)
