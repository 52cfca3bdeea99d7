"""The Keras-loss plumbing shared by keras_bn's losses: their base class,
Keras's alignment of sample weights and masks, and its rule for reading the
logits behind a softmax."""

import warnings

import keras
import tensorflow as tf

from keras_bn._internals import keras_logits
from keras_bn.ops.checks import check_axis
from keras_bn.ops.checks import check_not_ragged

_DENSE_HINT = (
    "Pad it to a dense tensor (`.to_tensor()`) and give the padding zero "
    "`sample_weight` (or an `ignore_class` label)."
)


class BaseLoss(keras.losses.Loss):
    """A `keras.losses.Loss` over one class `axis` that refuses ragged and
    sparse inputs, and whose config holds the attributes named in
    `config_keys` and `dtype` as given."""

    config_keys = ()

    def __init__(self, name, reduction, dtype, axis):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.axis = check_axis(axis, single=True)
        if dtype is not None and not isinstance(dtype, str):
            dtype = keras.dtype_policies.serialize(dtype)  # JSON-friendly
        self.dtype_config = dtype

    def __call__(self, y_true, y_pred, sample_weight=None):
        self._check_dense(y_true, y_pred, sample_weight)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _check_dense(self, y_true, y_pred, sample_weight):
        """Refuses ragged and sparse labels, predictions and sample weights."""
        values = (y_true, y_pred, sample_weight)
        for name, value in zip(("y_true", "y_pred", "sample_weight"), values):
            check_not_ragged(value, name, type(self).__name__, _DENSE_HINT)

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in self.config_keys})
        config["dtype"] = self.dtype_config
        return config


def squeeze_or_expand_to_same_rank(x1, x2):
    """Keras's alignment of two tensors whose ranks differ by a trailing 1."""
    x1, x2 = tf.convert_to_tensor(x1), tf.convert_to_tensor(x2)
    rank1, rank2 = x1.shape.rank, x2.shape.rank
    if rank1 == rank2 + 1 and x1.shape[-1] == 1:
        return (x1, tf.expand_dims(x2, -1)) if rank2 == 1 else (tf.squeeze(x1, -1), x2)
    if rank2 == rank1 + 1 and x2.shape[-1] == 1:
        return (tf.expand_dims(x1, -1), x2) if rank1 == 1 else (x1, tf.squeeze(x2, -1))
    return x1, x2


def logits_behind(y_pred, from_logits, fn_name):
    """Keras's rule: the output of a softmax is replaced by its logits.

    A tensor whose logits `keras.activations.softmax` or a `Softmax` layer
    recorded (`keras_logits`), or the output of a `Softmax` graph op, gives its
    logits and `from_logits=True`. Returns `(tensor, from_logits)`.
    """
    logits = keras_logits(y_pred)
    if logits is None and tf.is_symbolic_tensor(y_pred) and y_pred.op.type == "Softmax":
        logits = y_pred.op.inputs[0]
    if logits is None:
        return y_pred, from_logits
    if from_logits:
        warnings.warn(
            f'"`{fn_name}` received `from_logits=True`, but the `output` '
            "argument was produced by a Softmax activation and thus does not "
            'represent logits. Was this intended?"',
            stacklevel=3,
        )
    return logits, True


def sparse_class_ids(y_true, y_pred, axis):
    """Class ids as int64, a size-1 class axis of `y_true` squeezed away."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == y_pred.shape.rank and y_true.shape[axis] == 1:
        y_true = tf.squeeze(y_true, axis)
    return tf.cast(y_true, tf.int64)
