r"""The linear cross-entropy with its gradient formed in the forward pass.

`linear_softmax_cross_entropy` computes each chunk's logits twice, once for
the logsumexp and once for the gradient: four products of the size of
`h W` where the dense path has three. When the per-token loss is summed or
averaged (a uniform upstream gradient `c` per token, as Keras's `fit`
averages without `sample_weight`), the gradient is `c` times one that the
forward pass can form while it has the logits at hand, as Liger-Kernel
does. The softmax of a token needs its logsumexp over the whole
vocabulary, so the chunks here are chunks of tokens, with every class:

    x_t  = h_t W + b                          ([n, V], n tokens)
    lse  = logsumexp(x_t),  loss_t = lse - (1 - s) x_y - s mean(x_t)
    g_t  = w (exp(x_t - lse) - s / V - (1 - s) onehot(y))
    dh_t = g_t W^T,  db += sum_n g_t,  dW += h_t^T g_t

with `w` the per-token weights (1 by default, 0 for `ignore_class`). A
block of `n` tokens is one product `h_t W` into one `[n, V]` buffer.
TensorFlow's fused `SparseSoftmaxCrossEntropyWithLogits` kernel turns it
into `lse - x_y` and `p - onehot(y)` in one pass, written over the logits
(label smoothing then subtracts `s / V` and adds `s` at the label). The
weights scale rows of the products' small operands, not the block:

    dh_t = w (g' W^T),   dW += (w h_t)^T g',   db += w^T g'

with `g'` the unweighted gradient. When all tokens fit one block, `dW` and
`db` are whole products, as in the dense path; otherwise they are added a
chunk of columns at a time (`dW[:, k] += (w h_t)^T g'[:, k]`, no
kernel-sized temporary). So a step holds `dW`, `dh`, the block and a
chunk, and costs three products of the size of `h W`, plus one pass over
`dW` per block when there are several. `n` is the power of two for which a
block holds about four times the logits of a chunk of the per-token path
(2^26 by default, 256 MiB in float32: 512 tokens for 131,072 classes), at
most the tokens; the tokens are padded with zero-weight rows to a multiple
of `n` (a copy of `h`, not of the logits). A chunk of columns holds about
2^23 entries of the block and at most as many of `dW` (or `chunk_size`
columns): its update `dW[:, k] + (w h_t)^T g'[:, k]` is two such
temporaries where TensorFlow does not fuse the sum into the product
(oneDNN off).

The op returns the weighted per-token loss `w loss`. Its backward pass reads
the upstream gradient `u`: if `u` takes one value `c` on every token that is
not `ignore_class` (Keras's mean and sum, `reduce_sum`, `reduce_mean`), the
gradients are `c` times the saved ones (for `c = 1`, the gradient of a
reduced loss itself, the saved ones; otherwise the product takes over the
saved gradient's buffer in a graph). Any other upstream, or one whose
backward pass is itself differentiated (a tape or forward accumulator
records it), gets the exact per-token backward pass of
`linear_cross_entropy` (four products, differentiable to any order) with
upstream `u w`: never a wrong result, only a slower one. Where a graph's
first-order gradient is differentiated without a tape (`tf.gradients` of
`tf.gradients`), the saved gradients raise a ValueError rather than return
a second order that would miss their dependence on the inputs.

The forward pass forms the gradients only where a gradient can be asked
for (eagerly: a tape watches the inputs; in a graph: a tape records), so
evaluation and prediction cost one product, as the per-token path.
float16 and bfloat16 are computed in float32 as there (the kernel is cast
once, a float32 copy of it), the gradients kept in float32 until scaled.
"""

import tensorflow as tf

from keras_bn._internals import NO_GRADIENT
from keras_bn._internals import gradient_order
from keras_bn._internals import tape_could_record
from keras_bn.ops.linear_cross_entropy import _DYNAMIC_TOKENS_CHUNK
from keras_bn.ops.linear_cross_entropy import _Chunks
from keras_bn.ops.linear_cross_entropy import _write_columns
from keras_bn.ops.linear_cross_entropy import _zeros_after

# Entries of one chunk of columns, in the block and in dW (32 MiB each).
_BLOCK_CHUNK_ENTRIES = 2**23


def gradient_wanted(inputs):
    """Whether a gradient of `inputs` can be asked for: eagerly, a tape
    watches them; in a graph, a tape records."""
    if tf.executing_eagerly():
        return gradient_order(inputs) != NO_GRADIENT
    return tape_could_record()


def forward_with_gradient(
    labels, hidden, kernel, bias, weights, smoothing, size, chunk_size
):
    """`(weights * loss, lse, (dh, dW[, db]))` per token of a flat `[N, D]`
    `hidden`, in the compute dtype of `weights` (float `[N]`, masked);
    `size` is the per-token path's chunk of classes, `chunk_size` the
    caller's (None: automatic)."""
    num_classes = kernel.shape[1]
    rows = _token_rows(hidden.shape[0], size, num_classes)
    # Chunks of about 2^23 entries (32 MiB) of the block and of dW.
    columns = chunk_size or 2 ** max(
        7, (_BLOCK_CHUNK_ENTRIES // max(rows, kernel.shape[0])).bit_length() - 1
    )
    chunks = _Chunks(num_classes, min(columns, num_classes))
    return _forward_with_gradient(
        labels, hidden, kernel, bias, weights, smoothing, chunks, rows
    )


def saved_gradients(upstream, ignored, saved, inputs, exact):
    """The gradients for `upstream` (float `[N]`): the saved ones scaled if
    `upstream` is one value on every token not `ignored`, else `exact()`."""
    scale, uniform = _uniform_value(upstream, ignored)
    if tf.executing_eagerly():
        return _scaled(scale, saved, inputs) if bool(uniform) else exact()
    # Scaled outside the branch: the product can take over the saved
    # gradient's buffer (one kernel-sized tensor, not two), and the branch
    # passes it through.
    fast = _scaled(scale, _refuse_differentiation(saved, inputs), inputs)
    return tf.cond(uniform, lambda: fast, exact)


def _scaled(scale, saved, inputs):
    """`scale * saved`, in the inputs' dtypes. A scale of exactly 1 (the
    gradient of a reduced loss itself) passes the saved gradients through,
    so that no second kernel-sized tensor exists."""

    def scaled():
        return tuple(tf.cast(scale * g, x.dtype) for g, x in zip(saved, inputs))

    def same():
        return tuple(tf.cast(g, x.dtype) for g, x in zip(saved, inputs))

    if tf.executing_eagerly():
        return same() if bool(scale == 1) else scaled()
    return tf.cond(tf.equal(scale, 1), same, scaled)


def _token_rows(tokens, size, num_classes):
    """Tokens per block: about `4 * tokens * size` logits (2^26 by default,
    256 MiB in float32), a power of two, at most `tokens`."""
    rows = tokens or _DYNAMIC_TOKENS_CHUNK
    wanted = max(1, -(-4 * rows * size // num_classes))
    rows_per_block = 1 << (wanted - 1).bit_length()
    return min(rows_per_block, tokens) if tokens else rows_per_block


def _uniform_value(u, ignored):
    """`(c, whether u == c on every token not ignored)`; c = 0 if none is."""
    valid = tf.ones(tf.shape(u), tf.bool) if ignored is None else ~ignored
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
    any_valid = tf.reduce_any(valid)
    scale = tf.where(any_valid, tf.gather(u, first), tf.zeros([], u.dtype))
    uniform = tf.reduce_all(tf.logical_or(~valid, tf.equal(u, scale)))
    return scale, uniform


def _refuse_differentiation(saved, inputs):
    """`saved`, linked to `inputs` by an op whose gradient raises: the saved
    gradients do not carry their dependence on the inputs."""
    count = len(saved)

    @tf.custom_gradient
    def guard(*args):
        def grad(*upstream):
            raise ValueError(
                "The gradient of `linear_softmax_cross_entropy` with "
                "`reduction` (or of a LinearCrossEntropyHead in training) was "
                "formed in its forward pass and cannot be differentiated "
                "again without a tape. Differentiate under a "
                "tf.GradientTape (persistent or nested), which takes the exact "
                "path, or use `reduction=None`."
            )

        return tuple(tf.identity(a) for a in args[:count]), grad

    return guard(*saved, *inputs)


def _forward_with_gradient(
    labels, hidden, kernel, bias, weights, smoothing, chunks, rows
):
    """`(loss, lse, (dh, dW[, db]))` per token, over blocks of `rows` tokens
    with all classes (module docstring); the gradients in the compute dtype."""
    dtype = weights.dtype
    features, num_classes = kernel.shape
    h = tf.cast(hidden, dtype)
    w = tf.cast(kernel, dtype)  # a copy only for float16/bfloat16
    b = None if bias is None else tf.cast(bias, dtype)
    if hidden.shape[0] is not None and hidden.shape[0] <= rows:
        # One block: the kernel's and the bias's gradients are whole products.
        loss, lse, g = _block(h, labels, w, b, smoothing)
        grads = (
            tf.matmul(g, w, transpose_b=True) * weights[:, None],
            tf.matmul(h * weights[:, None], g, transpose_a=True),
        )
        if b is not None:
            grads += (tf.linalg.matvec(g, weights, transpose_a=True),)
        return loss * weights, lse, grads
    tokens = tf.shape(h)[0]
    pad = tf.math.floormod(-tokens, rows)
    h_padded = tf.pad(h, [[0, pad], [0, 0]])
    labels_padded = tf.pad(labels, [[0, pad]])
    weights_padded = tf.pad(weights, [[0, pad]])
    blocks = (tokens + pad) // rows

    def body(t, loss, lse, dh, dkernel, dbias):
        start = t * rows
        h_t = tf.slice(h_padded, [start, 0], [rows, features])
        w_t = tf.slice(weights_padded, [start], [rows])
        loss_t, lse_t, g = _block(
            h_t, tf.slice(labels_padded, [start], [rows]), w, b, smoothing
        )
        dkernel, dbias = _add_columns(g, h_t, w_t, dkernel, dbias, chunks)
        dh = dh.write(t, tf.matmul(g, w, transpose_b=True) * w_t[:, None])
        loss = loss.write(t, loss_t * w_t)
        lse = lse.write(t, lse_t)
        return t + 1, loss, lse, dh, dkernel, dbias

    def arrays(shape):
        return tf.TensorArray(dtype, size=blocks, element_shape=shape)

    state = (
        tf.constant(0),
        arrays([rows]),
        arrays([rows]),
        arrays([rows, features]),
        _zeros_after(labels, [features, num_classes], dtype),
        None if b is None else _zeros_after(labels, [num_classes], dtype),
    )
    if b is None:
        state = state[:5]
        loop_body = lambda *s: body(*s, None)[:5]  # noqa: E731
    else:
        loop_body = body
    result = _loop(blocks, loop_body, state)
    loss, lse, dh = (
        tf.reshape(a.stack(), [-1] + s)
        for a, s in zip(result[1:4], ([], [], [features]))
    )
    grads = (dh[:tokens],) + tuple(result[4:])
    return loss[:tokens], lse[:tokens], grads


def _block(h, labels, w, b, smoothing):
    """`(loss, lse, g)` of a block of tokens with all classes, unweighted:
    `g = p - s / V - (1 - s) onehot(y)`. TensorFlow's fused sparse
    cross-entropy kernel forms the loss and `p - onehot(y)` in one pass over
    the logits and writes the gradient over them."""
    logits = tf.matmul(h, w)
    if b is not None:
        logits += b
    picked = tf.gather(logits, labels[:, None], batch_dims=1)[:, 0]
    if smoothing:
        row_mean = tf.reduce_mean(logits, axis=1)
    loss, g = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
        features=logits, labels=labels
    )
    lse = loss + picked
    if smoothing:
        # lse - (1 - s) x_y - s mean(x) and its gradient, from s = 0's.
        loss += smoothing * (picked - row_mean)
        g -= smoothing / w.shape[1]
        at = tf.stack([tf.range(tf.shape(labels)[0]), labels], axis=1)
        g = tf.tensor_scatter_nd_add(
            g, at, tf.fill(tf.shape(labels), tf.constant(smoothing, g.dtype))
        )
    return loss, lse, g


def _loop(count, body, state):
    return tf.while_loop(
        lambda k, *_: k < count,
        body,
        state,
        maximum_iterations=count,
        parallel_iterations=1,  # one chunk alive at a time
    )


def _add_columns(g, h_t, w_t, dkernel, dbias, chunks):
    """`(dkernel + (w_t h_t)^T g, dbias + w_t^T g)`, a chunk of columns at a
    time, in place: no kernel-sized temporary. Columns an earlier chunk
    covered add nothing again."""
    rows, features = h_t.shape
    weighted = h_t * w_t[:, None]

    def body(k, dkernel, dbias):
        start = chunks.start(k)
        g_k = tf.slice(g, [0, start], [rows, chunks.size])
        fresh = chunks.fresh(k, start)
        if fresh is not None:
            g_k = tf.where(fresh, g_k, tf.zeros([], g_k.dtype))
        old = tf.slice(dkernel, [0, start], [features, chunks.size])
        dkernel = _write_columns(
            dkernel, old + tf.matmul(weighted, g_k, transpose_a=True), start
        )
        if dbias is not None:
            old = tf.slice(dbias, [start], [chunks.size])
            new = old + tf.linalg.matvec(g_k, w_t, transpose_a=True)
            dbias = _write_columns(dbias, new, start)
        return k + 1, dkernel, dbias

    state = (tf.constant(0), dkernel, dbias)
    if dbias is None:
        state = state[:2]
        loop_body = lambda *s: body(*s, None)[:2]  # noqa: E731
    else:
        loop_body = body
    result = _loop(chunks.count, loop_body, state)
    return result[1], result[2] if dbias is not None else None
