r"""The linear cross-entropy with its gradient formed in the forward pass.

When the per-token loss is summed or averaged (one upstream value `c` per
token), the gradient is `c` times one the forward pass can form while the
logits are at hand (docs/large_vocabulary.md). A token's softmax needs its
logsumexp over every class, so the blocks are blocks of tokens with all
classes:

    x_t  = h_t W + b                          ([n, V], n tokens)
    lse  = logsumexp(x_t),  loss_t = lse - (1 - s) x_y - s mean(x_t)
    g'   = exp(x_t - lse) - s / V - (1 - s) onehot(y)
    dh_t = w (g' W^T),   dW += (w h_t)^T g',   db += w^T g'

with `w` the per-token weights (1 by default, 0 for `ignore_class`), applied
to the products' small operands. TensorFlow's fused sparse cross-entropy
kernel forms `lse - x_y` and `p - onehot(y)` in one pass, over the block's
buffer. A block holds about four times the per-token path's chunk (2^26
logits by default: 512 tokens at 131,072 classes); the tokens are padded
with zero-weight rows to whole blocks.

With several blocks, each adds its `dW` into the sum without a second
kernel-sized tensor. In a float32 graph on oneDNN's CPU kernels, `(h_t^T
g' + 0) + dW` is one op: Grappler fuses MatMul, BiasAdd and Add, and
oneDNN accumulates into the sum's buffer. Elsewhere `r` whole rows at a
time (`r` the largest divisor of `D` with `r V` at most 2^25: 128 MiB in
float32), one pass per product: `InplaceAdd` on `dW` viewed as `[D / r,
r V]`. That op writes into its input unchecked, so the sum starts from
`Empty` (stateful: never a shared constant) and only the next add reads
each step's sum. XLA has no `InplaceAdd`: there a scatter-add does it.

The backward pass reads the upstream gradient `u`: if it is one value `c`
on every token not `ignore_class`, the gradients are `c` times the saved
ones. Any other upstream, or a backward pass that is itself differentiated
(a tape or forward accumulator records it), takes the exact per-token
backward pass with upstream `u w`. Where a graph's gradient is
differentiated without a tape, the saved gradients raise a ValueError rather
than miss their dependence on the inputs. The gradients are formed only
where one can be asked for; float16 and bfloat16 are computed in float32.
"""

import tensorflow as tf

from keras_bn._internals import in_xla_function
from keras_bn._internals import onednn_enabled
from keras_bn.ops.linear_cross_entropy import _DYNAMIC_TOKENS_CHUNK
from keras_bn.ops.linear_cross_entropy import _loop
from keras_bn.ops.linear_cross_entropy import _zeros_after

_ROWS_ENTRIES = 2**25  # of one product of whole rows added into dW


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
    # Plus a zero Grappler does not fold (a placeholder): removing the loops
    # of a branch a folded predicate never takes (constant upstream ones)
    # breaks the graph, and TensorFlow drops every optimization of it.
    opaque = tf.raw_ops.PlaceholderWithDefault(input=0, shape=[])
    uniform = tf.not_equal(tf.cast(uniform, tf.int32) + opaque, 0)
    return tf.cond(uniform, lambda: fast, exact)


def _scaled(scale, saved, inputs):
    """`scale * saved`, in the inputs' dtypes. A scale of exactly 1 (the
    gradient of a reduced loss itself) passes the saved gradients through,
    so that no second kernel-sized tensor exists."""

    def cast(by=None):
        return tuple(
            tf.cast(g if by is None else by * g, x.dtype) for g, x in zip(saved, inputs)
        )

    return tf.cond(tf.equal(scale, 1), cast, lambda: cast(scale))


def _token_rows(tokens, size, num_classes):
    """Tokens per block (a power of two): about `4 * tokens * size` logits."""
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


def forward_with_gradient(labels, hidden, kernel, bias, weights, smoothing, size):
    """`(weights * loss, lse, (dh, dW[, db]))` per token of a flat `[N, D]`
    `hidden`, over blocks of tokens with all classes (module docstring), in
    the compute dtype of `weights` (float `[N]`, masked). `size` is the
    per-token path's chunk of classes."""
    features, num_classes = kernel.shape
    rows = _token_rows(hidden.shape[0], size, num_classes)
    dtype = weights.dtype
    h = tf.cast(hidden, dtype)
    w = tf.cast(kernel, dtype)  # a copy only for float16/bfloat16
    b = None if bias is None else tf.cast(bias, dtype)
    if hidden.shape[0] is not None and hidden.shape[0] <= rows:
        # One block: the kernel's and the bias's gradients are whole products.
        loss, lse, g = _block(h, labels, w, b, smoothing)
        grads = (
            _times_transposed(g, w) * weights[:, None],
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
    xla = in_xla_function(unknown=True)
    fused = not xla and _fuses_accumulation(dtype)
    zeros = _zeros_after(labels, [num_classes], dtype) if fused else None
    fits = min(max(_ROWS_ENTRIES // num_classes, 1), features)
    step = max(r for r in range(1, fits + 1) if features % r == 0)

    def body(t, loss, lse, dh, dkernel, dbias):
        start = t * rows
        h_t = tf.slice(h_padded, [start, 0], [rows, features])
        w_t = tf.slice(weights_padded, [start], [rows])
        loss_t, lse_t, g = _block(
            h_t, tf.slice(labels_padded, [start], [rows]), w, b, smoothing
        )
        if fused:
            dkernel = _add_fused(g, h_t, w_t, dkernel, zeros)
        else:
            dkernel = _add_rows(g, h_t * w_t[:, None], dkernel, step, xla)
        if dbias is not None:
            dbias += tf.linalg.matvec(g, w_t, transpose_a=True)
        dh = dh.write(t, _times_transposed(g, w) * w_t[:, None])
        return loss.write(t, loss_t * w_t), lse.write(t, lse_t), dh, dkernel, dbias

    sum_shape = (
        [features, num_classes] if fused else [features // step, step * num_classes]
    )
    *arrays, dkernel, dbias = _loop(
        blocks,
        body,
        *(
            tf.TensorArray(dtype, size=blocks, element_shape=shape)
            for shape in ([rows], [rows], [rows, features])
        ),
        _zeros_after(labels, sum_shape, dtype)
        if xla
        else tf.raw_ops.Empty(shape=sum_shape, dtype=dtype, init=True),
        None if b is None else _zeros_after(labels, [num_classes], dtype),
    )
    loss, lse, dh = (
        tf.reshape(a.stack(), [-1] + s)[:tokens]
        for a, s in zip(arrays, ([], [], [features]))
    )
    dkernel = tf.reshape(dkernel, [features, num_classes])
    return loss, lse, (dh, dkernel) + (() if b is None else (dbias,))


def _times_transposed(g, w):
    """`g @ w^T` as a batch of one: oneDNN's batched kernel takes 0.33 s where
    its plain one takes 0.41 s for a block (512 x 131,072 by 131,072 x 1,024)."""
    return tf.matmul(g[None], w[None], transpose_b=True)[0]


def _block(h, labels, w, b, smoothing):
    """`(loss, lse, g)` of a block of tokens with all classes, unweighted:
    `g = p - s / V - (1 - s) onehot(y)`, from TensorFlow's fused sparse
    cross-entropy kernel (the loss and `p - onehot(y)` in one pass)."""
    logits = tf.matmul(h, w)
    if b is not None:
        logits += b
    picked = tf.gather(logits, labels[:, None], batch_dims=1)[:, 0]
    if smoothing:
        row_mean = tf.reduce_mean(logits, axis=1)
    # After the reads of the logits, so that the kernel can write `g` over them.
    with tf.control_dependencies([picked] + ([row_mean] if smoothing else [])):
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


def _fuses_accumulation(dtype):
    """Whether Grappler fuses `_add_fused`'s ops into oneDNN's kernel: a float32
    graph, the remapper on, oneDNN's CPU kernels (a GPU's do not fuse)."""
    off = tf.config.optimizer.get_experimental_options()
    remaps = off.get("remapping", True) and not off.get("disable_meta_optimizer")
    cpu = onednn_enabled() and not tf.config.list_logical_devices("GPU")
    return dtype == tf.float32 and not tf.executing_eagerly() and remaps and cpu


def _add_fused(g, h, weights, dkernel, zeros):
    """`dkernel + (weights h)^T g` as one oneDNN op, in place (module
    docstring). Weighted after the transpose, which Grappler would otherwise
    fold into `transpose_a`: a product it fuses that oneDNN then refuses."""
    return tf.nn.bias_add(tf.matmul(tf.transpose(h) * weights, g), zeros) + dkernel


def _add_rows(g, weighted, dkernel, step, xla):
    """`dkernel + weighted^T g`, `step` rows at a time, in place: `dkernel`
    is `dW` viewed as `[D / step, step * V]` (module docstring)."""

    def body(k, dkernel):
        h_k = tf.slice(weighted, [0, k * step], [-1, step])
        product = tf.reshape(tf.matmul(h_k, g, transpose_a=True), [1, -1])
        if xla:
            return (tf.tensor_scatter_nd_add(dkernel, k[None, None], product),)
        return (tf.raw_ops.InplaceAdd(x=dkernel, i=k[None], v=product),)

    return _loop(weighted.shape[1] // step, body, dkernel)[0]
