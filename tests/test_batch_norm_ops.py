"""keras_bn.ops batch norm: values vs NumPy, gradients vs finite differences
and autodiff, dtypes, accuracy, errors, XLA."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import autodiff_batch_norm_train
from helpers import float32_mean_tolerance
from helpers import numpy_batch_norm_train
from helpers import param_shape
from helpers import random_loss_weights
from helpers import random_mask

from keras_bn.ops import batch_norm_inference
from keras_bn.ops import batch_norm_train
from keras_bn.ops import batch_renorm_train

EPS = 1e-3

# (input shape, axis): ranks 2 to 5, channels last and first, list axes.
LAYOUTS = [
    ((6, 3), -1),
    ((4, 3, 2), -1),
    ((4, 3, 2), 1),
    ((3, 3, 4, 2), -1),
    ((3, 2, 3, 4), 1),
    ((3, 2, 3, 2), [1, 3]),
    ((2, 3, 2, 2, 2), -1),
    ((2, 2, 3, 2, 2), [1, -2]),
]


def _inputs(rng, shape, axis, dtype=np.float64):
    pshape = param_shape(shape, axis)
    x = rng.normal(0.5, 2.0, size=shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, size=pshape).astype(dtype)
    beta = rng.normal(size=pshape).astype(dtype)
    return x, gamma, beta


def _mask_weight(mask, shape, axis):
    """1.0 at unmasked positions of `x`, 0.0 at masked ones (None: no mask)."""
    if mask is None:
        return None
    axes = [a % len(shape) for a in np.atleast_1d(axis)]
    return tf.constant(np.broadcast_to(np.expand_dims(mask, axes), shape), tf.float64)


def _scalar_loss(fn, weights, mask_weight=None):
    """A loss that uses all three outputs, so every upstream gradient is live."""
    wy, wm, wv = weights

    def loss(x, *params):
        y, mean, var = fn(x, *params)
        if mask_weight is not None:
            y = y * mask_weight
        return (
            tf.reduce_sum(wy * y * y)
            + tf.reduce_sum(wm * mean)
            + tf.reduce_sum(wv * var)
        )

    return loss


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_train_forward_matches_numpy(rng, shape, axis, center, scale):
    x, gamma, beta = _inputs(rng, shape, axis, np.float32)
    gamma = gamma if scale else None
    beta = beta if center else None
    y, mean, var = batch_norm_train(x, gamma, beta, axis=axis, epsilon=EPS)
    y_ref, mean_ref, var_ref = numpy_batch_norm_train(x, gamma, beta, axis, EPS)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_train_gradients_match_finite_differences(rng, shape, axis, masked):
    x, gamma, beta = _inputs(rng, shape, axis)
    mask = random_mask(rng, shape, axis) if masked else None
    # With a mask, the loss reads only unmasked outputs (masked ones are padding).
    mask_weight = _mask_weight(mask, shape, axis)
    loss = _scalar_loss(
        lambda x, g, b: batch_norm_train(x, g, b, axis=axis, epsilon=EPS, mask=mask),
        random_loss_weights(rng, shape, axis),
        mask_weight,
    )
    theoretical, numerical = tf.test.compute_gradient(
        loss, [tf.constant(v) for v in (x, gamma, beta)], delta=1e-6
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)
    if masked:
        dx = tf.reshape(theoretical[0], shape).numpy()
        assert np.all(dx[~np.broadcast_to(mask_weight.numpy() > 0, shape)] == 0)


@pytest.mark.parametrize("shape,axis", LAYOUTS[::2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_train_gradients_match_autodiff(rng, shape, axis, masked, center, scale):
    x, gamma, beta = (tf.constant(v) for v in _inputs(rng, shape, axis))
    gamma = gamma if scale else None
    beta = beta if center else None
    mask = random_mask(rng, shape, axis) if masked else None
    weights = random_loss_weights(rng, shape, axis)
    params = [p for p in (gamma, beta) if p is not None]

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, *params])
            loss = _scalar_loss(
                lambda x: fn(x, gamma, beta, axis, EPS, mask=mask), weights
            )(x)
        return tape.gradient(loss, [x, *params])

    ours = grads(
        lambda x, g, b, axis, eps, mask: batch_norm_train(
            x, g, b, axis=axis, epsilon=eps, mask=mask
        )
    )
    reference = grads(autodiff_batch_norm_train)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((3, 2, 3, 4), 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_renorm_gradients_match_autodiff_and_finite_differences(
    rng, shape, axis, masked
):
    x, gamma, beta = (tf.constant(v) for v in _inputs(rng, shape, axis))
    pshape = param_shape(shape, axis)
    renorm_mean = tf.constant(rng.normal(size=pshape))
    renorm_stddev = tf.constant(rng.uniform(0.5, 3.0, size=pshape))
    clip = (0.8, 1.2, 0.5)  # active: r and d are clipped for some channels
    mask = random_mask(rng, shape, axis) if masked else None
    weights = random_loss_weights(rng, shape, axis)

    def ours(x, g, b):
        return batch_renorm_train(
            x, g, b, renorm_mean, renorm_stddev, axis=axis, epsilon=EPS,
            rmin=clip[0], rmax=clip[1], dmax=clip[2], mask=mask,
        )  # fmt: skip

    def reference(x, g, b):
        return autodiff_batch_norm_train(
            x, g, b, axis, EPS, mask, (renorm_mean, renorm_stddev), clip
        )

    for fn in (ours, reference):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            loss = _scalar_loss(fn, weights)(x, gamma, beta)
        if fn is ours:
            got = tape.gradient(loss, [x, gamma, beta])
            y_ours = fn(x, gamma, beta)[0]
        else:
            want = tape.gradient(loss, [x, gamma, beta])
            np.testing.assert_allclose(y_ours, fn(x, gamma, beta)[0], atol=1e-12)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)

    # r and d are constants: finite differences through gamma and beta only
    # (x moves r and d, which the paper's gradient deliberately ignores).
    theoretical, numerical = tf.test.compute_gradient(
        lambda g, b: _scalar_loss(ours, weights, _mask_weight(mask, shape, axis))(
            x, g, b
        ),
        [gamma, beta],
        delta=1e-6,
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", LAYOUTS[::2])
@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_inference_values_and_gradients(rng, shape, axis, center, scale):
    x, gamma, beta = _inputs(rng, shape, axis)
    pshape = param_shape(shape, axis)
    mean = rng.normal(size=pshape)
    var = rng.uniform(0.5, 2.0, size=pshape)
    gamma = gamma if scale else None
    beta = beta if center else None
    y = batch_norm_inference(x, mean, var, gamma, beta, axis=axis, epsilon=EPS)
    rank = len(shape)
    axes = sorted(a % rank for a in np.atleast_1d(axis))
    bshape = [shape[i] if i in axes else 1 for i in range(rank)]
    r = lambda v: None if v is None else np.reshape(v, bshape)  # noqa: E731
    expected = tf.nn.batch_normalization(
        x, r(mean), r(var), r(beta), r(gamma), variance_epsilon=EPS
    )
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)

    wy = tf.constant(rng.normal(size=shape))
    params = [v for v in (mean, var, gamma, beta) if v is not None]
    names = [n for n, v in zip("mvgb", (mean, var, gamma, beta)) if v is not None]

    def loss(x, *values):
        kw = dict(zip(names, values))
        out = batch_norm_inference(
            x, kw["m"], kw["v"], kw.get("g"), kw.get("b"), axis=axis, epsilon=EPS
        )
        return tf.reduce_sum(wy * out * out)

    theoretical, numerical = tf.test.compute_gradient(
        loss, [tf.constant(x)] + [tf.constant(v) for v in params], delta=1e-6
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_is_computed_in_float32(rng, dtype):
    x = rng.normal(3.0, 2.0, size=(64, 5)).astype(np.float32)
    x_low = tf.cast(x, dtype)
    gamma = tf.ones([5])
    y, mean, var = batch_norm_train(x_low, gamma, tf.zeros([5]))
    assert y.dtype == dtype
    assert mean.dtype == tf.float32 and var.dtype == tf.float32
    y32, mean32, var32 = batch_norm_train(tf.cast(x_low, tf.float32), gamma, None)
    np.testing.assert_allclose(mean, mean32, rtol=1e-6)
    np.testing.assert_allclose(var, var32, rtol=1e-6)
    as_float = lambda t: tf.cast(t, tf.float32)  # noqa: E731
    np.testing.assert_allclose(as_float(y), as_float(tf.cast(y32, dtype)))
    with tf.GradientTape() as tape:
        tape.watch([x_low, gamma])
        y, _, _ = batch_norm_train(x_low, gamma, None)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 3)
    dx, dgamma = tape.gradient(loss, [x_low, gamma])
    assert dx.dtype == dtype and dgamma.dtype == tf.float32
    assert np.all(np.isfinite(tf.cast(dx, tf.float32)))


def test_float16_inputs_whose_squares_overflow(rng):
    x = tf.constant(rng.normal(1000.0, 400.0, size=(256, 4)), tf.float16)
    y, mean, var = batch_norm_train(x, None, None)
    y = tf.cast(y, tf.float32).numpy()
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-2)
    np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-2)


def test_float64_stays_float64(rng):
    x = rng.normal(size=(8, 3))
    y, mean, var = batch_norm_train(x, np.ones(3), np.zeros(3))
    assert y.dtype == mean.dtype == var.dtype == tf.float64


def test_large_mean_keeps_accurate_statistics(rng):
    x64 = 1e4 + rng.normal(size=(4096, 8))
    x = x64.astype(np.float32)
    _, mean, var = batch_norm_train(x, None, None, fused=False)
    # Reference: the exact statistics of the float32 values themselves.
    exact = x.astype(np.float64)
    atol = float32_mean_tolerance(exact)
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=0, atol=atol)
    np.testing.assert_allclose(var, exact.var(axis=0), rtol=1e-3)
    # A naive single-pass E[x^2] - E[x]^2 in float32 has no correct digit here.
    naive = np.mean(x**2, axis=0, dtype=np.float32) - np.mean(x, axis=0) ** 2
    assert np.max(np.abs(naive - exact.var(axis=0))) > 1.0


def test_fused_statistics_error_at_large_mean_is_bounded(rng):
    """The fused kernels' one-pass mean is less exact; its error stays small."""
    x = (1e4 + rng.normal(size=(4096, 8))).astype(np.float32)
    exact = x.astype(np.float64)
    _, mean, var = batch_norm_train(x, None, None, fused=True)
    assert np.max(np.abs(mean - exact.mean(axis=0))) < 0.05  # in std units
    np.testing.assert_allclose(var, exact.var(axis=0), rtol=1e-2)


def test_constant_channel_gives_zero_variance_and_finite_gradients():
    x = tf.constant(np.full((16, 2), 7.0, np.float32))
    gamma, beta = tf.constant([2.0, 3.0]), tf.constant([0.5, -1.0])
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y, mean, var = batch_norm_train(x, gamma, beta)
        loss = tf.reduce_sum(y * tf.range(32, dtype=tf.float32)[:16, None])
    np.testing.assert_array_equal(var, [0.0, 0.0])
    np.testing.assert_allclose(y, np.broadcast_to([0.5, -1.0], (16, 2)))
    for g in tape.gradient(loss, [x, gamma, beta]):
        assert np.all(np.isfinite(g))


def test_fully_masked_batch_gives_no_nan(rng):
    x = tf.constant(rng.normal(size=(4, 5, 3)), tf.float32)
    mask = tf.zeros([4, 5], tf.bool)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, mean, var = batch_norm_train(x, tf.ones([3]), tf.zeros([3]), mask=mask)
        loss = tf.reduce_sum(y)
    dx = tape.gradient(loss, x)
    # Normalized by mean 0 and variance 0; dx is that map's derivative.
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(dx, 1 / np.sqrt(1e-3), rtol=1e-6)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 0.0)


def test_empty_batch_gives_empty_output_and_no_nan():
    x = tf.zeros([0, 3])
    y, mean, var = batch_norm_train(x, tf.ones([3]), tf.zeros([3]))
    assert y.shape == (0, 3)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))


@pytest.mark.parametrize("padding", [0.0, 1e6])
def test_statistics_stay_exact_with_a_masked_out_first_position(rng, padding):
    """Front padding (masked out) must not become the shift of the statistics."""
    x = (1e4 + rng.normal(size=(65536, 4))).astype(np.float32)
    x[:3] = padding
    mask = np.ones(65536, bool)
    mask[:3] = False
    _, mean, var = batch_norm_train(x, None, None, mask=mask)
    kept = x[3:].astype(np.float64)
    atol = float32_mean_tolerance(kept)
    np.testing.assert_allclose(mean, kept.mean(axis=0), rtol=0, atol=atol)
    np.testing.assert_allclose(var, kept.var(axis=0), rtol=1e-3)


@pytest.mark.parametrize("first,bound", [(1e4, 1e-6), (-3e3, 1e-4), (1e6, 2e-3)])
def test_statistics_stay_accurate_whatever_the_first_example(rng, first, bound):
    """The first position is the shift; an outlier there costs little.

    A sample lies at most sqrt(N) standard deviations of the batch from its
    mean, so the shifted sums stay within that many deviations of zero and
    the error of the mean, in the batch's standard deviations (the scale the
    output is normalized by), stays small whatever the data: about 1e-3 with
    a first example at 1e6 among 1e4 + N(0, 1), whose standard deviation it
    raises to 2.2e4.
    """
    x64 = 1e4 + rng.normal(size=(2048, 4))
    x64[0] = first  # an outlier at the position the statistics shift by
    x = x64.astype(np.float32)
    exact = x.astype(np.float64)
    _, mean, var = batch_norm_train(x, None, None, fused=False)
    std = exact.std(axis=0)
    assert np.max(np.abs(mean - exact.mean(axis=0)) / std) < bound
    np.testing.assert_allclose(var, exact.var(axis=0), rtol=1e-4)


@pytest.mark.parametrize(
    "shape,axis", [((4, 5, 6, 3), -1), ((4, 3, 5, 6), 1), ((2, 4, 3, 5, 2), [1, 2])]
)
@pytest.mark.parametrize("masked", [False, True])
def test_unknown_dimensions_match_known_ones(rng, shape, axis, masked):
    """The merged view of `x` also works when sizes are only known at run time."""
    x, gamma, beta = (tf.constant(v) for v in _inputs(rng, shape, axis, np.float32))
    mask = tf.constant(random_mask(rng, shape, axis)) if masked else None

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, mean, var = batch_norm_train(
                x, gamma, beta, axis=axis, mask=mask, fused=False
            )
            loss = tf.reduce_sum(y**3) + tf.reduce_sum(mean * var)
        return [y, mean, var, tape.gradient(loss, x)]

    spec = tf.TensorSpec([None] * len(shape), tf.float32)
    dynamic = tf.function(step, input_signature=[spec])
    assert dynamic.get_concrete_function().outputs[1].shape.rank == len(gamma.shape)
    for a, b in zip(dynamic(x), step(x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_forward_and_backward_match_eager(rng, jit_compile):
    inputs = _inputs(rng, (4, 3, 3, 5), -1, np.float32)
    x, gamma, beta = (tf.constant(v) for v in inputs)
    mask = tf.constant(random_mask(rng, (4, 3, 3, 5), -1))

    def step(x, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, var = batch_norm_train(x, gamma, beta, mask=mask)
            y2 = batch_norm_inference(x, mean, var, gamma, beta)
            loss = tf.reduce_sum(y**3) + tf.reduce_sum(y2**2)
        return [y, mean, var, *tape.gradient(loss, [x, gamma, beta])]

    compiled = tf.function(step, jit_compile=jit_compile)
    for a, b in zip(compiled(x, gamma, beta), step(x, gamma, beta)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"axis": 2}, ValueError, r"`axis` has an axis 2 out of range"),
        ({"axis": -3}, ValueError, r"`axis` has an axis -3 out of range"),
        ({"axis": [1, -1]}, ValueError, r"`axis` repeats an axis"),
        ({"axis": [0, 1]}, ValueError, r"`axis` keeps every axis"),
        ({"axis": 1.5j}, TypeError, r"`axis` must be an int"),
        ({"epsilon": 0.0}, ValueError, r"`epsilon` must be > 0"),
        ({"gamma": np.ones(4, np.float32)}, ValueError, r"`gamma` must have shape"),
        ({"mask": np.ones((3,), bool)}, ValueError, r"`mask` must have the shape"),
        ({"mask": np.ones((5, 3), bool)}, ValueError, r"`mask` of the rank .* broad"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    args = {"x": np.ones((4, 3), np.float32), "gamma": None, "beta": None}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        batch_norm_train(**args)


def test_rank_too_small_and_integer_inputs_raise():
    with pytest.raises(ValueError, match=r"Inputs need a rank of at least 2"):
        batch_norm_train(np.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"`x` must be a floating-point tensor"):
        batch_norm_train(np.ones((2, 3), np.int32))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((3, 3, 4, 2), 1)])
def test_inference_without_statistics_gradients_matches_the_hand_written_op(
    rng, fused, shape, axis
):
    """The layer's inference path (no custom gradient) equals the op."""
    pshape = param_shape(shape, axis)
    x = tf.constant(rng.normal(0.5, 2.0, size=shape), tf.float32)
    mean, var, gamma, beta = (
        tf.constant(v, tf.float32)
        for v in (
            rng.normal(size=pshape),
            rng.uniform(0.5, 2.0, size=pshape),
            rng.uniform(0.5, 1.5, size=pshape),
            rng.normal(size=pshape),
        )
    )
    wy = tf.constant(rng.normal(size=shape), tf.float32)
    results = []

    def inference(x, gradients):
        return batch_norm_inference(
            x, mean, var, gamma, beta, axis, fused=fused, statistics_gradients=gradients
        )

    for gradients in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([x, mean, var, gamma, beta])
            y = inference(x, gradients)
            loss = tf.reduce_sum(wy * y * y)
        results.append([y, *tape.gradient(loss, [x, gamma, beta, mean, var])])
    for a, b in zip(results[0][:4], results[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert results[0][4:] == [None, None]  # constants
    assert [g is not None for g in results[1][4:]] == [True, True]
    graph = tf.function(lambda x: inference(x, False)).get_concrete_function(x).graph
    assert not [op for op in graph.get_operations() if op.type == "IdentityN"]


def test_batch_norm_apply_is_a_deprecated_alias(rng):
    from keras_bn.ops import batch_norm_apply

    x = tf.constant(rng.normal(size=(6, 3)), tf.float32)
    mean, var = tf.constant([0.1, 0.2, 0.3]), tf.constant([1.0, 2.0, 0.5])
    with pytest.warns(DeprecationWarning, match="statistics_gradients=False"):
        y = batch_norm_apply(x, mean, var, epsilon=1e-2)
    want = batch_norm_inference(x, mean, var, epsilon=1e-2, statistics_gradients=False)
    np.testing.assert_array_equal(y, want)
