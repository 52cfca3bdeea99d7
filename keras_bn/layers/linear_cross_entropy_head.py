"""An output projection whose training loss never builds the logits."""

import keras
import tensorflow as tf

from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_int
from keras_bn.ops.checks import check_label_smoothing
from keras_bn.ops.checks import check_optional_int
from keras_bn.ops.checks import check_optional_positive_int
from keras_bn.ops.linear_cross_entropy import linear_softmax_cross_entropy


@keras.saving.register_keras_serializable(package="keras_bn")
class LinearCrossEntropyHead(keras.layers.Layer):
    """A language model's output layer: logits, or their loss without them.

    The layer owns the projection `logits = hidden @ kernel + bias` to `units`
    classes (a vocabulary), or reuses an `Embedding`'s matrix, transposed, as
    its kernel (weight tying).

    **Inference and generation**: `head(hidden)` returns the logits,
    `[..., units]`, in the compute dtype.

    **Training**: `head([hidden, labels])` returns the per-token softmax
    cross-entropy, shaped as `labels` (float32), computed by
    `keras_bn.ops.linear_softmax_cross_entropy`: the logits are never built,
    only chunks of them. A model that takes the labels as an input and
    returns this loss trains with plain `fit` and the pass-through loss
    `keras_bn.layers.per_token_loss`: Keras averages it. Tokens labelled
    `ignore_class` (padding) get loss 0 and are masked out of that average
    (the output carries a Keras mask), as with Keras's
    `SparseCategoricalCrossentropy(ignore_class=...)`.

    **The fast gradient** (`gradient_in_forward=True`): in training, the
    layer forms the gradients in its forward pass for an average with one
    weight per token, as `fit` takes it without `sample_weight` (three
    matrix products of the size of the logits instead of four). Per-token
    weights keep that path when they are a third input,
    `head([hidden, labels, weights])`, which returns `weights * loss`
    (Keras's average of it equals `fit` with `sample_weight=weights` on the
    unweighted loss). Any other upstream gradient, such as `fit`'s
    `sample_weight`, still gets the exact gradient, more slowly (about 1.5
    times the per-token path): keep the default there.

    Args:
        units: Number of classes (the vocabulary size). With
            `tied_embedding`, its `input_dim`.
        use_bias: Whether to add a bias per class.
        tied_embedding: Optional `keras.layers.Embedding` (or a subclass,
            such as keras-hub's `ReversibleEmbedding`) whose matrix,
            transposed, is the kernel. Not serialized: the model or layer that
            creates the head passes it again when it is rebuilt (see
            docs/large_vocabulary.md).
        label_smoothing: Float in [0, 1].
        ignore_class: Optional int, the label of padding tokens.
        chunk_size: Optional int, classes per chunk (default: automatic).
        gradient_in_forward: Whether training forms the gradients in the
            forward pass (see above). Default False: that path is faster
            but holds a block of tokens with every class (more memory; both
            measured in docs/performance.md), and is slower with `fit`'s
            `sample_weight`.
        kernel_initializer: Initializer of the kernel `[features, units]`.
        bias_initializer: Initializer of the bias.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `hidden`, a tensor `[..., features]`, or a list
            `[hidden, labels]` with int labels shaped as `hidden` without its
            last axis, or `[hidden, labels, weights]` with float per-token
            weights shaped as `labels` (not differentiated).
        training: Python bool; the fast gradient is used unless False.

    Returns:
        The logits `[..., units]` for `hidden` alone; the per-token loss,
        shaped as `labels`, for `[hidden, labels]` (times `weights` if
        given).

    Example:

    >>> head = LinearCrossEntropyHead(10)
    >>> hidden = tf.random.normal([2, 5, 8])
    >>> head(hidden).shape
    TensorShape([2, 5, 10])
    >>> head([hidden, tf.zeros([2, 5], tf.int32)]).shape
    TensorShape([2, 5])
    """

    def __init__(
        self,
        units,
        use_bias=True,
        tied_embedding=None,
        label_smoothing=0.0,
        ignore_class=None,
        chunk_size=None,
        gradient_in_forward=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_int(units, "units", positive=True)
        self.use_bias = check_bool(use_bias, "use_bias")
        if tied_embedding is not None and not isinstance(
            tied_embedding, keras.layers.Embedding
        ):
            raise TypeError(
                "Argument `tied_embedding` must be a keras.layers.Embedding (or "
                f"a subclass). Received: {tied_embedding!r}"
            )
        self.tied_embedding = tied_embedding
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.ignore_class = check_optional_int(ignore_class, "ignore_class")
        self.chunk_size = check_optional_positive_int(chunk_size, "chunk_size")
        self.gradient_in_forward = check_bool(
            gradient_in_forward, "gradient_in_forward"
        )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        hidden_shape = input_shape[0] if _is_pair(input_shape) else input_shape
        features = hidden_shape[-1]
        if self.tied_embedding is None:
            self.kernel = self.add_weight(
                name="kernel",
                shape=(features, self.units),
                initializer=self.kernel_initializer,
            )
        else:
            if not self.tied_embedding.built:
                self.tied_embedding.build((None,))
            shape = tuple(self.tied_embedding.embeddings.shape)
            if shape != (self.units, features):
                raise ValueError(
                    "`tied_embedding` must have embeddings of shape (units, "
                    f"features) = ({self.units}, {features}). Received: {shape}"
                )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer
            )

    def _kernel(self):
        if self.tied_embedding is None:
            return self.kernel.value
        return tf.transpose(self.tied_embedding.embeddings.value)

    def call(self, inputs, training=None):
        if not _is_pair(inputs):
            logits = tf.tensordot(inputs, tf.cast(self._kernel(), inputs.dtype), 1)
            if self.use_bias:
                logits += tf.cast(self.bias.value, logits.dtype)
            return logits
        hidden, labels = inputs[:2]
        weights = inputs[2] if len(inputs) == 3 else None
        kernel = self._kernel()
        # The op takes one dtype: the variables' (float32 under mixed
        # precision, the most exact; the op computes in float32 anyway).
        return linear_softmax_cross_entropy(
            tf.cast(labels, tf.int32) if labels.dtype.is_floating else labels,
            tf.cast(hidden, kernel.dtype),
            kernel,
            tf.cast(self.bias.value, kernel.dtype) if self.use_bias else None,
            self.label_smoothing,
            self.ignore_class,
            self.chunk_size,
            None if weights is None else tf.cast(weights, kernel.dtype),
            gradient_in_forward=self.gradient_in_forward and training is not False,
        )

    def compute_mask(self, inputs, previous_mask=None):
        if not _is_pair(inputs) or self.ignore_class is None:
            return None
        return keras.ops.not_equal(inputs[1], self.ignore_class)

    def compute_output_shape(self, input_shape):
        if _is_pair(input_shape):
            return tuple(input_shape[1])
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_output_spec(self, inputs):
        if _is_pair(inputs):
            return keras.KerasTensor(inputs[1].shape, dtype="float32")
        return keras.KerasTensor(
            tuple(inputs.shape[:-1]) + (self.units,), dtype=self.compute_dtype
        )

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "label_smoothing": self.label_smoothing,
            "ignore_class": self.ignore_class,
            "chunk_size": self.chunk_size,
            "gradient_in_forward": self.gradient_in_forward,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


def _is_pair(value):
    """Whether `value` is `[hidden, labels(, weights)]` or their shapes."""
    return (
        isinstance(value, (list, tuple))
        and len(value) in (2, 3)
        and not (isinstance(value[0], int) or value[0] is None)
    )


@keras.saving.register_keras_serializable(package="keras_bn")
def per_token_loss(y_true, y_pred):
    """The pass-through loss for a `LinearCrossEntropyHead` that returns the
    per-token loss: `y_pred` itself (`y_true` is ignored). Keras then weights
    it by `sample_weight`, masks padding and averages."""
    del y_true
    return y_pred
