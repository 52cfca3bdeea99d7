r"""Softmax cross-entropy with hand-written backward passes.

Notation, per example (one slice along the class axis, `C` classes), with
`m = max(x)`, `z = x - m` and `lse = log(sum_j exp(z_j))` computed once:

    -log p_c = lse - z_c                    (p = softmax(x))
    loss     = sum_c t_c (lse - z_c)        (t: the target distribution)

Label smoothing replaces the labels `l` by `t = (1 - s) l + s / C`, with `C`
the size of the class axis.

Backward pass, dense labels. `d loss / d x_j = sum_c t_c (p_j - delta_cj)`:

    dx = upstream * (p * sum(t) - t)
    dl = upstream * (1 - s) * (lse - z) = -upstream * (1 - s) * log p

The `sum(t)` factor makes the gradient exact for labels that do not sum to one
(`tf.nn.softmax_cross_entropy_with_logits` returns `p - t` whatever the sum).

Sparse labels (one class id `y` per example) are the dense case with
`t = (1 - s) onehot(y) + s / C`, which sums to one and has
`sum_c t_c z_c = (1 - s) z_y + s mean_c(z_c)`; no one-hot tensor is built:

    loss = lse - (1 - s) z_y - s * mean_c(z_c)
    dx   = upstream * (p - s / C - (1 - s) [c == y])

Probabilities instead of logits (the Keras `from_logits=False` contract):

    probability_cross_entropy:  q = clip(p / sum(p), e, 1 - e)
                                loss = -sum_c t_c log q_c
                                dp = (g - sum(g * p / sum(p))) / sum(p),
                                g = -upstream * t / q where p / sum(p) is
                                inside [e, 1 - e], else 0
    sparse_probability_cross_entropy: the sparse loss on the logits
                                log(clip(p, e, 1 - e)), whose derivative is
                                1 / p inside the clipping range, else 0.

Higher orders. The backward passes read the original inputs and hidden
outputs (`exp(z - m)` and its row sums; `p / sum(p)` and `sum(p)` for
probabilities), each with its own vector-Jacobian product, so differentiating
them runs through the op again (`keras_bn/ops/custom_op.py`).

Out-of-range labels, shapes, dtypes and the implementation choices:
`docs/losses.md`. The public ops check their arguments and call the cores
(`dense`, `sparse`, `dense_from_probabilities`, `sparse_from_probabilities`),
which the losses call with arguments they checked once.
"""

import tensorflow as tf

from keras_bn import _internals
from keras_bn.ops.axes import axes_for_rank
from keras_bn.ops.axes import static_rank
from keras_bn.ops.checks import check_axis
from keras_bn.ops.checks import check_clipping_epsilon
from keras_bn.ops.checks import check_label_smoothing
from keras_bn.ops.checks import check_optional_int
from keras_bn.ops.checks import check_shape
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.dtypes import compute_dtype
from keras_bn.ops.dtypes import float_tensor


def _dense_inputs(labels, x, axis, name):
    """Float `labels` and `x` of one shape, and the class axis, checked."""
    x = float_tensor(x, name)
    labels = float_tensor(labels, "labels")
    axis = axes_for_rank(axis, static_rank(x, name), require_reduced_axis=False)[0]
    received = f", {name}.shape={x.shape.as_list()}, axis={axis}"
    return check_shape(labels, "labels", x, f"`{name}`", (), received), x, axis


def _label_hits(x, labels, axis):
    """True at the label positions along `axis` (a class iota against labels)."""
    shape = [1] * x.shape.rank
    shape[axis] = -1
    iota = tf.reshape(tf.range(tf.shape(x, out_type=labels.dtype)[axis]), shape)
    return tf.equal(iota, tf.expand_dims(labels, axis))


def _num_classes(logits, axis, dtype):
    static = logits.shape[axis]
    if static is not None:
        return tf.constant(static, dtype)
    return tf.cast(tf.shape(logits)[axis], dtype)


def _smooth(labels, num_classes, label_smoothing):
    if not label_smoothing:
        return labels
    return labels * (1.0 - label_smoothing) + label_smoothing / num_classes


def softmax_cross_entropy(labels, logits, axis=-1, label_smoothing=0.0):
    r"""Softmax cross-entropy between a label distribution and logits.

    `loss = sum_c t_c * (lse - z_c)` over `axis`, with `t` the labels smoothed
    by `s` (module docstring). Gradients: `dlogits = upstream * (softmax *
    sum(t) - t)`, exact also when the labels do not sum to one, and
    `dlabels = -upstream * (1 - s) * log_softmax`.

    Args:
        labels: Float tensor of the shape of `logits`: a distribution over the
            classes (one-hot or soft) per example. Any float dtype.
        logits: Float tensor of known rank, unnormalized log-probabilities.
        axis: The class axis.
        label_smoothing: Float in [0, 1].

    Returns:
        The per-example loss: the shape of `logits` without `axis`, in float32
        for float16/bfloat16 logits and in the logits' dtype otherwise.

    Raises:
        TypeError: If `labels` or `logits` is not a float tensor.
        ValueError: If the shapes differ or an argument is out of range.

    Example:

    >>> softmax_cross_entropy([[0.0, 0.0, 0.0, 1.0]], [[1.0, 2.0, 3.0, 4.0]])
    <tf.Tensor: shape=(1,), dtype=float32, numpy=array([0.4401897],
    dtype=float32)>
    """
    axis = check_axis(axis, single=True)
    return dense(labels, logits, axis, check_label_smoothing(label_smoothing))


def dense(labels, logits, axis, smoothing):
    """`softmax_cross_entropy` on checked arguments (module docstring)."""
    labels, logits, axis = _dense_inputs(labels, logits, axis, "logits")
    dtype = compute_dtype(logits.dtype)

    def forward(labels, logits):
        num_classes = _num_classes(logits, axis, dtype)
        xf = tf.cast(logits, dtype)
        row_max = tf.reduce_max(xf, axis=axis, keepdims=True)
        z = xf - row_max
        exp_z = tf.exp(z)
        target = _smooth(tf.cast(labels, dtype), num_classes, smoothing)
        sum_exp = tf.reduce_sum(exp_z, axis=axis, keepdims=True)
        loss_terms = target * (tf.math.log(sum_exp) - z)  # t * -log p
        if _internals.in_xla_function():
            # The loss and sum(t) in one reduction: one kernel instead of two
            # under XLA, which runs each reduction as its own kernel.
            sums = tf.reduce_sum(tf.stack([loss_terms, target]), axis=axis + 1)
            loss, total = sums[0], tf.expand_dims(sums[1], axis)
        else:
            loss = tf.reduce_sum(loss_terms, axis=axis)
            total = tf.reduce_sum(target, axis=axis, keepdims=True)
        # The backward pass keeps one logits-sized tensor, exp(z).
        return (loss,), (exp_z, sum_exp, total), (row_max, num_classes)

    # Asked while the tapes that watch the inputs are active: eagerly, no
    # label gradient is built for labels that no tape watches.
    labels_watched = _internals.gradient_order([labels]) != _internals.NO_GRADIENT

    def backward(context, upstream, hidden_upstream):
        r"""From the inputs and the hidden outputs `u = exp(x - m)`,
        `S = sum(u)` and `T = sum(t)` (the row maximum `m` is a constant: `u`
        is used only through `u / S`, which does not depend on it):

            dlogits = upstream * (u * T / S - t) + u * (du + dS)
            dlabels = upstream * (1 - s) * (log(S) + m - x) + (1 - s) * dT

        with `du`, `dS`, `dT` the hidden outputs' upstream gradients. `dlabels`
        is None where no tape watched the labels when the op ran (eagerly).
        """
        labels, logits = context.inputs
        exp_z, sum_exp, total = context.hidden
        row_max, num_classes = context.saved
        upstream = tf.expand_dims(tf.cast(upstream[0], dtype), axis)
        target = _smooth(tf.cast(labels, dtype), num_classes, smoothing)
        dlogits = upstream * (exp_z * (total / sum_exp) - target)
        dlogits = _add_exp_terms(context, dlogits, hidden_upstream[:2], exp_z)
        if not labels_watched:
            return None, tf.cast(dlogits, logits.dtype)
        neg_log_p = tf.math.log(sum_exp) - (tf.cast(logits, dtype) - row_max)
        dlabels = (upstream * (1.0 - smoothing)) * neg_log_p
        if context.live(hidden_upstream[2]):
            dlabels += (1.0 - smoothing) * tf.cast(hidden_upstream[2], dtype)
        return tf.cast(dlabels, labels.dtype), tf.cast(dlogits, logits.dtype)

    reads = (0, 1) if labels_watched else (0,)
    return custom_op(forward, backward, labels, logits, first_order_reads=reads)[0]


def _add_exp_terms(context, dlogits, hidden_upstream, exp_z, axis=None):
    """`dlogits + u * (du + dS)` for the hidden `u = exp(z)` and `S = sum(u)`
    (`dS` expanded at `axis` when given, else already at broadcast shape)."""
    du, dsum = hidden_upstream
    if context.live(dsum):
        dsum = dsum if axis is None else tf.expand_dims(dsum, axis)
        du = du + dsum if context.live(du) else dsum
    elif not context.live(du):
        return dlogits
    return dlogits + exp_z * du


def _sparse_inputs(labels, x, axis, ignore_class, name):
    """Float `x`, its class axis and `checked_class_ids` for it."""
    x = float_tensor(x, name)
    axis = axes_for_rank(axis, static_rank(x, name), require_reduced_axis=False)[0]
    num_classes = x.shape[axis] if tf.executing_eagerly() else tf.shape(x)[axis]
    whose = f"`{name}` without the class axis"
    received = f", {name}.shape={x.shape.as_list()}, axis={axis}"
    ids = checked_class_ids(labels, x, axis, num_classes, ignore_class, whose, received)
    return x, axis, *ids


def checked_class_ids(labels, x, axis, num_classes, ignore_class, whose, received=""):
    """`(labels, in_range, ignored)`: int `labels` shaped as `x` without its
    `axis` (non-negative; `whose` and `received` for the ValueError), and
    boolean `in_range` and `ignored` tensors, None where all are in range or
    none is ignored. Eagerly, labels outside `[0, num_classes)` (but
    `ignore_class`) raise a ValueError, read on the host (no kernel runs
    unless some label is ignored)."""
    labels = tf.convert_to_tensor(labels)
    if labels.dtype not in (tf.int32, tf.int64):
        raise TypeError(
            "`labels` must be an int32 or int64 tensor of class ids. Received "
            f"dtype: {labels.dtype.name}"
        )
    labels = check_shape(labels, "labels", x, whose, (axis,), received)
    if not tf.executing_eagerly():
        num_classes = tf.cast(num_classes, labels.dtype)
        in_range = tf.logical_and(labels >= 0, labels < num_classes)
        ignored = None if ignore_class is None else tf.equal(labels, ignore_class)
        return labels, in_range, ignored
    values = labels.numpy()
    outside = (values < 0) | (values >= num_classes)
    ignored = None if ignore_class is None else values == ignore_class
    bad = outside if ignored is None else outside & ~ignored
    if bad.any():
        raise ValueError(
            f"`labels` must be class ids in [0, {num_classes})"
            + ("" if ignore_class is None else f" or ignore_class={ignore_class}")
            + f". Received out-of-range labels: {values[bad][:5].tolist()}"
        )
    in_range = tf.constant(~outside) if outside.any() else None
    ignored = tf.constant(ignored) if ignored is not None and ignored.any() else None
    return labels, in_range, ignored


def _pick(z, labels, axis):
    """`z` at the label positions, without a one-hot tensor."""
    rank = z.shape.rank
    if axis == rank - 1:
        return tf.gather(z, labels, batch_dims=rank - 1)
    hit = _label_hits(z, labels, axis)
    return tf.reduce_sum(tf.where(hit, z, tf.zeros([], z.dtype)), axis=axis)


def _subtract_at_labels(values, labels, amounts, axis):
    """`values - amounts * onehot(labels)`: a scatter with the class axis last,
    elsewhere the cheaper select against a class iota."""
    rank = values.shape.rank
    if axis == rank - 1:
        if rank == 2:
            flat, flat_labels, flat_amounts = values, labels, amounts
        else:
            flat = tf.reshape(values, tf.stack([-1, tf.shape(values)[-1]]))
            flat_labels = tf.reshape(labels, [-1])
            flat_amounts = tf.reshape(amounts, [-1])
        rows = tf.range(tf.shape(flat_labels, out_type=flat_labels.dtype)[0])
        flat = tf.tensor_scatter_nd_sub(
            flat, tf.stack([rows, flat_labels], axis=1), flat_amounts
        )
        return flat if rank == 2 else tf.reshape(flat, tf.shape(values))
    hit = _label_hits(values, labels, axis)
    return tf.where(hit, values - tf.expand_dims(amounts, axis), values)


def per_example_mask(value, in_range, ignored):
    """NaN where the label is out of range, 0 where it is ignored."""
    if in_range is not None:
        value = tf.where(in_range, value, tf.constant(float("nan"), value.dtype))
    if ignored is not None:
        value = tf.where(ignored, tf.zeros([], value.dtype), value)
    return value


def sparse_softmax_cross_entropy(
    labels, logits, axis=-1, label_smoothing=0.0, ignore_class=None
):
    r"""Softmax cross-entropy with integer class ids, no one-hot tensor built.

    `loss = lse - (1 - s) * z_y - s * mean_c(z_c)`: the dense loss for the
    target `(1 - s) * onehot(y) + s / C` (module docstring). Gradient:
    `dlogits = upstream * (softmax - s / C - (1 - s) * onehot(y))`,
    subtracted at the label positions only.

    Args:
        labels: int32 or int64 tensor of class ids in `[0, C)`, shaped as
            `logits` without the class axis.
        logits: Float tensor of known rank.
        axis: The class axis, any one (`1` for channels-first per-pixel logits).
        label_smoothing: Float in [0, 1].
        ignore_class: Optional int; examples with this label get loss 0 and
            gradient 0. It may lie inside or outside `[0, C)`.

    Returns:
        The per-example loss, shaped as `labels`, in float32 for
        float16/bfloat16 logits and in the logits' dtype otherwise. In a
        `tf.function` or under XLA, NaN for an out-of-range label.

    Raises:
        TypeError: If `labels` is not an int tensor or `logits` not a float
            one, or `ignore_class` is not an int.
        ValueError: If the shapes differ, an argument is out of range, or
            (eagerly) a label is out of range and not `ignore_class`.

    Example:

    >>> loss = sparse_softmax_cross_entropy([3, 0], [[1.0, 2.0, 3.0, 4.0]] * 2)
    >>> loss.numpy().round(5)  # lse - z_y: 0.44019 and 3.44019
    array([0.44019, 3.44019], dtype=float32)
    """
    axis = check_axis(axis, single=True)
    smoothing = check_label_smoothing(label_smoothing)
    ignore_class = check_optional_int(ignore_class, "ignore_class")
    return sparse(labels, logits, axis, smoothing, ignore_class)


def sparse(labels, logits, axis, smoothing, ignore_class):
    """`sparse_softmax_cross_entropy` on checked arguments."""
    inputs = _sparse_inputs(labels, logits, axis, ignore_class, "logits")
    return _sparse_cross_entropy(*inputs, smoothing)


def _sparse_cross_entropy(logits, axis, labels, in_range, ignored, smoothing):
    """The sparse loss on the outputs of `_sparse_inputs`."""
    dtype = compute_dtype(logits.dtype)
    # Eagerly, TensorFlow's kernel gives the loss and `softmax - onehot(y)` in
    # one op; its gradient is a value, which no tape may differentiate. Graphs
    # keep the closed form, which compiles to fewer passes.
    plain = in_range is None and ignored is None and not smoothing
    if plain and tf.executing_eagerly() and axis == logits.shape.rank - 1:
        if _internals.gradient_order([logits]) != _internals.HIGHER_ORDER:
            return _sparse_cross_entropy_on_kernel(logits, labels, dtype)
    safe_labels = labels
    if in_range is not None:
        safe_labels = tf.where(in_range, labels, tf.zeros([], labels.dtype))

    def forward(logits):
        xf = tf.cast(logits, dtype)
        z = xf - tf.reduce_max(xf, axis=axis, keepdims=True)
        exp_z = tf.exp(z)
        total = tf.reduce_sum(exp_z, axis=axis)
        loss = tf.math.log(total) - (1.0 - smoothing) * _pick(z, safe_labels, axis)
        if smoothing:
            loss -= smoothing * tf.reduce_mean(z, axis=axis)
        loss = per_example_mask(loss, in_range, ignored)
        return (loss,), (exp_z, total), None

    def backward(context, upstream, hidden_upstream):
        (logits,) = context.inputs
        exp_z, total = context.hidden
        upstream = per_example_mask(tf.cast(upstream[0], dtype), in_range, ignored)
        dlogits = exp_z * tf.expand_dims(upstream / total, axis)
        if smoothing:
            off = smoothing / _num_classes(logits, axis, dtype)
            dlogits -= tf.expand_dims(off * upstream, axis)
        hit = upstream if not smoothing else (1.0 - smoothing) * upstream
        dlogits = _subtract_at_labels(dlogits, safe_labels, hit, axis)
        dlogits = _add_exp_terms(context, dlogits, hidden_upstream, exp_z, axis)
        if ignored is not None:
            # Zero even where ignored logits are not finite.
            dlogits = tf.where(
                tf.expand_dims(ignored, axis), tf.zeros([], dtype), dlogits
            )
        return (tf.cast(dlogits, logits.dtype),)

    return custom_op(forward, backward, logits, first_order_reads=())[0]


def _sparse_cross_entropy_on_kernel(logits, labels, dtype):
    """`loss = lse - z_y`, `dlogits = upstream * (softmax - onehot(y))`, on
    `SparseSoftmaxCrossEntropyWithLogits`, which computes both."""
    flat = logits.shape.rank == 2  # else viewed as [-1, classes] (static in eager)

    def forward(logits):
        features, ids = tf.cast(logits, dtype), labels
        if not flat:
            features = tf.reshape(features, [-1, logits.shape[-1]])
            ids = tf.reshape(labels, [-1])
        loss, backprop = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=features, labels=ids
        )
        return (loss if flat else tf.reshape(loss, labels.shape),), (), backprop

    def backward(context, upstream, hidden_upstream):
        (logits,) = context.inputs
        dlogits = tf.reshape(upstream[0], [-1, 1]) * context.saved
        if not flat:
            dlogits = tf.reshape(dlogits, logits.shape)
        return (tf.cast(dlogits, logits.dtype),)

    return custom_op(forward, backward, logits, first_order_reads=())[0]


def probability_cross_entropy(
    labels, probabilities, axis=-1, label_smoothing=0.0, epsilon=1e-7
):
    r"""Cross-entropy from probabilities, clipped as Keras does.

    `loss = -sum_c t_c * log(q_c)` with `q = clip(p / sum(p), epsilon,
    1 - epsilon)` and `t` the labels, smoothed as in `softmax_cross_entropy`:
    Keras's `categorical_crossentropy(from_logits=False)`. The gradient is
    that of this formula (zero where the clip is active; module docstring).

    Args:
        labels: Float tensor of the shape of `probabilities`.
        probabilities: Float tensor of known rank, non-negative.
        axis: The class axis.
        label_smoothing: Float in [0, 1].
        epsilon: Clipping bound in (0, 0.5) (Keras: `keras.config.epsilon()`).

    Returns:
        The per-example loss: the shape of `probabilities` without `axis`,
        float32 for float16/bfloat16 inputs.

    Example:

    >>> probability_cross_entropy([[0.0, 1.0, 0.0]], [[0.05, 0.95, 0.0]])
    <tf.Tensor: shape=(1,), dtype=float32, numpy=array([0.05129331],
    dtype=float32)>
    """
    axis = check_axis(axis, single=True)
    smoothing = check_label_smoothing(label_smoothing)
    epsilon = check_clipping_epsilon(epsilon)
    return dense_from_probabilities(labels, probabilities, axis, smoothing, epsilon)


def dense_from_probabilities(labels, probabilities, axis, smoothing, epsilon):
    """`probability_cross_entropy` on checked arguments."""
    labels, probabilities, axis = _dense_inputs(
        labels, probabilities, axis, "probabilities"
    )
    dtype = compute_dtype(probabilities.dtype)

    def forward(labels, probabilities):
        num_classes = _num_classes(probabilities, axis, dtype)
        pf = tf.cast(probabilities, dtype)
        total = tf.reduce_sum(pf, axis=axis, keepdims=True)
        normalized = pf / total
        log_q = tf.math.log(tf.clip_by_value(normalized, epsilon, 1.0 - epsilon))
        target = _smooth(tf.cast(labels, dtype), num_classes, smoothing)
        loss = -tf.reduce_sum(target * log_q, axis=axis)
        return (loss,), (total, normalized), num_classes

    def backward(context, upstream, hidden_upstream):
        labels, probabilities = context.inputs
        total, normalized = context.hidden
        dtotal, dnormalized = hidden_upstream
        upstream = tf.expand_dims(tf.cast(upstream[0], dtype), axis)
        target = _smooth(tf.cast(labels, dtype), context.saved, smoothing)
        q = tf.clip_by_value(normalized, epsilon, 1.0 - epsilon)
        inside = tf.logical_and(normalized >= epsilon, normalized <= 1.0 - epsilon)
        g = tf.where(inside, -upstream * target / q, tf.zeros([], dtype))
        if context.live(dnormalized):
            g += dnormalized  # the hidden p / sum(p) shares the Jacobian
        dp = (g - tf.reduce_sum(g * normalized, axis=axis, keepdims=True)) / total
        if context.live(dtotal):
            dp += dtotal  # the hidden sum(p)
        dlabels = (-upstream * (1.0 - smoothing)) * tf.math.log(q)
        return tf.cast(dlabels, labels.dtype), tf.cast(dp, probabilities.dtype)

    inputs = (labels, probabilities)
    return custom_op(forward, backward, *inputs, first_order_reads=(0,))[0]


def _clipped_log(probabilities, epsilon, dtype):
    """`log(clip(p, epsilon, 1 - epsilon))` in `dtype`; derivative 1/p inside."""

    def forward(p):
        clipped = tf.clip_by_value(tf.cast(p, dtype), epsilon, 1.0 - epsilon)
        return (tf.math.log(clipped),), (), None

    def backward(context, upstream, hidden_upstream):
        (p,) = context.inputs
        pf = tf.cast(p, dtype)
        clipped = tf.clip_by_value(pf, epsilon, 1.0 - epsilon)
        inside = tf.logical_and(pf >= epsilon, pf <= 1.0 - epsilon)
        dy = tf.cast(upstream[0], dtype)
        dp = tf.where(inside, dy / clipped, tf.zeros([], dtype))
        return (tf.cast(dp, p.dtype),)

    return custom_op(forward, backward, probabilities)[0]


def sparse_probability_cross_entropy(
    labels, probabilities, axis=-1, label_smoothing=0.0, ignore_class=None, epsilon=1e-7
):
    r"""Sparse cross-entropy from probabilities, clipped as Keras does.

    `loss = sparse_softmax_cross_entropy(labels, log(clip(p, epsilon,
    1 - epsilon)))`, i.e. `log(sum_c q_c) - log(q_y)` with `q` the clipped
    probabilities (not renormalized before clipping): Keras's
    `sparse_categorical_crossentropy(from_logits=False)`, for any class axis.

    Args:
        labels: int32 or int64 class ids, shaped as `probabilities` without
            the class axis.
        probabilities: Float tensor of known rank.
        axis: The class axis.
        label_smoothing: Float in [0, 1].
        ignore_class: Optional int, as in `sparse_softmax_cross_entropy`.
        epsilon: Clipping bound in (0, 0.5).

    Returns:
        The per-example loss, shaped as `labels`; out-of-range labels behave
        as in `sparse_softmax_cross_entropy`.

    Example:

    >>> sparse_probability_cross_entropy([1], [[0.05, 0.95, 0.0]])
    <tf.Tensor: shape=(1,), dtype=float32, numpy=array([0.05129344],
    dtype=float32)>
    """
    axis = check_axis(axis, single=True)
    smoothing = check_label_smoothing(label_smoothing)
    ignore_class = check_optional_int(ignore_class, "ignore_class")
    epsilon = check_clipping_epsilon(epsilon)
    args = (axis, smoothing, ignore_class, epsilon)
    return sparse_from_probabilities(labels, probabilities, *args)


def sparse_from_probabilities(
    labels, probabilities, axis, smoothing, ignore_class, epsilon
):
    """`sparse_probability_cross_entropy` on checked arguments."""
    name = "probabilities"
    p, *rest = _sparse_inputs(labels, probabilities, axis, ignore_class, name)
    log_q = _clipped_log(p, epsilon, compute_dtype(p.dtype))
    return _sparse_cross_entropy(log_q, *rest, smoothing)
