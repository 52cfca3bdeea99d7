"""Every op is differentiable to any order, in reverse and forward mode.

Each case pairs a keras_bn op with the same math written in plain TF ops
(autodiff is the reference) and checks, in float64 where the op allows it:
gradient-penalty gradients (a gradient of a gradient), Hessian-vector products
in reverse-over-reverse and forward-over-reverse mode, `ForwardAccumulator`
JVPs, the third derivative along a direction, and finite differences of the
first gradient. Tolerances: float64 cases agree to rounding of a few dozen
operations on O(1) values (1e-9); float32 cases (the fused kernels accept no
float64) to about 1e4 ulps of float32, since second derivatives of batch
norm scale with `1 / variance`.
"""

import numpy as np
import pytest
import tensorflow as tf
from helpers import autodiff_batch_norm_train
from helpers import forward_mode_in
from helpers import penalty_gradients
from helpers import weighted_loss

from keras_bn import ops

EPS = 1e-3


def _bn(fused, mask=None, renorm=None):
    def ours(x, gamma, beta):
        if renorm is not None:
            return ops.batch_renorm_train(
                x, gamma, beta, *renorm, epsilon=EPS, rmax=1.5, dmax=0.5, mask=mask
            )[0]
        return ops.batch_norm_train(
            x, gamma, beta, epsilon=EPS, mask=mask, fused=fused
        )[0]

    def reference(x, gamma, beta):
        return autodiff_batch_norm_train(
            x, gamma, beta, -1, EPS, mask, renorm, (None, 1.5, 0.5)
        )[0]

    return ours, reference


def _bn_statistics():
    """A loss of all three outputs: y, and the returned mean and variance."""

    def ours(x, gamma, beta):
        y, mean, variance = ops.batch_norm_train(x, gamma, beta, epsilon=EPS)
        return y + tf.sin(mean) + tf.square(variance)

    def reference(x, gamma, beta):
        y, mean, variance = autodiff_batch_norm_train(x, gamma, beta, -1, EPS)
        return y + tf.sin(mean) + tf.square(variance)

    return ours, reference


def _bn_inference():
    def ours(x, gamma, beta):
        mean, variance = tf.sin(gamma), 1.5 + tf.cos(beta)
        return ops.batch_norm_inference(x, mean, variance, gamma, beta, epsilon=EPS)

    def reference(x, gamma, beta):
        mean, variance = tf.sin(gamma), 1.5 + tf.cos(beta)
        return gamma * (x - mean) / tf.sqrt(variance + EPS) + beta

    return ours, reference


def _softmax_family(name):
    def ours(x, gamma, beta):
        z = x * gamma + beta
        if name == "softmax":
            return ops.softmax(z)
        if name == "log_softmax":
            return ops.log_softmax(z)
        labels = ops.softmax(tf.roll(z, 1, axis=-1) * 0.5)
        if name == "dense":
            return ops.softmax_cross_entropy(labels, z, label_smoothing=0.1)
        if name == "probability":
            return ops.probability_cross_entropy(labels, tf.nn.softmax(z))
        if name == "sparse_probability":
            return ops.sparse_probability_cross_entropy(
                [0, 2, 1, 3, 2], tf.nn.softmax(z)
            )
        return ops.sparse_softmax_cross_entropy([0, 2, 1, 3, 2], z, label_smoothing=0.1)

    def reference(x, gamma, beta):
        z = x * gamma + beta
        if name == "softmax":
            return tf.nn.softmax(z)
        if name == "log_softmax":
            return tf.nn.log_softmax(z)
        labels = tf.nn.softmax(tf.roll(z, 1, axis=-1) * 0.5)
        if name == "dense":
            t = labels * 0.9 + 0.1 / 4
            return -tf.reduce_sum(t * tf.nn.log_softmax(z), axis=-1)
        if name == "probability":
            p = tf.nn.softmax(z)
            q = tf.clip_by_value(
                p / tf.reduce_sum(p, -1, keepdims=True), 1e-7, 1 - 1e-7
            )
            return -tf.reduce_sum(labels * tf.math.log(q), axis=-1)
        onehot = tf.one_hot([0, 2, 1, 3, 2], 4, dtype=z.dtype)
        if name == "sparse_probability":
            log_q = tf.math.log(tf.clip_by_value(tf.nn.softmax(z), 1e-7, 1 - 1e-7))
            return -tf.reduce_sum(onehot * tf.nn.log_softmax(log_q), axis=-1)
        t = onehot * 0.9 + 0.1 / 4
        return -tf.reduce_sum(t * tf.nn.log_softmax(z), axis=-1)

    return ours, reference


def _mask():
    return tf.constant([True, False, True, True, False, True])


CASES = {
    "bn_closed_form": (lambda: _bn(False), tf.float64, (6, 3)),
    "bn_masked": (lambda: _bn(False, mask=_mask()), tf.float64, (6, 3)),
    "bn_renorm": (
        lambda: _bn(False, renorm=(tf.constant([0.1, -0.2, 0.3], tf.float64),) * 2),
        tf.float64,
        (6, 3),
    ),
    "bn_statistics": (_bn_statistics, tf.float64, (6, 3)),
    "bn_fused": (lambda: _bn(True), tf.float32, (6, 3)),
    "bn_inference": (_bn_inference, tf.float64, (6, 3)),
    "softmax": (lambda: _softmax_family("softmax"), tf.float64, (5, 4)),
    "log_softmax": (lambda: _softmax_family("log_softmax"), tf.float64, (5, 4)),
    "dense_ce": (lambda: _softmax_family("dense"), tf.float64, (5, 4)),
    "sparse_ce": (lambda: _softmax_family("sparse"), tf.float64, (5, 4)),
    "probability_ce": (lambda: _softmax_family("probability"), tf.float64, (5, 4)),
    "sparse_probability_ce": (
        lambda: _softmax_family("sparse_probability"),
        tf.float64,
        (5, 4),
    ),
}


def _setup(name, seed=0):
    make, dtype, shape = CASES[name]
    ours, reference = make()
    rng = np.random.default_rng(seed)
    features = shape[-1]
    x = tf.constant(rng.normal(size=shape) * 2 + 1, dtype)
    gamma = tf.constant(rng.uniform(0.5, 1.5, features), dtype)
    beta = tf.constant(rng.normal(size=features), dtype)
    w = tf.constant(rng.normal(size=shape[:1] + (features,)), dtype)
    if name.endswith("_ce"):
        w = tf.constant(rng.normal(size=shape[:1]), dtype)
    return ours, reference, [x, gamma, beta], w


def _tolerance(dtype):
    return 1e-9 if dtype == tf.float64 else 2e-3


def _assert_all_close(got, want, tol):
    for g, w in zip(got, want):
        assert g is not None, "a gradient is None where the reference has values"
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("quadratic", [False, True])
def test_gradient_penalty_matches_autodiff(name, quadratic):
    ours, reference, inputs, w = _setup(name)
    tol = _tolerance(inputs[0].dtype)
    got = penalty_gradients(weighted_loss(ours, w, quadratic), inputs)
    want = penalty_gradients(weighted_loss(reference, w, quadratic), inputs)
    _assert_all_close(got, want, tol)
    # Not vacuous: the penalty depends on gamma in every case.
    assert float(tf.reduce_max(tf.abs(want[1]))) > 1e-6


@pytest.mark.parametrize("name", ["bn_closed_form", "bn_fused", "sparse_ce", "softmax"])
def test_gradient_penalty_matches_autodiff_in_a_function(name):
    ours, reference, inputs, w = _setup(name)
    got = tf.function(penalty_gradients)(weighted_loss(ours, w, True), inputs)
    want = penalty_gradients(weighted_loss(reference, w, True), inputs)
    _assert_all_close(got, want, _tolerance(inputs[0].dtype))


def _hvp_reverse(loss, inputs, vector):
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs)
            value = loss(*inputs)
        grads = inner.gradient(value, inputs)
        dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
    return outer.gradient(dot, inputs, unconnected_gradients="zero")


def _hvp_forward(loss, inputs, vector):
    with tf.autodiff.ForwardAccumulator(inputs, vector) as acc:
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            value = loss(*inputs)
        grads = tape.gradient(value, inputs)
    return [acc.jvp(g, unconnected_gradients="zero") for g in grads]


def _direction(inputs, seed=1):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=t.shape), t.dtype) for t in inputs]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["reverse", "forward", "forward_in_function"])
def test_hessian_vector_products_match_autodiff(name, mode):
    ours, reference, inputs, w = _setup(name)
    vector = _direction(inputs)
    hvp = _hvp_reverse if mode == "reverse" else _hvp_forward
    if mode == "forward_in_function":
        hvp = forward_mode_in(hvp, "function")
    got = hvp(weighted_loss(ours, w, False), inputs, vector)
    want = _hvp_reverse(weighted_loss(reference, w, False), inputs, vector)
    _assert_all_close(got, want, _tolerance(inputs[0].dtype))


def _jvp(fn, inputs, vector):
    with tf.autodiff.ForwardAccumulator(inputs, vector) as acc:
        y = fn(*inputs)
    return acc.jvp(y)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_forward_accumulator_jvp_matches_autodiff(name, mode):
    """Also inside a `tf.function`, where an accumulator keeps the first
    tangent it sees for a tensor: the op's own, not the stopped inputs'."""
    ours, reference, inputs, w = _setup(name)
    vector = _direction(inputs)
    got = forward_mode_in(_jvp, mode)(ours, inputs, vector)
    want = _jvp(reference, inputs, vector)
    _assert_all_close([got], [want], _tolerance(inputs[0].dtype))
    assert float(tf.reduce_max(tf.abs(want))) > 1e-3  # a zero JVP would fail


@pytest.mark.parametrize(
    "name", ["bn_closed_form", "bn_masked", "bn_statistics", "sparse_ce", "dense_ce"]
)
def test_third_derivative_along_a_direction_matches_autodiff(name):
    ours, reference, inputs, w = _setup(name)
    v = _direction(inputs)[0]

    def third(fn):
        loss = weighted_loss(fn, w, False)
        x, gamma, beta = inputs
        with tf.GradientTape() as t3:
            t3.watch(x)
            with tf.GradientTape() as t2:
                t2.watch(x)
                with tf.GradientTape() as t1:
                    t1.watch(x)
                    value = loss(x, gamma, beta)
                g = tf.reduce_sum(t1.gradient(value, x) * v)
            h = tf.reduce_sum(t2.gradient(g, x) * v)
        return t3.gradient(h, x)

    _assert_all_close([third(ours)], [third(reference)], 1e-8)


@pytest.mark.parametrize(
    "name",
    ["bn_closed_form", "bn_masked", "bn_inference", "dense_ce", "sparse_ce"],
)
def test_second_derivatives_match_finite_differences(name):
    """The Jacobian of our gradient (autodiff through the hand-written
    backward pass) against central differences of that gradient, float64.

    Not renorm: its `r` and `d` are constants by definition, which finite
    differences cannot see; the autodiff reference covers it above."""
    ours, _, (x, gamma, beta), w = _setup(name)
    loss = weighted_loss(ours, w, False)

    def gradient(x, gamma):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma])
            value = loss(x, gamma, beta)
        gx, gg = tape.gradient(value, [x, gamma])
        return tf.concat([tf.reshape(gx, [-1]), gg], 0)

    theoretical, numerical = tf.test.compute_gradient(gradient, [x, gamma], delta=1e-5)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)
        assert np.abs(n).max() > 1e-3  # the second derivatives are not all zero


def test_unused_statistics_upstream_skips_their_terms_in_a_graph():
    """A first-order gradient in a graph builds no work for the hidden output
    (`x - mean`): no op of the backward pass reads its zero upstream."""
    x = tf.random.normal([8, 3], dtype=tf.float64)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.batch_norm_train(x, epsilon=EPS, fused=False)[0]
        return tape.gradient(tf.reduce_sum(tf.sin(y)), x)

    graph = step.get_concrete_function(x).graph
    zero_fills = [
        op
        for op in graph.get_operations()
        if op.type in ("ZerosLike", "Fill") and any(o.consumers() for o in op.outputs)
    ]
    consumers = {c.type for op in zero_fills for o in op.outputs for c in o.consumers()}
    # The tape's zero upstreams feed the op's gradient call and nothing else.
    assert consumers <= {"IdentityN", "PartitionedCall", "StatefulPartitionedCall"}


@pytest.mark.parametrize("name", ["bn_closed_form", "bn_fused", "sparse_ce", "softmax"])
def test_jacobians_and_vectorized_map_keep_working(name):
    ours, reference, (x, gamma, beta), _ = _setup(name)
    tol = _tolerance(x.dtype)

    def jacobians(fn):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = fn(x, gamma, beta)
        full = tape.jacobian(y, x)
        batch = tape.batch_jacobian(y, x) if y.shape.rank == 2 else full
        return full, batch

    _assert_all_close(jacobians(ours), jacobians(reference), tol)

    def per_example_gradient(fn):
        def one(row):
            with tf.GradientTape() as tape:
                tape.watch(row)
                y = fn(
                    tf.stack([row, row * 0.5 + 1.0, -row, row + 0.3, 2.0 * row]),
                    gamma,
                    beta,
                )
                value = tf.reduce_sum(tf.square(y))
            return tape.gradient(value, row)

        return tf.vectorized_map(one, x)

    _assert_all_close(
        [per_example_gradient(ours)], [per_example_gradient(reference)], tol
    )


@pytest.mark.parametrize(
    "name",
    ["bn_closed_form", "bn_fused", "bn_masked", "dense_ce", "sparse_ce", "softmax"],
)
def test_graph_gradients_of_gradients_without_a_tape(name):
    """`tf.hessians` (graph-mode `tf.gradients`, no tape records the first
    backward pass) gives the reference Hessian."""
    ours, reference, (x, gamma, beta), w = _setup(name)

    def hessian(fn):
        loss = weighted_loss(fn, w, False)
        return tf.function(lambda x: tf.hessians(loss(x, gamma, beta), x)[0])(x)

    _assert_all_close([hessian(ours)], [hessian(reference)], _tolerance(x.dtype))
