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
from typing import NamedTuple

import tensorflow as tf

from keras_bn import _internals
from keras_bn.ops import statistics
from keras_bn.ops import sync
from keras_bn.ops.axes import broadcast_shape
from keras_bn.ops.axes import canonicalize_axes
from keras_bn.ops.axes import merge_adjacent_axes
from keras_bn.ops.axes import merged_shape
from keras_bn.ops.axes import static_rank
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_epsilon
from keras_bn.ops.checks import check_optional_bool
from keras_bn.ops.checks import check_renorm_clipping
from keras_bn.ops.checks import check_shape
from keras_bn.ops.checks import checked_at_run_time
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.dtypes import compute_dtype
from keras_bn.ops.dtypes import float_tensor
from keras_bn.ops.fused_batch_norm import fused_batch_norm_inference
from keras_bn.ops.fused_batch_norm import fused_batch_norm_train
from keras_bn.ops.fused_batch_norm import fused_unavailable_reason


def _params(x, axes, **params):
    """The given (not None) `params` as float tensors, of `x`'s feature shape."""
    params = {k: float_tensor(v, k) for k, v in params.items() if v is not None}
    expected = [x.shape[a] for a in axes]
    for name, value in params.items():
        if not value.shape.is_compatible_with(expected):
            raise ValueError(
                f"`{name}` must have shape {expected} (the sizes of the "
                f"feature axes {list(axes)} of `x`). Received: "
                f"{name}.shape={value.shape.as_list()}, x.shape={x.shape.as_list()}"
            )
    return params


def _reshape_params(params, shape, dtype):
    """`params` in `shape` and `dtype`; vectors kept as they are for `[-1]`."""
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
    """`(mask, per_feature)`: `mask` as a boolean mask broadcastable to `x` (or
    None), and whether it differs by feature (then broadcast to all of `x`)."""
    if mask is None:
        return None, False
    mask = tf.cast(mask, tf.bool)
    rank, shape = x.shape.rank, x.shape.as_list()
    if static_rank(mask, "mask") == rank:
        got = mask.shape.as_list()
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
            message = "`mask` must broadcast to the shape of the inputs"
            mask = checked_at_run_time(mask, fits, message)
        if not per_feature:
            target = tf.stack([1 if a in axes else target[a] for a in range(rank)])
        return tf.broadcast_to(mask, target), per_feature
    whose = f"the inputs without the feature axes {list(axes)}"
    received = (
        f", inputs.shape={shape} (a mask of the rank of the inputs may instead "
        "have a shape that broadcasts to theirs)"
    )
    mask = check_shape(mask, "mask", x, whose, axes, received)
    for a in axes:
        mask = tf.expand_dims(mask, a)
    return mask, False


def _renorm_correction(mean, variance, renorm, epsilon):
    """Batch Renormalization's `r` and `d`, constants as in the paper."""
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


# In a graph, below this many elements the closed form beats the fused kernels
# on CPU (docs/layer.md); eagerly they win at every size.
FUSED_MIN_ELEMENTS_IN_A_GRAPH = 2**17


def use_fused(fused, x, axes, epsilon, mask=None, renorm=False, synchronized=False):
    """`fused` (None, True or False) resolved as the layer's docstring says."""
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
        if small or _internals.in_xla_function():
            return False
    return reason is None


class Renorm(NamedTuple):
    """Batch Renormalization's moving statistics (shaped as `gamma`) and the
    optional bounds of `r` (`[rmin, rmax]`) and `d` (`[-dmax, dmax]`)."""

    mean: tf.Tensor
    stddev: tf.Tensor
    rmin: float = None
    rmax: float = None
    dmax: float = None


def normalize_with_batch_statistics(
    x, gamma, beta, axes, epsilon, mask=None, renorm=None, fused=None,
    synchronized=False,
):  # fmt: skip
    """`(y, mean, variance, count)` of `batch_norm_train` (with a `Renorm`,
    `batch_renorm_train`) on checked arguments; the layer checks them once."""
    rank = static_rank(x, "x")
    params = _params(x, axes, gamma=gamma, beta=beta)
    names = tuple(params)
    replica = sync.replica_context(synchronized)
    synced = replica is not None
    if use_fused(fused, x, axes, epsilon, mask, renorm is not None, synced):
        return fused_batch_norm_train(x, params, axes[0], epsilon)
    mask, per_feature = _prepare_mask(mask, x, axes)
    dtype = compute_dtype(x.dtype)
    # x is viewed with adjacent reduced (and feature) axes merged: `red` are
    # the view's reduced axes, `shape` a per-feature tensor's broadcast shape.
    groups = merge_adjacent_axes(rank, axes)
    view = merged_shape(x, groups)
    red = [i for i, (is_feature, _) in enumerate(groups) if not is_feature]
    shape = merged_shape(x, groups, reduced=False)
    features = [x.shape[a] for a in axes]
    features = tf.gather(tf.shape(x), axes) if None in features else features
    if mask is not None:
        mask = tf.reshape(mask, merged_shape(x, groups, features=per_feature))
    if renorm is not None:
        stats = _params(x, axes, renorm_mean=renorm.mean, renorm_stddev=renorm.stddev)
        mean, stddev = _reshape_params(stats, shape, dtype).values()
        renorm = renorm._replace(mean=mean, stddev=stddev)

    def forward(x, *values):
        """`(y, mean, variance, count)`, the hidden `x - mean` on the view, and
        saved the broadcast count, renorm's `(r, d)` and the shape of `x`."""
        p = _reshape_params(dict(zip(names, values)), shape, dtype)
        xf = tf.cast(tf.reshape(x, view), dtype)
        mean, variance, centred, count = statistics.moments(xf, red, mask)
        if synced:
            count, mean, variance = sync.combine_moments(replica, count, mean, variance)
            centred = xf - mean  # from the global mean
        inv = tf.math.rsqrt(variance + epsilon)
        gamma = p.get("gamma")
        scale = inv if gamma is None else inv * gamma
        offset = p.get("beta", tf.zeros([], dtype))
        correction = None
        if renorm is not None:
            correction = _renorm_correction(mean, variance, renorm, epsilon)
            r, d = correction
            scale = scale * r
            offset = offset + (d if gamma is None else d * gamma)
        y = centred * scale + offset
        x_shape = tf.shape(x)
        outputs = (
            tf.reshape(tf.cast(y, x.dtype), x_shape),
            tf.reshape(mean, features),
            tf.reshape(variance, features),
            # Equal for every feature (a scalar) unless the mask varies by feature.
            tf.reshape(count, features) if per_feature else tf.reduce_max(count),
        )
        return outputs, (centred,), (count, correction, x_shape)

    def backward(context, upstream, hidden_upstream):
        """The module docstring's, differentiable again. `S1` and `S2` sum over
        every position (a masked output depends on the statistics too), while
        `N`, `b`, `c` and the hidden output's `- sum(dc) / N` count only the
        unmasked ones; renorm's `r` multiplies `scale = gamma * inv`."""
        x, *values = context.inputs
        (centred,) = context.hidden
        dy, dmean, dvariance, _ = upstream  # a count has no gradient
        (dcentred,) = hidden_upstream
        count, correction, x_shape = context.saved
        safe_count = tf.maximum(count, 1.0)
        p = _reshape_params(dict(zip(names, values)), shape, dtype)
        inv = tf.math.rsqrt(tf.reshape(context.outputs[2], shape) + epsilon)
        scale = inv * p["gamma"] if "gamma" in p else inv
        if correction is not None:
            scale = scale * correction[0]
        dy = tf.cast(tf.reshape(dy, view), dtype)
        s1 = statistics.sum_over(dy, red)
        s2 = statistics.sum_over(dy * centred, red)  # sum(dy * (x - mean))
        sums = {"s1": s1, "s2": s2}
        # Gradients reaching the returned statistics, unless no loss uses them
        # (the usual case, known when the graph is built).
        if context.live(dmean, hidden=False) or context.live(dvariance, hidden=False):
            for name, g in (("dmean", dmean), ("dvariance", dvariance)):
                g = tf.zeros_like(s1) if g is None else tf.cast(g, dtype)
                sums[name] = tf.reshape(g, shape)
        if context.live(dcentred):
            dcentred = tf.cast(dcentred, dtype)
            sums["dcentred"] = statistics.sum_over(dcentred, red)
        total = sums
        if synced:
            total = dict(zip(sums, sync.sum_over_replicas(replica, *sums.values())))
        b = -scale * tf.square(inv) * total["s2"] / safe_count
        c = -scale * total["s1"] / safe_count
        if "dmean" in total:
            b += 2.0 * total["dvariance"] / safe_count
            c += total["dmean"] / safe_count
        # Only the unmasked positions move the statistics.
        dx = dy * scale + statistics.masked(centred * b + c, mask)
        if "dcentred" in total:
            dx += dcentred - statistics.masked(total["dcentred"] / safe_count, mask)
        # Per-replica contributions: the strategy sums them across replicas.
        grads = {"beta": s1, "gamma": inv * s2}
        if correction is not None:
            r, d = correction
            grads["gamma"] = r * inv * s2 + d * s1
        dx = tf.cast(tf.reshape(dx, x_shape), x.dtype)
        return (dx,) + _param_gradients(grads, names, values)

    # The backward pass reads x - mean (hidden) and the parameters, not x or y.
    reads = tuple(range(1, 1 + len(params)))
    return custom_op(
        forward, backward, x, *params.values(), first_order_reads=reads,
        first_order_output_reads=(1, 2, 3),
    )  # fmt: skip


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
            the closed form, as the layer's `fused` chooses in training; True
            raises a ValueError saying why where the kernels cannot apply.
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
    """A public op's float `x`, its sorted non-negative `axes`, and `epsilon`."""
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
            on TensorFlow's fused kernel, chosen as in `batch_norm_train`
            (with `statistics_gradients=False`, None: only for 4-D inputs).
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
    """`batch_norm_inference` on checked arguments (the layer's inference)."""
    params = _params(x, axes, mean=mean, variance=variance, gamma=gamma, beta=beta)
    if "mean" not in params or "variance" not in params:
        raise ValueError("`mean` and `variance` are required (got None).")
    if not statistics_gradients and fused is None and x.shape.rank != 4:
        # The kernel's 4-D view of other ranks survives export converters;
        # the multiply-add (one pass too) folds into the layer before.
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

    def backward(context, upstream, hidden_upstream):
        """The module docstring's, from the inputs only: differentiable again."""
        x, *values = context.inputs
        dtype = compute_dtype(x.dtype)
        red = [a for a in range(x.shape.rank) if a not in axes]
        p = _reshape_params(dict(zip(names, values)), broadcast_shape(x, axes), dtype)
        inv = tf.math.rsqrt(p["variance"] + epsilon)
        scale = inv * p["gamma"] if "gamma" in p else inv
        dy = tf.cast(upstream[0], dtype)
        s1 = statistics.sum_over(dy, red)
        s2 = statistics.sum_over(dy * (tf.cast(x, dtype) - p["mean"]), red)
        grads = {"mean": -scale * s1, "gamma": inv * s2, "beta": s1}
        grads["variance"] = -0.5 * scale * tf.square(inv) * s2
        dx = tf.cast(dy * scale, x.dtype)
        return (dx,) + _param_gradients(grads, names, values)

    return custom_op(forward, backward, x, *params.values())[0]


def _normalize_with(x, params, axes, epsilon, fused):
    """`y` on the fused kernel, or as `x * scale + offset`; plain ops."""
    if fused:
        return fused_batch_norm_inference(x, params, axes[0], epsilon)
    dtype = compute_dtype(x.dtype)
    # Vectors, kept as they are, let converters fold the multiply-add.
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
