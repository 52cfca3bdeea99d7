r"""Softmax cross-entropy of a linear layer's output, never holding the logits.

A language model's head computes logits `x = h W + b` (`N` tokens, `D`
features, `V` classes) and their sparse cross-entropy. With a large
vocabulary `x` is the step's largest tensor (4 GiB in float32 at 8,192
tokens and 131,072 classes), and the dense path holds it, its softmax and
its gradient. Here the classes are cut into chunks of `c` columns, and only
one `[N, c]` block of logits exists at a time.

Forward pass: an online logsumexp. For chunk `k`, `x_k = h W_k + b_k`, with
a running maximum `m` and sum `s`:

    m' = max(m, max_j x_kj),    s' = s exp(m - m') + sum_j exp(x_kj - m')

and `lse = m + log(s)` at the end. The chunk that holds the label gives
`x_y`, the row sum gives `mean(x)`, and with label smoothing `s_`

    loss = lse - (1 - s_) x_y - s_ mean_j(x_j)

Backward pass. For an upstream gradient `u` (one value per token, any
values: weights, masks) the gradient to the logits is

    g = u (p - s_ / V - (1 - s_) onehot(y)),      p = exp(x - lse)

formed chunk by chunk from recomputed logits and contracted at once:
`dh += g_k W_k^T`, `dW_k = h^T g_k` (its own columns of `dW`),
`db_k = sum_n g_k`. The step keeps `dW`, `dh` and one chunk, and costs four
products of the size of `h W` against the dense path's three.

Chunks. `c` is `chunk_size` or, by default, the power of two for which a
chunk holds about 2^24 logits and at most as many kernel entries (64 MiB in
float32), at most `V`. If `c` does not divide `V`, the last chunk starts at
`V - c`, overlapping the one before: its already-counted columns are masked
out of the logsumexp, the label pick, the row sum and `dh`, and it writes
the same values again into `dW` and `db`. Nothing is padded (a padded
kernel would be a copy). The loops are `tf.while_loop`s over chunks of one
static size (eager, `tf.function`, XLA); `dW` is a loop variable updated in
place one slice at a time.

Dtypes: float16 and bfloat16 are computed in float32 (each kernel chunk cast
as it is used); the loss is float32, the gradients take their input's dtype.

Labels. Out-of-range labels (other than `ignore_class`) raise eagerly; in a
graph that token's loss is NaN, and so are the gradients it reaches, as in
the dense path. Tokens labelled `ignore_class` have loss 0 and gradient 0.

Higher orders. `lse` is a hidden output of the op (`custom_op.py`): its
upstream gradient `v` adds `v p` to `g`, and the backward pass is built from
differentiable ops of the inputs and `lse`, so TensorFlow differentiates it,
loops included, to any order: exact, but it keeps every chunk's
intermediates.
"""

import math

import tensorflow as tf

from keras_bn._internals import NO_GRADIENT
from keras_bn._internals import gradient_order
from keras_bn._internals import in_xla_function
from keras_bn._internals import tape_could_record
from keras_bn.ops.axes import static_rank
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_choice
from keras_bn.ops.checks import check_label_smoothing
from keras_bn.ops.checks import check_optional_int
from keras_bn.ops.checks import check_optional_positive_int
from keras_bn.ops.checks import check_shape
from keras_bn.ops.cross_entropy import checked_class_ids
from keras_bn.ops.cross_entropy import per_example_mask
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.dtypes import compute_dtype
from keras_bn.ops.dtypes import float_tensor

# Entries of one [N, c] chunk of logits, and at most of one [D, c] chunk
# of the kernel, by default (64 MiB in float32).
_CHUNK_ENTRIES = 2**24
_DYNAMIC_TOKENS_CHUNK = 4096


def linear_softmax_cross_entropy(
    labels,
    hidden,
    kernel,
    bias=None,
    label_smoothing=0.0,
    ignore_class=None,
    chunk_size=None,
    sample_weight=None,
    reduction=None,
    gradient_in_forward=None,
):
    r"""Sparse softmax cross-entropy of `hidden @ kernel + bias`, in chunks.

    Equals `sparse_softmax_cross_entropy(labels, hidden @ kernel + bias,
    label_smoothing=..., ignore_class=...)`, value and gradients, but never
    builds the logits (`[tokens, classes]`) or their gradient: the classes
    are processed `chunk_size` columns at a time, with an online logsumexp
    forward and a backward pass that recomputes each chunk's logits
    (derivation in this module's docstring). Peak memory beyond the inputs
    is the kernel's gradient plus one chunk.

    With `gradient_in_forward` (the default with a `reduction`), the
    gradients are formed in the forward pass, where the logits are at hand:
    three products of the size of `hidden @ kernel` instead of four, over
    blocks of tokens with every class, about `4 * tokens * chunk_size`
    logits each (`linear_cross_entropy_uniform.py`). The backward pass
    scales them when the upstream gradient is one value per token; any
    other, and gradients of gradients, take the exact per-token pass.

    Args:
        labels: int32 or int64 class ids in `[0, V)`, shaped as `hidden`
            without its last axis.
        hidden: Float tensor `[..., D]`: the features before the output
            projection (leading axes such as batch and sequence allowed).
        kernel: Float tensor `[D, V]` of static shape, the dtype of `hidden`.
        bias: Optional float tensor `[V]`, the dtype of `hidden`.
        label_smoothing: Float in [0, 1], as in
            `sparse_softmax_cross_entropy`: the target is
            `(1 - s) * onehot(y) + s / V`.
        ignore_class: Optional int; tokens with this label get loss 0 and
            gradient 0 (padding).
        chunk_size: Optional int, the number of classes per chunk. Default:
            about 2^24 logits, and at most as many kernel entries, per
            chunk (a power of two), at most `V`.
        sample_weight: Optional float tensor shaped as `labels`: per-token
            weights that multiply the loss (not differentiated).
        reduction: None (the per-token loss), `"sum"` (the sum of the
            weighted per-token losses) or `"mean"` (that sum over the number
            of tokens not labelled `ignore_class`: Keras's
            `"sum_over_batch_size"` with its mask; 0 if there are none).
        gradient_in_forward: Optional bool, whether to form the gradients
            in the forward pass (above). Default: True with a `reduction`;
            also worth it for a per-token loss its caller averages.

    Returns:
        The per-token loss, shaped as `labels` (times `sample_weight`), or
        its reduction, a scalar: float32 for float16/bfloat16 inputs, else
        their dtype. Eagerly, an out-of-range label raises; in a graph that
        token's loss is NaN.

    Raises:
        TypeError: If `labels` is not an int tensor, or `hidden`, `kernel`,
            `bias` are not float tensors of one dtype.
        ValueError: If shapes do not match (the argument is named), an
            argument is out of range, or (eagerly) a label is out of range.

    Example:

    >>> hidden = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    >>> kernel = tf.constant([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    >>> loss = linear_softmax_cross_entropy([2, 0], hidden, kernel, chunk_size=2)
    >>> loss.numpy().round(5)  # logits [1, 2, 3] and [0, 0, 1]
    array([0.40761, 1.55144], dtype=float32)
    """
    reduction = check_choice(reduction, "reduction", (None, "sum", "mean"))
    if gradient_in_forward is None:
        gradient_in_forward = reduction is not None
    gradient_in_forward = check_bool(gradient_in_forward, "gradient_in_forward")
    smoothing = check_label_smoothing(label_smoothing)
    ignore_class = check_optional_int(ignore_class, "ignore_class")
    chunk_size = check_optional_positive_int(chunk_size, "chunk_size")
    hidden, kernel, bias = _checked_parameters(hidden, kernel, bias)
    whose = "`hidden` without its last axis"
    axis, num_classes = hidden.shape.rank - 1, kernel.shape[1]
    labels, in_range, ignored = checked_class_ids(
        labels, hidden, axis, num_classes, ignore_class, whose
    )
    dtype = compute_dtype(hidden.dtype)
    weights = None
    if sample_weight is not None:
        weights = float_tensor(sample_weight, "sample_weight")
        weights = check_shape(weights, "sample_weight", labels, "`labels`")
        weights = tf.cast(weights, dtype)
    if reduction == "mean":
        # The division goes into the weights: the sum's gradient is then
        # exactly 1 per token, and the saved gradients pass through unscaled.
        count = tf.size(labels)
        if ignored is not None:
            count -= tf.math.count_nonzero(ignored, dtype=tf.int32)
        weights = tf.math.divide_no_nan(
            tf.ones(tf.shape(labels), dtype) if weights is None else weights,
            tf.cast(count, dtype),
        )
    per_token = (labels, in_range, ignored, weights)
    flat = [None if t is None else tf.reshape(t, [-1]) for t in per_token]
    flat_hidden = tf.reshape(hidden, [-1, kernel.shape[0]])
    options = (smoothing, chunk_size, gradient_in_forward)
    loss = _fused_loss(*flat, flat_hidden, kernel, bias, *options)
    loss = tf.reshape(loss, tf.shape(labels))
    return loss if reduction is None else tf.reduce_sum(loss)


def _checked_parameters(hidden, kernel, bias):
    hidden = float_tensor(hidden, "hidden")
    kernel = float_tensor(kernel, "kernel")
    if static_rank(hidden, "hidden") < 1:
        raise ValueError(
            "`hidden` must have rank >= 1 (its last axis is the features). "
            f"Received: hidden.shape={hidden.shape}"
        )
    if kernel.shape.rank != 2 or not kernel.shape.is_fully_defined():
        raise ValueError(
            "`kernel` must have a static shape [features, classes]. "
            f"Received: kernel.shape={kernel.shape}"
        )
    if not tf.TensorShape([kernel.shape[0]]).is_compatible_with(hidden.shape[-1:]):
        raise ValueError(
            "`kernel` must have shape [features, classes] with features = "
            f"hidden.shape[-1] = {hidden.shape[-1]}. Received: "
            f"kernel.shape={kernel.shape.as_list()}"
        )
    if bias is not None:
        bias = float_tensor(bias, "bias")
        if bias.shape != [kernel.shape[1]]:
            raise ValueError(
                f"`bias` must have shape [classes] = [{kernel.shape[1]}] "
                f"(kernel.shape={kernel.shape.as_list()}). Received: "
                f"bias.shape={bias.shape.as_list()}"
            )
    for name, tensor in (("kernel", kernel), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"`{name}` must have the dtype of `hidden`, {hidden.dtype.name}. "
                f"Received: {name}.dtype={tensor.dtype.name}"
            )
    return hidden, kernel, bias


def _chunk_columns(chunk_size, tokens, features, num_classes):
    """The static number of classes per chunk (module docstring)."""
    if chunk_size is None:
        rows = max(tokens or _DYNAMIC_TOKENS_CHUNK, features)
        chunk_size = 2 ** max(7, round(math.log2(max(_CHUNK_ENTRIES // rows, 1))))
    return min(chunk_size, num_classes)


def _chunk_logits(h, kernel, bias, start, size, dtype):
    """`h @ kernel[:, start:start + size] + bias[...]` in `dtype`, and that
    kernel chunk."""
    w = tf.cast(tf.slice(kernel, [0, start], [kernel.shape[0], size]), dtype)
    logits = tf.matmul(h, w)
    if bias is not None:
        logits += tf.cast(tf.slice(bias, [start], [size]), dtype)
    return logits, w


class _Chunks:
    """The chunk grid: `start(k)` and which columns of chunk `k` are new."""

    def __init__(self, num_classes, size):
        self.size = size
        self.count = -(-num_classes // size)
        self.last_start = num_classes - size
        self.overlaps = num_classes % size != 0

    def start(self, k):
        return tf.minimum(k * self.size, self.last_start)

    def fresh(self, k, start):
        """Bool [size]: the columns no earlier chunk covered (None: all)."""
        if not self.overlaps:
            return None
        return start + tf.range(self.size) >= k * self.size


def _fused_loss(
    labels, in_range, ignored, weights, hidden, kernel, bias, smoothing, chunk_size,
    uniform,
):  # fmt: skip
    """`weights * loss` per token of a flat `[N, D]` `hidden`, with flat
    labels, masks and weights (None or float `[N]`, not differentiated).

    With `uniform`, the gradients are formed in the forward pass where one
    can be asked for, and an upstream gradient that is one value per token
    scales them (`linear_cross_entropy_uniform.py`); any other takes the
    per-token backward pass.
    """
    # Imported here: that module builds on this one's loops.
    from keras_bn.ops import linear_cross_entropy_uniform as fast

    dtype = compute_dtype(hidden.dtype)
    num_classes = kernel.shape[1]
    size = _chunk_columns(chunk_size, *hidden.shape, num_classes)
    chunks = _Chunks(num_classes, size)
    labels = tf.cast(labels, tf.int32)
    if in_range is not None:  # out-of-range tokens' losses are masked
        labels = tf.where(in_range, labels, tf.zeros([], tf.int32))
    if weights is not None:
        weights = tf.stop_gradient(weights)
    has_bias = bias is not None
    inputs = (hidden, kernel) + ((bias,) if has_bias else ())
    # Only where a gradient can be asked for: eagerly, where a tape watches
    # the inputs; in a graph, where a tape records.
    if tf.executing_eagerly():
        uniform = uniform and gradient_order(inputs) != NO_GRADIENT
    else:
        uniform = uniform and tape_could_record()

    def forward(hidden, kernel, *maybe_bias):
        bias = maybe_bias[0] if has_bias else None
        if uniform:
            w = tf.ones(tf.shape(labels), dtype) if weights is None else weights
            w = per_example_mask(w, in_range, ignored)
            loss, lse, grads = fast.forward_with_gradient(
                labels, hidden, kernel, bias, w, smoothing, size
            )
            return (per_example_mask(loss, in_range, ignored),), (lse,), grads
        lse, picked, row_sum = _forward_loop(
            labels, hidden, kernel, bias, chunks, dtype
        )
        loss = lse - (1.0 - smoothing) * picked
        if smoothing:
            loss -= (smoothing / num_classes) * row_sum
        loss = per_example_mask(loss, in_range, ignored)
        return (loss if weights is None else loss * weights,), (lse,), None

    def backward(context, upstream, hidden_upstream):
        hidden, kernel = context.inputs[:2]
        (lse,) = context.hidden
        raw = tf.cast(upstream[0], dtype)
        u = per_example_mask(raw, in_range, ignored)
        if weights is not None:
            u *= weights
        v = hidden_upstream[0]
        on_p = u + tf.cast(v, dtype) if context.live(v) else u

        def exact():
            per_token = (on_p, (1.0 - smoothing) * u, (smoothing / num_classes) * u)
            bias = context.inputs[2] if has_bias else None
            return _backward_loop(labels, hidden, kernel, bias, lse, per_token, chunks)

        if context.saved is None or context.live(v) or context.recording:
            return exact()
        return fast.saved_gradients(raw, ignored, context.saved, context.inputs, exact)

    return custom_op(forward, backward, *inputs)[0]


def _forward_loop(labels, hidden, kernel, bias, chunks, dtype):
    """`(lse, x_y, sum_j x_j)` per token, by an online logsumexp."""
    h = tf.cast(hidden, dtype)
    rows = tf.shape(h)[0]
    zeros = tf.zeros([rows], dtype)
    minus_inf = tf.constant(-float("inf"), dtype)

    def body(k, running_max, running_sum, picked, row_sum):
        start = chunks.start(k)
        logits, _ = _chunk_logits(h, kernel, bias, start, chunks.size, dtype)
        fresh = chunks.fresh(k, start)
        logits_new = logits if fresh is None else tf.where(fresh, logits, minus_inf)
        new_max = tf.maximum(running_max, tf.reduce_max(logits_new, axis=1))
        running_sum = running_sum * tf.exp(running_max - new_max) + tf.reduce_sum(
            tf.exp(logits_new - new_max[:, None]), axis=1
        )
        local = labels - start
        hit = tf.logical_and(local >= 0, local < chunks.size)
        hit = tf.logical_and(hit, labels >= k * chunks.size)
        label_logit = tf.gather(
            logits, tf.clip_by_value(local, 0, chunks.size - 1)[:, None], batch_dims=1
        )[:, 0]
        picked += tf.where(hit, label_logit, tf.zeros([], dtype))
        if fresh is not None:
            logits = tf.where(fresh, logits, tf.zeros([], dtype))
        row_sum += tf.reduce_sum(logits, axis=1)
        return new_max, running_sum, picked, row_sum

    running_max, running_sum, picked, row_sum = _loop(
        chunks.count, body, tf.fill([rows], minus_inf), zeros, zeros, zeros
    )
    return running_max + tf.math.log(running_sum), picked, row_sum


def _backward_loop(labels, hidden, kernel, bias, lse, coefficients, chunks):
    """`(dhidden, dkernel[, dbias])` for `g = a p - b onehot(y) - c`, with
    `(a, b, c)` = `coefficients` per token (module docstring)."""
    on_p, on_label, uniform = coefficients
    dtype = lse.dtype
    h = tf.cast(hidden, dtype)
    features, num_classes = kernel.shape

    def body(k, dh, dkernel, dbias):
        start = chunks.start(k)
        logits, w = _chunk_logits(h, kernel, bias, start, chunks.size, dtype)
        columns = start + tf.range(chunks.size)
        g = tf.exp(logits - lse[:, None]) * on_p[:, None] - uniform[:, None]
        g -= tf.where(
            tf.equal(columns[None, :], labels[:, None]), on_label[:, None], 0.0
        )
        fresh = chunks.fresh(k, start)
        if fresh is not None:
            # Columns an earlier chunk covered: dW and db get the same values
            # again, dh must not count them twice.
            w = w * tf.cast(fresh, dtype)
        dh += tf.matmul(g, w, transpose_b=True)
        dk = tf.cast(tf.matmul(h, g, transpose_a=True), kernel.dtype)
        dkernel = _write_columns(dkernel, dk, start)
        if dbias is not None:
            db = tf.cast(tf.reduce_sum(g, axis=0), bias.dtype)
            dbias = _write_columns(dbias, db, start)
        return dh, dkernel, dbias

    dh, dkernel, dbias = _loop(
        chunks.count,
        body,
        _zeros_after(labels, tf.shape(h), dtype),
        _zeros_after(labels, [features, num_classes], kernel.dtype),
        None if bias is None else _zeros_after(labels, [num_classes], bias.dtype),
    )
    dh = tf.cast(dh, hidden.dtype)
    return (dh, dkernel) + (() if bias is None else (dbias,))


def _loop(count, body, *state):
    """`state` after `state = body(k, *state)` for `k` in `range(count)`, one
    iteration at a time (one chunk alive); None entries stay None."""
    live = [x is not None for x in state]

    def step(k, *values):
        values = iter(values)
        new = body(k, *[next(values) if x else None for x in live])
        return (k + 1,) + tuple(v for v, x in zip(new, live) if x)

    result = iter(
        tf.while_loop(
            lambda k, *_: k < count,
            step,
            (tf.constant(0),) + tuple(v for v in state if v is not None),
            maximum_iterations=count,
            parallel_iterations=1,
        )[1:]
    )
    return tuple(next(result) if x else None for x in live)


def _zeros_after(labels, shape, dtype):
    """Zeros of `shape` computed from `labels`, as a loop's initial state.

    A constant `tf.zeros` is a buffer the first in-place update does not
    take over (with oneDNN off, a copy of the whole state: 512 MiB more at
    131,072 classes), and TensorFlow builds it even in the untaken branch of
    a `tf.cond` (the fast gradient's fallback). Zeros computed from a tensor
    are updated in place, and built only where their branch runs. The
    product is a float one: Grappler folds an integer `x * 0` into a
    constant (float32 holds any label, and the minimum of none, finitely).
    """
    zero = tf.cast(tf.reduce_min(labels[:1]), tf.float32) * 0.0
    return tf.fill(shape, tf.cast(zero, dtype))


def _write_columns(target, value, start):
    """`target` with `value` written at `start` along its last axis, in
    place: TensorFlow forwards the loop variable's buffer to the update, and
    XLA, which needs static slice bounds, scatters into it (as does a graph
    where XLA cannot be ruled out: the scatter is right in both)."""
    rank = target.shape.rank
    if in_xla_function(unknown=True):
        grid = tf.meshgrid(
            *[tf.range(n) for n in value.shape[:-1]],
            start + tf.range(value.shape[-1]),
            indexing="ij",
        )
        return tf.tensor_scatter_nd_update(target, tf.stack(grid, axis=-1), value)
    begin = tf.stack([0] * (rank - 1) + [start])
    end = begin + tf.constant(value.shape.as_list(), begin.dtype)
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=target, begin=begin, end=end, strides=[1] * rank, value=value
    )
