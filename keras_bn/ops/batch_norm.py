r"""Batch normalization with hand-written backward passes.

Notation, per feature (one entry of the kept axes), over the `N` positions
that statistics are taken over (all positions, or the unmasked ones):

    mean     = sum(x) / N
    variance = sum((x - mean)^2) / N           (biased: divides by N)
    inv      = 1 / sqrt(variance + epsilon)
    x_hat    = (x - mean) * inv
    y        = gamma * x_hat + beta

Backward pass of the training form (the statistics depend on `x`). With
`S1 = sum(dy)` and `S2 = sum(dy * (x - mean))`, the chain rule through `x_hat`,
`mean` and `variance` collapses to

    dbeta  = S1
    dgamma = inv * S2
    dx     = gamma * inv * (dy - S1 / N - (x - mean) * inv^2 * S2 / N)

which is folded into per-feature coefficients, `dx = a * dy + b * (x - mean) + c`
with `a = gamma * inv`, `b = -gamma * inv^3 * S2 / N`, `c = -gamma * inv * S1 / N`.
The op also returns the batch statistics, and differentiates through them:
an upstream `dmean` adds `dmean / N` to every `dx`, and an upstream
`dvariance` adds `2 * dvariance * (x - mean) / N` (the term through `mean`
vanishes because `sum(x - mean) = 0`); both fold into `b` and `c`.

Backward pass of the inference form (`mean` and `variance` are inputs):

    dx        = gamma * inv * dy
    dmean     = -gamma * inv * S1
    dvariance = -gamma * inv^3 * S2 / 2
    dgamma    = inv * S2
    dbeta     = S1

Statistics are those of `keras_bn/ops/statistics.py`, taken on a view of `x`
with adjacent reduced axes merged (`[N, H, W, C]` as `[N * H * W, C]`).

Higher orders. The backward passes are built from differentiable ops of the
original inputs and of the op's own outputs (`variance`, and `x - mean`, the
one input-sized tensor kept, as a hidden output whose vector-Jacobian product
is `dc - sum(dc) / N`), so every order is exact (`keras_bn/ops/custom_op.py`);
renorm's `r` and `d` stay constants.
"""

import warnings
from functools import partial
from typing import NamedTuple

import tensorflow as tf

from keras_bn._internals import in_xla_function
from keras_bn.ops.axes import broadcast_shape
from keras_bn.ops.axes import canonicalize_axes
from keras_bn.ops.axes import merge_adjacent_axes
from keras_bn.ops.axes import merged_shape
from keras_bn.ops.axes import static_rank
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_epsilon
from keras_bn.ops.checks import check_optional_bool
from keras_bn.ops.checks import check_renorm_clipping
from keras_bn.ops.checks import shape_at_run_time
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.custom_op import shape_of
from keras_bn.ops.dtypes import compute_dtype
from keras_bn.ops.dtypes import float_tensor
from keras_bn.ops.fused_batch_norm import fused_batch_norm_inference
from keras_bn.ops.fused_batch_norm import fused_batch_norm_train
from keras_bn.ops.fused_batch_norm import fused_unavailable_reason
from keras_bn.ops.statistics import masked
from keras_bn.ops.statistics import moments
from keras_bn.ops.statistics import sum_over
from keras_bn.ops.sync import combine_moments
from keras_bn.ops.sync import replica_context
from keras_bn.ops.sync import sum_over_replicas


def _shapes_differ(expected, got):
    """Whether two shapes (lists, None for unknown sizes) cannot be equal."""
    return len(got) != len(expected) or any(
        e is not None and g is not None and e != g for e, g in zip(expected, got)
    )


def _params(x, axes, **params):
    """The given (not None) parameters, by name, as float tensors checked to
    have the shape of the feature axes of `x`."""
    params = {k: float_tensor(v, k) for k, v in params.items() if v is not None}
    expected = [x.shape[a] for a in axes]
    for name, value in params.items():
        got = value.shape.as_list() if value.shape.rank is not None else expected
        if _shapes_differ(expected, got):
            raise ValueError(
                f"`{name}` must have shape {expected} (the sizes of the "
                f"feature axes {list(axes)} of `x`). Received: "
                f"{name}.shape={got}, x.shape={x.shape.as_list()}"
            )
    return params


def _reshape_params(params, shape, dtype):
    """`params` in `shape` and `dtype`. For `[-1]`, vectors are kept as they
    are: eagerly, each reshape is one more op per call."""
    keep = isinstance(shape, list) and shape == [-1]
    return {
        k: tf.cast(v if keep and v.shape.rank == 1 else tf.reshape(v, shape), dtype)
        for k, v in params.items()
    }


def _param_gradients(grads, names, values):
    """`grads[name]` for each parameter, in its shape and dtype."""
    return tuple(
        tf.cast(tf.reshape(grads[name], tf.shape(v)), v.dtype)
        for name, v in zip(names, values)
    )


def _prepare_mask(mask, x, axes):
    """`(mask, per_feature)`: `mask` (as `batch_norm_train` takes it) as a
    boolean mask broadcastable to `x`, or None. `per_feature`: whether it may
    differ between features (a full-rank mask not of size 1 on every feature
    axis); it is then broadcast to the whole shape of `x`.
    """
    if mask is None:
        return None, False
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    rank, shape = x.shape.rank, x.shape.as_list()
    got = mask.shape.as_list() if mask.shape.rank is not None else None
    if mask.shape.rank == rank:
        if any(g not in (None, 1) and s not in (None, g) for g, s in zip(got, shape)):
            raise ValueError(
                "A `mask` of the rank of the inputs must broadcast to their "
                f"shape. Received: mask.shape={got}, inputs.shape={shape}"
            )
        per_feature = any(got[a] != 1 for a in axes)
        target = tf.shape(x)
        if None in got or None in shape:
            sizes = tf.shape(mask)
            fits = tf.reduce_all((sizes == 1) | (sizes == target))
            check = tf.debugging.assert_equal(
                fits, True, message="`mask` must broadcast to the shape of the inputs"
            )
            with tf.control_dependencies([check]):
                mask = tf.identity(mask)
        if not per_feature:
            target = tf.tensor_scatter_nd_update(
                target, [[a] for a in axes], tf.ones([len(axes)], target.dtype)
            )
        return tf.broadcast_to(mask, target), per_feature
    kept = [i for i in range(rank) if i not in axes]
    expected = [shape[i] for i in kept]
    message = (
        "`mask` must have the shape of the inputs with the feature axes "
        f"{list(axes)} removed"
    )
    if got is None or _shapes_differ(expected, got):
        raise ValueError(
            f"{message}, i.e. {expected}, or the rank of the inputs and a shape "
            f"that broadcasts to theirs. Received: mask.shape={got}, "
            f"inputs.shape={shape}"
        )
    if None in got or None in expected:
        sizes = tf.gather(tf.shape(x, out_type=tf.int64), kept)
        mask = shape_at_run_time(mask, sizes, message)
    for a in axes:
        mask = tf.expand_dims(mask, a)
    return mask, False


def _renorm_correction(mean, variance, renorm, epsilon):
    """Batch Renormalization's `r` and `d` (Ioffe, 2017), from the forward
    pass's stopped statistics: as in the paper, no gradient flows through
    them."""
    stddev = tf.sqrt(variance + epsilon)
    renorm_stddev = tf.maximum(renorm.stddev, tf.sqrt(tf.cast(epsilon, mean.dtype)))
    r = stddev / renorm_stddev
    d = (mean - renorm.mean) / renorm_stddev
    if renorm.rmin is not None:
        r = tf.maximum(r, renorm.rmin)
    if renorm.rmax is not None:
        r = tf.minimum(r, renorm.rmax)
    if renorm.dmax is not None:
        d = tf.clip_by_value(d, -renorm.dmax, renorm.dmax)
    return r, d


# In a graph, below this many elements the closed form is faster than the
# fused kernels on CPU (measured in docs/layer.md); eagerly they win at every
# size.
FUSED_MIN_ELEMENTS_IN_A_GRAPH = 2**17


def use_fused(fused, x, axes, epsilon, mask=None, renorm=False, synchronized=False):
    """Resolves the `fused` argument (None, True or False) to True or False,
    as the layer's docstring says (`benchmarks/run.py`, docs/performance.md)."""
    if fused is False:
        return False
    reason = fused_unavailable_reason(x, axes, epsilon, mask, renorm, synchronized)
    if fused and reason:
        raise ValueError(
            f"fused=True, but the fused kernels cannot apply because {reason}. "
            "Use fused=None (automatic) or fused=False (closed form)."
        )
    if fused is None and not tf.executing_eagerly():
        elements = x.shape.num_elements()
        small = elements is not None and elements < FUSED_MIN_ELEMENTS_IN_A_GRAPH
        if small or in_xla_function():
            return False
    return reason is None


class Renorm(NamedTuple):
    """Batch Renormalization's inputs: the moving statistics it corrects
    towards (shaped as `gamma`) and the optional clipping bounds of `r`
    (`[rmin, rmax]`) and `d` (`[-dmax, dmax]`)."""

    mean: tf.Tensor
    stddev: tf.Tensor
    rmin: float = None
    rmax: float = None
    dmax: float = None


class _Layout(NamedTuple):
    """The static layout of one training-mode call, shared by both passes."""

    view: object  # x's shape with adjacent reduced (and feature) axes merged
    red: list  # the reduced axes of the view
    shape: object  # the broadcast shape of a per-feature tensor on the view
    features: object  # the shape of a per-feature output (as `gamma`)
    mask: object  # boolean, broadcastable to the view, or None
    per_feature: bool  # whether the mask (so the count) differs by feature
    names: tuple  # the parameters given, of ("gamma", "beta")
    dtype: tf.DType  # the compute dtype
    epsilon: float
    replica: object  # the replica context to synchronize over, or None
    renorm: Renorm  # with statistics at `shape`, or None


def normalize_with_batch_statistics(
    x, gamma, beta, axes, epsilon, mask=None, renorm=None, fused=None,
    synchronized=False,
):  # fmt: skip
    """The training op on checked arguments: `(y, mean, variance, count)`.

    The core of `batch_norm_train` (`renorm=None`) and `batch_renorm_train`,
    which the layer calls with the arguments it checked once: `x` a float
    tensor, `axes` sorted and non-negative (`canonicalize_axes`), `epsilon` a
    float > 0, `fused` None, True or False, `renorm` a `Renorm` with checked
    bounds, or None. The other tensors are checked here.
    """
    rank = static_rank(x, "x")
    params = _params(x, axes, gamma=gamma, beta=beta)
    replica = replica_context(synchronized)
    sync = replica is not None
    if use_fused(fused, x, axes, epsilon, mask, renorm is not None, sync):
        return fused_batch_norm_train(x, params, axes[0], epsilon)
    mask, per_feature = _prepare_mask(mask, x, axes)
    dtype = compute_dtype(x.dtype)
    groups = merge_adjacent_axes(rank, axes)
    shape = merged_shape(x, groups, reduced=False)
    if mask is not None:
        mask = tf.reshape(mask, merged_shape(x, groups, features=per_feature))
    if renorm is not None:
        stats = _params(x, axes, renorm_mean=renorm.mean, renorm_stddev=renorm.stddev)
        mean, stddev = _reshape_params(stats, shape, dtype).values()
        renorm = renorm._replace(mean=mean, stddev=stddev)
    features = [x.shape[a] for a in axes]
    layout = _Layout(
        view=merged_shape(x, groups),
        red=[i for i, (is_feature, _) in enumerate(groups) if not is_feature],
        shape=shape,
        features=tf.gather(tf.shape(x), axes) if None in features else features,
        mask=mask,
        per_feature=per_feature,
        names=tuple(params),
        dtype=dtype,
        epsilon=epsilon,
        replica=replica,
        renorm=renorm,
    )
    forward = partial(_train_forward, layout)
    backward = partial(_train_backward, layout)
    # The backward pass reads x - mean (hidden) and the parameters, not x or y.
    reads = tuple(range(1, 1 + len(params)))
    return custom_op(
        forward, backward, x, *params.values(), first_order_reads=reads,
        first_order_output_reads=(1, 2, 3),
    )  # fmt: skip


def _train_forward(layout, x, *values):
    """The training forward pass for `custom_op`: outputs `(y, mean,
    variance, count)`, the hidden `x - mean` on the view (the one input-sized
    tensor the backward pass keeps), and saved the count at broadcast shape
    and renorm's constant `(r, d)`."""
    p = _reshape_params(dict(zip(layout.names, values)), layout.shape, layout.dtype)
    xf = tf.cast(tf.reshape(x, layout.view), layout.dtype)
    mean, variance, centred, count = moments(xf, layout.red, layout.mask)
    if layout.replica is not None:
        count, mean, variance = combine_moments(layout.replica, count, mean, variance)
        centred = xf - mean  # from the global mean
    inv = tf.math.rsqrt(variance + layout.epsilon)
    gamma = p.get("gamma")
    scale = inv if gamma is None else inv * gamma
    offset = p.get("beta", tf.zeros([], layout.dtype))
    correction = None
    if layout.renorm is not None:
        correction = _renorm_correction(mean, variance, layout.renorm, layout.epsilon)
        r, d = correction
        scale = scale * r
        offset = offset + (d if gamma is None else d * gamma)
    y = centred * scale + offset
    features = layout.features
    outputs = (
        tf.reshape(tf.cast(y, x.dtype), tf.shape(x)),
        tf.reshape(mean, features),
        tf.reshape(variance, features),
        # Equal for every feature (a scalar) unless the mask varies by feature.
        tf.reshape(count, features) if layout.per_feature else tf.reduce_max(count),
    )
    return outputs, (centred,), (count, correction)


def _train_backward(layout, context, upstream, hidden_upstream):
    """The training backward pass of the module docstring, built to be
    differentiated again. `S1` and `S2` sum over every position (a masked
    output depends on the statistics too), while `N`, `b`, `c` and the hidden
    output's `- sum(dc) / N` count only the unmasked ones; renorm's `r`
    multiplies `scale = gamma * inv` (`batch_renorm_train`)."""
    x, *values = context.inputs
    (centred,) = context.hidden
    dy, dmean, dvariance, _ = upstream  # a count has no gradient
    (dcentred,) = hidden_upstream
    count, correction = context.saved
    mask, red, shape, dtype = layout.mask, layout.red, layout.shape, layout.dtype
    safe_count = tf.maximum(count, 1.0)
    p = _reshape_params(dict(zip(layout.names, values)), shape, dtype)
    inv = tf.math.rsqrt(tf.reshape(context.outputs[2], shape) + layout.epsilon)
    scale = inv * p["gamma"] if "gamma" in p else inv
    if correction is not None:
        scale = scale * correction[0]
    dy = tf.cast(tf.reshape(dy, layout.view), dtype)
    s1 = sum_over(dy, red)
    s2 = sum_over(dy * centred, red)  # sum(dy * (x - mean))
    sums = {"s1": s1, "s2": s2}
    # Gradients reaching the returned statistics, unless no loss uses them
    # (the usual case, known when the graph is built).
    if context.live(dmean, hidden=False) or context.live(dvariance, hidden=False):
        sums["dmean"] = _upstream(dmean, s1, shape)
        sums["dvariance"] = _upstream(dvariance, s1, shape)
    if context.live(dcentred):
        dcentred = tf.cast(dcentred, dtype)
        sums["dcentred"] = sum_over(dcentred, red)
    total = sums
    if layout.replica is not None:
        total = dict(zip(sums, sum_over_replicas(layout.replica, *sums.values())))
    b = -scale * tf.square(inv) * total["s2"] / safe_count
    c = -scale * total["s1"] / safe_count
    if "dmean" in total:
        b += 2.0 * total["dvariance"] / safe_count
        c += total["dmean"] / safe_count
    # Only the unmasked positions move the statistics.
    dx = dy * scale + masked(centred * b + c, mask)
    if "dcentred" in total:
        dx += dcentred - masked(total["dcentred"] / safe_count, mask)
    # Per-replica contributions: the strategy sums them across replicas.
    grads = {"beta": s1, "gamma": inv * s2}
    if correction is not None:
        r, d = correction
        grads["gamma"] = r * inv * s2 + d * s1
    dx = tf.cast(tf.reshape(dx, shape_of(x)), x.dtype)
    return (dx,) + _param_gradients(grads, layout.names, values)


def _upstream(gradient, like, shape):
    """An upstream statistic gradient at broadcast shape (zeros when None)."""
    if gradient is None:
        return tf.zeros_like(like)
    return tf.reshape(tf.cast(gradient, like.dtype), shape)


def batch_norm_train(
    x,
    gamma=None,
    beta=None,
    axis=-1,
    epsilon=1e-3,
    mask=None,
    fused=None,
    synchronized=False,
    return_count=False,
):
    r"""Batch normalization in training mode: normalizes with batch statistics.

    `y = gamma * (x - mean) / sqrt(variance + epsilon) + beta`, where `mean`
    and `variance` are taken over every axis except `axis`, and `variance` is
    the biased variance `sum((x - mean)^2) / N`. The backward pass is written
    out in this module's docstring; it differentiates through all three
    outputs, so a loss that uses the returned statistics gets exact gradients.

    Args:
        x: Float tensor of known rank.
        gamma: Optional scale, shaped as the feature axes of `x` (a vector for
            one feature axis). None means 1.
        beta: Optional offset, same shape as `gamma`. None means 0.
        axis: The feature axis, or a list/tuple of them: the axes that are
            kept. Statistics are reduced over all the others.
        epsilon: Positive float added to the variance.
        mask: Optional boolean tensor shaped as `x` without its feature
            axes, or of the rank of `x` with a shape that broadcasts to it
            (which may then differ between features). False positions are
            left out of the statistics (not of the outputs and gradients); a
            fully masked batch, or feature, gives mean and variance 0, not NaN.
        fused: None (automatic), True or False: TensorFlow's fused kernels or
            the closed form, as the layer's `fused` argument chooses in
            training; True raises a ValueError that says why where the
            kernels cannot apply.
        synchronized: If True, in a replica context of a `tf.distribute`
            strategy with several replicas: the statistics and `dx` of the
            global batch (`keras_bn.ops.sync`); `dgamma`/`dbeta` are this
            replica's contributions, which the strategy sums.
        return_count: If True, also return the number of positions `N` the
            statistics were taken over (global when synchronized), in the
            statistics' dtype: a scalar, or shaped as `gamma` for a mask that
            differs between features.

    Returns:
        A tuple `(y, batch_mean, batch_variance)`, and `count` last with
        `return_count=True`: `y` has the shape and dtype of `x`; the
        statistics are shaped as `gamma`, in float32 for float16/bfloat16
        inputs and in `x`'s dtype otherwise.

    Example:

    >>> x = tf.random.normal([32, 8])
    >>> y, mean, variance = batch_norm_train(x, tf.ones([8]), tf.zeros([8]))
    >>> y.shape, mean.shape
    (TensorShape([32, 8]), TensorShape([8]))
    """
    fused = check_optional_bool(fused, "fused")
    x, axes, epsilon = _checked(x, axis, epsilon)
    outputs = normalize_with_batch_statistics(
        x, gamma, beta, axes, epsilon, mask, fused=fused,
        synchronized=check_bool(synchronized, "synchronized"),
    )  # fmt: skip
    return outputs if return_count else outputs[:3]


def batch_renorm_train(
    x,
    gamma,
    beta,
    renorm_mean,
    renorm_stddev,
    axis=-1,
    epsilon=1e-3,
    rmin=None,
    rmax=None,
    dmax=None,
    mask=None,
    synchronized=False,
    return_count=False,
):
    r"""Batch Renormalization (Ioffe, 2017) in training mode.

    `y = gamma * (x_hat * r + d) + beta` with `x_hat` normalized by the batch
    statistics, `r = stddev / renorm_stddev` clipped to `[rmin, rmax]` and
    `d = (mean - renorm_mean) / renorm_stddev` clipped to `[-dmax, dmax]`,
    where `stddev = sqrt(variance + epsilon)` and `renorm_stddev` is floored at
    `sqrt(epsilon)`. As in the paper, `r` and `d` are constants under
    differentiation: the backward pass is that of `batch_norm_train` with the
    effective scale `gamma * r`, plus `dgamma = r * inv * S2 + d * S1`;
    `renorm_mean` and `renorm_stddev` receive no gradient.

    Args:
        x, gamma, beta, axis, epsilon, mask, synchronized, return_count: As
            in `batch_norm_train`.
        renorm_mean: Moving mean used for the correction, shaped as `gamma`.
        renorm_stddev: Moving standard deviation, shaped as `gamma`.
        rmin, rmax, dmax: Optional clipping bounds (None: unclipped).

    Returns:
        A tuple `(y, batch_mean, batch_variance)` as in `batch_norm_train`.

    Example:

    >>> x = tf.random.normal([32, 8])
    >>> y, mean, variance = batch_renorm_train(
    ...     x, None, None, tf.zeros([8]), tf.ones([8]), rmax=3.0, dmax=5.0)
    >>> y.shape
    TensorShape([32, 8])
    """
    clip = check_renorm_clipping({"rmin": rmin, "rmax": rmax, "dmax": dmax})
    x, axes, epsilon = _checked(x, axis, epsilon)
    outputs = normalize_with_batch_statistics(
        x, gamma, beta, axes, epsilon, mask,
        Renorm(renorm_mean, renorm_stddev, **clip), fused=False,
        synchronized=check_bool(synchronized, "synchronized"),
    )  # fmt: skip
    return outputs if return_count else outputs[:3]


def _checked(x, axis, epsilon):
    """`(x, axes, epsilon)` of a public op: a float tensor, its sorted
    non-negative feature axes and a float > 0."""
    x = float_tensor(x, "x")
    return x, canonicalize_axes(axis, static_rank(x, "x")), check_epsilon(epsilon)


def batch_norm_inference(
    x,
    mean,
    variance,
    gamma=None,
    beta=None,
    axis=-1,
    epsilon=1e-3,
    fused=None,
    statistics_gradients=True,
):
    r"""Batch normalization with given statistics (inference mode).

    `y = gamma * (x - mean) / sqrt(variance + epsilon) + beta`, computed as
    `x * scale + offset` with per-feature `scale = gamma / sqrt(variance +
    epsilon)` and `offset = beta - mean * scale`. Gradients flow to `x`,
    `gamma` and `beta`, and with `statistics_gradients=True` to `mean` and
    `variance` (formulas in this module's docstring).

    Args:
        x: Float tensor of known rank.
        mean: Per-feature mean, shaped as the feature axes of `x`.
        variance: Per-feature variance, same shape as `mean`.
        gamma: Optional scale (None means 1), same shape as `mean`.
        beta: Optional offset (None means 0), same shape as `mean`.
        axis: The feature axis, or a list/tuple of them.
        epsilon: Positive float added to the variance.
        fused: None (automatic), True or False: whether the forward pass runs
            on TensorFlow's fused kernel, chosen as in `batch_norm_train`;
            with `statistics_gradients=False`, None takes it for 4-D inputs
            only.
        statistics_gradients: True: a hand-written backward pass
            differentiates with respect to every input. False (the layer's
            path): `mean` and `variance` are constants and the op holds only
            ops with registered gradients, so exported graphs hold no
            custom-gradient op and, with `fused=None`, Keras's ops.

    Returns:
        `y`, with the shape and dtype of `x`.

    Example:

    >>> x = tf.random.normal([4, 3])
    >>> y = batch_norm_inference(x, tf.zeros([3]), tf.ones([3]), epsilon=1e-3)
    >>> y.shape
    TensorShape([4, 3])
    """
    fused = check_optional_bool(fused, "fused")
    gradients = check_bool(statistics_gradients, "statistics_gradients")
    x, axes, epsilon = _checked(x, axis, epsilon)
    return normalize_with_given_statistics(
        x, mean, variance, gamma, beta, axes, epsilon, fused, gradients
    )


def normalize_with_given_statistics(
    x, mean, variance, gamma, beta, axes, epsilon, fused=None,
    statistics_gradients=True,
):  # fmt: skip
    """`batch_norm_inference` on checked arguments (as in
    `normalize_with_batch_statistics`); the layer's inference path with
    `statistics_gradients=False`."""
    params = _params(x, axes, mean=mean, variance=variance, gamma=gamma, beta=beta)
    if "mean" not in params or "variance" not in params:
        raise ValueError("`mean` and `variance` are required (got None).")
    if not statistics_gradients and fused is None and x.shape.rank != 4:
        # The kernel would view other ranks as 4-D (ExpandDims/Squeeze),
        # which export converters keep; the multiply-add folds into the
        # layer before as Keras's does, and costs one pass as the kernel.
        fused = False
    fused = use_fused(fused, x, axes, epsilon)
    if not statistics_gradients:
        for name in ("mean", "variance"):
            params[name] = tf.stop_gradient(params[name])
        return _normalize_with(x, params, axes, epsilon, fused)
    names = tuple(params)

    def forward(x, *values):
        y = _normalize_with(x, dict(zip(names, values)), axes, epsilon, fused)
        return (y,), (), None

    backward = partial(_inference_backward, names, axes, epsilon)
    return custom_op(forward, backward, x, *params.values())[0]


def _inference_backward(names, axes, epsilon, context, upstream, hidden_upstream):
    """The inference backward pass (module docstring), from the original
    inputs only, so it differentiates again to every order."""
    x, *values = context.inputs
    dtype = compute_dtype(x.dtype)
    red = [a for a in range(x.shape.rank) if a not in axes]
    p = _reshape_params(dict(zip(names, values)), broadcast_shape(x, axes), dtype)
    inv = tf.math.rsqrt(p["variance"] + epsilon)
    scale = inv * p["gamma"] if "gamma" in p else inv
    dy = tf.cast(upstream[0], dtype)
    s1 = sum_over(dy, red)
    s2 = sum_over(dy * (tf.cast(x, dtype) - p["mean"]), red)
    grads = {"mean": -scale * s1, "gamma": inv * s2, "beta": s1}
    grads["variance"] = -0.5 * scale * tf.square(inv) * s2
    return (tf.cast(dy * scale, x.dtype),) + _param_gradients(grads, names, values)


def _normalize_with(x, params, axes, epsilon, fused):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta`, given statistics:
    the fused kernel (one pass over `x`), or `x * scale + offset` with
    per-feature `scale` and `offset`; plain ops either way."""
    if fused:
        return fused_batch_norm_inference(x, params, axes[0], epsilon)
    dtype = compute_dtype(x.dtype)
    # Vectors broadcast along the last axis as they are: an export converter
    # then folds the multiply-add into the layer before, as it does Keras's.
    last = list(axes) == [x.shape.rank - 1]
    p = _reshape_params(params, [-1] if last else broadcast_shape(x, axes), dtype)
    scale = tf.math.rsqrt(p["variance"] + epsilon)
    if "gamma" in p:
        scale *= p["gamma"]
    offset = -p["mean"] * scale
    if "beta" in p:
        offset += p["beta"]
    return tf.cast(tf.cast(x, dtype) * scale + offset, x.dtype)


def batch_norm_apply(
    x, mean, variance, gamma=None, beta=None, axis=-1, epsilon=1e-3, fused=None
):
    """Deprecated: `batch_norm_inference(..., statistics_gradients=False)`.

    Args:
        x, mean, variance, gamma, beta, axis, epsilon, fused: As in
            `batch_norm_inference`.

    Returns:
        `y`, with the shape and dtype of `x`.
    """
    warnings.warn(
        "`batch_norm_apply` is deprecated: use `batch_norm_inference(..., "
        "statistics_gradients=False)`.",
        DeprecationWarning,
        stacklevel=2,
    )
    return batch_norm_inference(
        x, mean, variance, gamma, beta, axis, epsilon, fused, False
    )
