"""Tests for `linear_softmax_cross_entropy(..., reduction=...)`, whose
gradients are formed in the forward pass, against TensorFlow's autodiff of
the dense path."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import compiled
from helpers import forward_mode_in
from helpers import needs_internal
from test_linear_cross_entropy import assert_rounded_once
from test_linear_cross_entropy import dense_reference
from test_linear_cross_entropy import problem

from keras_bn._internals import onednn_enabled
from keras_bn.ops import linear_cross_entropy as linear_module
from keras_bn.ops import linear_cross_entropy_uniform as uniform_module
from keras_bn.ops import linear_softmax_cross_entropy


def weights_for(shape, seed=2):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0.2, 2.0, size=shape))


def with_padding(labels, shape, pad):
    flat = tf.tensor_scatter_nd_update(tf.reshape(labels, [-1]), [[0], [2]], [pad] * 2)
    return tf.reshape(flat, shape)


def dense_reduced(labels, weights, reduction, smoothing, ignore_class, *inputs):
    """Keras's reduction of the weighted per-token loss, by autodiff ops."""
    per_token = dense_reference(labels, *inputs, smoothing, ignore_class)
    if weights is not None:
        per_token *= weights
    total = tf.reduce_sum(per_token)
    if reduction == "sum":
        return total
    valid = tf.ones_like(per_token) if ignore_class is None else labels != ignore_class
    return total / tf.reduce_sum(tf.cast(valid, total.dtype))


def grads_of(fn, inputs):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = fn(*inputs)
    return [loss] + tape.gradient(loss, inputs)


def reduced_problem(shape, classes, options, chunk_size=None, dtype=tf.float64):
    """`(inputs, fused, dense)` for `options` (the op's, plus `weighted` and
    `use_bias`): the op's inputs in `dtype`, the op, and Keras's reduction of
    the dense loss by autodiff ops (for float64 copies of the inputs)."""
    options = dict(options)
    use_bias = options.pop("use_bias", True)
    weights = weights_for(shape) if options.pop("weighted", False) else None
    labels, hidden, kernel, bias, _ = problem(shape, 6, classes)
    ignore_class = options.get("ignore_class")
    if ignore_class is not None:
        labels = with_padding(labels, shape, ignore_class)
    inputs = [tf.cast(x, dtype) for x in [hidden, kernel] + [bias] * use_bias]
    if weights is not None:
        weights = tf.cast(weights, dtype)

    def fused(*inputs):
        return linear_softmax_cross_entropy(
            labels, *inputs, chunk_size=chunk_size, sample_weight=weights, **options
        )

    def dense(hidden, kernel, bias=None):
        return dense_reduced(
            labels,
            None if weights is None else tf.cast(weights, tf.float64),
            options["reduction"],
            options.get("label_smoothing", 0.0),
            ignore_class,
            hidden,
            kernel,
            bias,
        )

    return inputs, fused, dense


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_rows", [None, 4])
@pytest.mark.parametrize(
    "shape,classes,chunk_size",
    [([12], 16, 4), ([3, 5], 23, 5), ([2, 3], 7, None), ([5], 9, 32), ([4], 10, 1)],
)
@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "mean"},
        {"reduction": "sum", "weighted": True},
        {"reduction": "mean", "weighted": True, "label_smoothing": 0.2},
        {"reduction": "mean", "weighted": True, "ignore_class": 3},
        {"reduction": "sum", "ignore_class": 3, "use_bias": False},
    ],
)
def test_reduced_matches_dense_autodiff_in_float64(
    mode, block_rows, shape, classes, chunk_size, options, monkeypatch
):
    if block_rows:  # blocks of 4 tokens: several, and a padded last one,
        # each adding its kernel gradient 2 of the 6 rows at a time
        monkeypatch.setattr(uniform_module, "_token_rows", lambda *_: block_rows)
        monkeypatch.setattr(uniform_module, "_ROWS_ENTRIES", 2 * classes)
    inputs, fused, dense = reduced_problem(shape, classes, options, chunk_size)
    got = compiled(lambda: grads_of(fused, inputs), mode)()
    want = grads_of(dense, inputs)
    assert got[0].shape == []
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


# float32 takes oneDNN's fused add in a graph with oneDNN on, else rows.
DTYPES = pytest.mark.parametrize("dtype", [tf.float64, tf.float32])


def tolerance(dtype):
    """Of float32 sums of at most 15 products of size ~1 to 10, else float64's."""
    return (
        dict(rtol=0, atol=1e-9) if dtype == tf.float64 else dict(rtol=1e-5, atol=1e-5)
    )


@DTYPES
@pytest.mark.parametrize("mode", MODES)
def test_kernel_gradient_written_in_place_starts_from_zero(mode, dtype, monkeypatch):
    """Several blocks add into the kernel's gradient, written in place: each
    call of a graph, and each op in it, starts from its own zeros (a shared
    or cached buffer would carry the last call's sum). Each block adds one
    row at a time (5 features)."""
    monkeypatch.setattr(uniform_module, "_token_rows", lambda *_: 4)
    monkeypatch.setattr(uniform_module, "_ROWS_ENTRIES", 12)
    labels, *inputs, _ = problem([3, 4], 5, 12, dtype)
    exact = [tf.cast(x, tf.float64) for x in inputs]
    want = grads_of(lambda *a: dense_reduced(labels, None, "sum", 0, None, *a), exact)

    def fused(*inputs):
        return linear_softmax_cross_entropy(
            labels, *inputs, chunk_size=4, reduction="sum"
        )

    twice = compiled(lambda: (grads_of(fused, inputs), grads_of(fused, inputs)), mode)
    for _ in range(2):
        for got in twice():
            for g, w in zip(got, want):
                np.testing.assert_allclose(g.numpy(), w.numpy(), **tolerance(dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "mean"},
        {"reduction": "sum", "weighted": True, "label_smoothing": 0.2},
        {"reduction": "mean", "ignore_class": 3, "use_bias": False},
    ],
)
def test_float32_sum_over_blocks_matches_float64_dense(mode, options, monkeypatch):
    """In a float32 graph with oneDNN on, each block's kernel gradient is
    accumulated by oneDNN's fused MatMul+BiasAdd+Add (the only path that
    runs there); elsewhere by the in-place row sum. Blocks of 4 tokens, one
    padded, against the float64 dense autodiff of the same inputs."""
    ways = []
    monkeypatch.setattr(uniform_module, "_token_rows", lambda *_: 4)

    def spying(add, fused):
        def spy(*args):
            ways.append(fused)
            return add(*args)

        return spy

    for name in ("_add_fused", "_add_rows"):
        add = getattr(uniform_module, name)
        monkeypatch.setattr(uniform_module, name, spying(add, name == "_add_fused"))
    inputs, fused, dense = reduced_problem([3, 5], 23, options, dtype=tf.float32)
    got = compiled(lambda: grads_of(fused, inputs), mode)()
    want = grads_of(dense, [tf.cast(x, tf.float64) for x in inputs])
    # Eagerly once per block, in a graph once per trace of the loop's body.
    no_gpu = not tf.config.list_logical_devices("GPU")
    assert set(ways) == {mode == "function" and onednn_enabled() and no_gpu}
    for g, w in zip(got, want):
        assert g.dtype == tf.float32
        np.testing.assert_allclose(g.numpy(), w.numpy(), **tolerance(tf.float32))


@DTYPES
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_vectorized_map_of_the_reduced_gradient_matches_dense(mode, dtype, monkeypatch):
    """Under `tf.vectorized_map` (each map element a batch of its own, its
    gradients formed in the forward pass, several blocks and row products),
    the gradients equal the dense path's, element by element."""
    monkeypatch.setattr(uniform_module, "_token_rows", lambda *_: 4)
    monkeypatch.setattr(uniform_module, "_ROWS_ENTRIES", 2 * 16)
    labels, hidden, kernel, bias, _ = problem([3, 10], 6, 16, dtype)

    def per_element(loss_fn):
        def grads(args):
            h, y = args
            return grads_of(lambda h, k: loss_fn(y, h, k), [h, kernel])[1:]

        return compiled(lambda: tf.vectorized_map(grads, (hidden, labels)), mode)

    def fused(y, h, k):
        return linear_softmax_cross_entropy(y, h, k, bias, reduction="mean")

    def dense(y, h, k):
        h, k, b = (tf.cast(x, tf.float64) for x in (h, k, bias))
        return dense_reduced(y, None, "mean", 0.0, None, h, k, b)

    for g, w in zip(per_element(fused)(), per_element(dense)()):
        np.testing.assert_allclose(g.numpy(), w.numpy(), **tolerance(dtype))


def _refuse(*args, **kwargs):
    raise AssertionError("the gradient was formed in the forward pass")


def _nan_backward(labels, hidden, kernel, bias, *args):
    """Stands for the per-token backward pass: NaN gradients if it runs (a
    graph builds it as the other branch of the check either way)."""
    nan = float("nan")
    grads = (tf.fill(tf.shape(hidden), nan), tf.fill(tf.shape(kernel), nan))
    if bias is not None:
        grads += (tf.fill(tf.shape(bias), tf.constant(nan, bias.dtype)),)
    return tuple(tf.cast(g, x.dtype) for g, x in zip(grads, (hidden, kernel, bias)))


@needs_internal("TensorFlow's tape set")
@pytest.mark.parametrize("mode", MODES)
def test_uniform_upstream_takes_the_saved_gradients(mode, monkeypatch):
    """A reduced loss never runs the per-token backward pass (the point of
    the fast path), and its gradient is still exact."""
    labels, hidden, kernel, bias, _ = problem([3, 4], 5, 11)
    labels = with_padding(labels, [3, 4], 0)
    inputs = [hidden, kernel, bias]
    want = grads_of(lambda *a: dense_reduced(labels, None, "mean", 0.1, 0, *a), inputs)
    monkeypatch.setattr(linear_module, "_backward_loop", _nan_backward)

    def fused(*inputs):
        return linear_softmax_cross_entropy(
            labels, *inputs, label_smoothing=0.1, ignore_class=0, reduction="mean"
        )

    got = compiled(lambda: grads_of(fused, inputs), mode)()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upstream", ["per_token", "uniform_but_padding"])
def test_any_other_upstream_gets_the_exact_gradient(mode, upstream):
    """The weighted per-token form under an upstream gradient that is not one
    value: the backward pass falls back to the per-token one, exactly. One
    that differs only on ignored tokens keeps the fast path (their gradient
    is 0 either way)."""
    shape = [12]
    labels, hidden, kernel, bias, noise = problem(shape, 5, 13)
    labels = with_padding(labels, shape, 4)
    weights = weights_for(shape)
    if upstream == "per_token":
        u = noise
    else:
        u = tf.where(labels == 4, noise, tf.constant(0.25, tf.float64))
    inputs = [hidden, kernel, bias]

    def fused(hidden, kernel, bias):
        loss = linear_softmax_cross_entropy(
            labels,
            hidden,
            kernel,
            bias,
            ignore_class=4,
            chunk_size=3,
            sample_weight=weights,
            gradient_in_forward=True,
        )
        return tf.reduce_sum(loss * u)

    def dense(*inputs):
        return tf.reduce_sum(dense_reference(labels, *inputs, 0.0, 4) * weights * u)

    got = compiled(lambda: grads_of(fused, inputs), mode)()
    want = grads_of(dense, inputs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_second_order_is_exact(mode, reduction):
    """A gradient penalty on `dhidden`, differentiated to the kernel and
    bias under nested tapes, equals autodiff's (the per-token backward pass
    serves it)."""
    labels, hidden, kernel, bias, _ = problem([6], 4, 9)
    weights = weights_for([6])
    direction = tf.constant(np.random.default_rng(1).normal(size=hidden.shape))

    def penalty_gradient(fn):
        with tf.GradientTape() as outer:
            outer.watch([kernel, bias])
            with tf.GradientTape() as inner:
                inner.watch(hidden)
                loss = fn(hidden, kernel, bias)
            dh = inner.gradient(loss, hidden)
            penalty = tf.reduce_sum(dh * direction)
        return outer.gradient(penalty, [kernel, bias])

    def fused(*inputs):
        return linear_softmax_cross_entropy(
            labels,
            *inputs,
            label_smoothing=0.1,
            chunk_size=4,
            sample_weight=weights,
            reduction=reduction,
        )

    def dense(*inputs):
        return dense_reduced(labels, weights, reduction, 0.1, None, *inputs)

    got = compiled(lambda: penalty_gradient(fused), mode)()
    want = penalty_gradient(dense)
    for g, w in zip(got, want):
        assert g is not None
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", [None, "mean"])
def test_forward_mode_matches_dense(mode, reduction):
    """ForwardAccumulator's JVP of the loss, and of its gradient to `hidden`
    (forward over a tape), equal autodiff's of the dense path. Under XLA, the
    loss's only: forward over reverse would differentiate the gradient of
    XLA's `Slice` in the backward loop, `XlaDynamicUpdateSlice`, which has
    no gradient in TensorFlow (a LookupError, as docs/large_vocabulary.md
    says)."""
    labels, hidden, kernel, bias, _ = problem([6], 4, 9)
    labels = with_padding(labels, [6], 0)
    weights = weights_for([6])
    rng = np.random.default_rng(3)
    inputs = [hidden, kernel, bias]
    tangents = [tf.constant(rng.normal(size=x.shape)) for x in inputs]

    def jvps(fn):
        with tf.autodiff.ForwardAccumulator(inputs, tangents) as acc:
            with tf.GradientTape() as tape:
                tape.watch(hidden)
                loss = fn(*inputs)
            if mode == "xla":
                return (acc.jvp(loss),)
            dh = tape.gradient(loss, hidden)
        return acc.jvp(loss), acc.jvp(dh)

    def fused(*inputs):
        return linear_softmax_cross_entropy(
            labels,
            *inputs,
            label_smoothing=0.1,
            ignore_class=0,
            chunk_size=4,
            sample_weight=weights,
            reduction=reduction,
        )

    def dense(*inputs):
        if reduction is None:
            return dense_reference(labels, *inputs, 0.1, 0) * weights
        return dense_reduced(labels, weights, reduction, 0.1, 0, *inputs)

    got = forward_mode_in(lambda: jvps(fused), mode)()
    want = jvps(dense)
    for g, w in zip(got, want):
        assert g is not None
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-9)


@needs_internal("TensorFlow's tape set")
def test_second_order_without_a_tape_raises():
    """In a graph, `tf.gradients` of the tape's first-order gradient cannot
    see through the saved gradients: a clear error, not a wrong Hessian."""
    labels, hidden, kernel, bias, _ = problem([6], 4, 9)

    @tf.function
    def second_order():
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = linear_softmax_cross_entropy(
                labels, hidden, kernel, bias, reduction="mean"
            )
        dh = tape.gradient(loss, hidden)
        return tf.gradients(tf.reduce_sum(dh**2), [kernel])

    with pytest.raises(ValueError, match="cannot be differentiated again"):
        second_order()


@needs_internal("TensorFlow's tape set")
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_no_gradient_work_without_a_tape(mode, monkeypatch):
    """Evaluation (no tape) computes the loss only, as the per-token path."""
    labels, hidden, kernel, bias, _ = problem([2, 3], 4, 9)
    monkeypatch.setattr(uniform_module, "forward_with_gradient", _refuse)
    fn = compiled(
        lambda: linear_softmax_cross_entropy(
            labels, hidden, kernel, bias, reduction="sum"
        ),
        mode,
    )
    want = tf.reduce_sum(dense_reference(labels, hidden, kernel, bias))
    np.testing.assert_allclose(fn().numpy(), want.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_reduced_low_precision_accumulates_in_float32(dtype):
    labels, hidden, kernel, bias, _ = problem([16], 8, 40, tf.float32)
    weights = tf.cast(weights_for([16]), tf.float32)
    low = [tf.cast(t, dtype) for t in (hidden, kernel, bias)]
    got = grads_of(
        lambda *a: linear_softmax_cross_entropy(
            labels, *a, chunk_size=16, sample_weight=weights, reduction="mean"
        ),
        low,
    )
    exact = [tf.cast(t, tf.float32) for t in low]  # the same rounded inputs
    want = grads_of(
        lambda *a: dense_reduced(labels, weights, "mean", 0.0, None, *a), exact
    )
    assert got[0].dtype == tf.float32
    assert [g.dtype for g in got[1:]] == [dtype] * 3
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-5)
    assert_rounded_once(got[1:], want[1:], dtype)


def test_reduced_errors_name_the_argument():
    labels, hidden, kernel, bias, _ = problem([4], 3, 5, tf.float32)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        linear_softmax_cross_entropy(labels, hidden, kernel, reduction="auto")
    with pytest.raises(ValueError, match="`sample_weight` must have the shape"):
        linear_softmax_cross_entropy(
            labels, hidden, kernel, sample_weight=tf.ones([3]), reduction="sum"
        )
    with pytest.raises(TypeError, match="`sample_weight` must be a floating"):
        linear_softmax_cross_entropy(
            labels, hidden, kernel, sample_weight=tf.ones([4], tf.int32)
        )


def test_per_token_weights_without_reduction():
    labels, hidden, kernel, bias, _ = problem([2, 3], 4, 9)
    weights = weights_for([2, 3])
    got = linear_softmax_cross_entropy(
        labels, hidden, kernel, bias, sample_weight=weights
    )
    want = dense_reference(labels, hidden, kernel, bias) * weights
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)
