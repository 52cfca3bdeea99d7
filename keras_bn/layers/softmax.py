"""`Softmax` layer: a drop-in for `keras.layers.Softmax` on `keras_bn.ops`."""

import keras
import tensorflow as tf

from keras_bn._internals import set_keras_logits
from keras_bn.ops.checks import check_axis
from keras_bn.ops.checks import check_not_ragged
from keras_bn.ops.softmax_ops import softmax_over

_DENSE_HINT = (
    "Pad it to a dense tensor (`inputs.to_tensor()`) and pass the padding as `mask`."
)


def _check_mask_shape(mask, inputs):
    if mask.shape.rank > inputs.shape.rank:
        raise ValueError(
            "The `mask` must be broadcastable to `inputs` and must not have "
            f"more dimensions. Received: inputs.shape={inputs.shape}, "
            f"mask.shape={mask.shape}"
        )
    for m_dim, i_dim in zip(mask.shape[::-1], inputs.shape[::-1]):
        if m_dim is not None and i_dim is not None and m_dim not in (1, i_dim):
            raise ValueError(
                "The `mask` must be broadcastable to `inputs`. Each mask "
                "dimension must be 1 or match the corresponding input "
                f"dimension. Received: inputs.shape={inputs.shape}, "
                f"mask.shape={mask.shape}"
            )


@keras.saving.register_keras_serializable(package="keras_bn")
class Softmax(keras.layers.Layer):
    r"""Softmax activation layer, with a hand-written gradient.

    ```
    y = exp(x - max(x)) / sum(exp(x - max(x)))     over `axis`
    ```

    A drop-in for `keras.layers.Softmax`, computed by `keras_bn.ops.softmax`
    (backward pass `dx = y * (dy - sum(dy * y))`). Masking follows Keras:
    masked positions (mask False, or <= 0.5 for a numeric mask) are replaced by
    a large negative number (-3e4 in float16, -1e9 otherwise) before the
    softmax and set to 0 after it, so an entirely masked slice gives zeros.
    Without a mask and with a single axis, the output carries its logits, so
    Keras's cross-entropy losses (and `keras_bn.losses`) with
    `from_logits=False` use them, exactly as for Keras's layer.

    Args:
        axis: Integer, or list of distinct integers, the axis (axes) along
            which the softmax normalization is applied. Floats (`1.5`) and
            strings (`"1"`) raise a TypeError, a repeated axis a ValueError.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: The inputs (logits) to the softmax layer: a dense tensor
            (ragged and sparse tensors raise a ValueError).
        mask: Optional boolean mask broadcastable to `inputs` (each dimension
            1 or that of `inputs`): True (or > 0.5) keeps a position.

    Returns:
        Softmaxed output with the same shape as `inputs`.

    Example:

    >>> Softmax()(np.array([1.0, 2.0, 1.0]))
    <tf.Tensor: shape=(3,), dtype=float32, numpy=array([0.21194157, 0.5761169 ,
    0.21194157], dtype=float32)>
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis  # as given, as Keras keeps it (and `get_config` gives it)
        self._axis = check_axis(axis)
        self.supports_masking = True

    def __call__(self, inputs, *args, **kwargs):
        mask = kwargs.get("mask", args[0] if args else None)
        for name, value in (("inputs", inputs), ("mask", mask)):
            check_not_ragged(value, name, type(self).__name__, _DENSE_HINT)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, mask=None):
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            _check_mask_shape(mask, inputs)
            if mask.dtype != tf.bool:
                mask = tf.greater(mask, tf.cast(0.5, mask.dtype))
            # As Keras: a large negative number representable in the dtype.
            masked = -3e4 if inputs.dtype == tf.float16 else -1e9
            inputs = tf.where(mask, inputs, tf.cast(masked, inputs.dtype))
        outputs = softmax_over(inputs, self._axis)
        if mask is not None:
            # An entirely masked slice would otherwise be uniform.
            return tf.where(mask, outputs, tf.zeros([], outputs.dtype))
        if isinstance(self._axis, int) or len(self._axis) == 1:
            # As Keras's softmax activation: losses look behind the softmax.
            set_keras_logits(outputs, inputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}
