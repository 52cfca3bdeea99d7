"""Drop-in replacements for Keras's categorical cross-entropy losses, on the
ops of `keras_bn.ops.cross_entropy`; where they differ from Keras, on
purpose: `docs/losses.md`."""

import warnings

import keras
import tensorflow as tf

from keras_bn._internals import set_keras_mask
from keras_bn.losses.base import BaseLoss
from keras_bn.losses.base import logits_behind
from keras_bn.losses.base import sparse_class_ids
from keras_bn.losses.base import squeeze_or_expand_to_same_rank
from keras_bn.ops import cross_entropy
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_clipping_epsilon
from keras_bn.ops.checks import check_label_smoothing
from keras_bn.ops.checks import check_optional_int


@keras.saving.register_keras_serializable(package="keras_bn")
class CategoricalCrossentropy(BaseLoss):
    r"""Cross-entropy between one-hot (or soft) labels and predictions.

    A drop-in for `keras.losses.CategoricalCrossentropy`. Per example, over
    the class axis, with the labels smoothed to `t = (1 - s) * y_true + s / C`
    (`C` the size of `axis`):

    ```
    from_logits=True:   loss = -sum_c t_c * log_softmax(y_pred)_c
    from_logits=False:  loss = -sum_c t_c * log(clip(y_pred_c / sum(y_pred),
                                                     eps, 1 - eps))
    ```

    with `eps = keras.config.epsilon()`. As in Keras, a `y_pred` produced by a
    softmax activation (or a `Softmax` layer) is replaced by its logits.

    Args:
        from_logits: True (`y_pred` holds logits) or False (probabilities).
        label_smoothing: Float in [0, 1], the `s` above.
        axis: The class axis.
        reduction: One of Keras's reductions: "sum_over_batch_size", "sum",
            "mean", "mean_with_sample_weight", "none" or None.
        name: Name of the loss.
        dtype: The loss computations' dtype (None: `keras.config.floatx()`).

    Call arguments:
        y_true: Labels, shaped as `y_pred`.
        y_pred: Logits or probabilities.
        sample_weight: Optional per-example weights.

    Returns:
        The reduced loss, or the per-example losses for `reduction=None`.

    Example:

    >>> y_true = np.array([[0, 1, 0], [0, 0, 1]])
    >>> y_pred = np.array([[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    >>> round(float(CategoricalCrossentropy()(y_true, y_pred)), 3)
    1.177
    """

    config_keys = ("from_logits", "label_smoothing", "axis")

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction="sum_over_batch_size",
        name="categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(name, reduction, dtype, axis)
        self.from_logits = check_bool(from_logits, "from_logits")
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def call(self, y_true, y_pred):
        y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
        y_true = tf.cast(y_true, y_pred.dtype)
        if y_pred.shape[-1] == 1:
            warnings.warn(
                "In loss categorical_crossentropy, expected y_pred.shape to be "
                "(batch_size, num_classes) with num_classes > 1. Received: "
                f"y_pred.shape={y_pred.shape}. Consider using "
                "'binary_crossentropy' if you only have 2 classes.",
                SyntaxWarning,
                stacklevel=2,
            )
        y_pred, from_logits = logits_behind(
            y_pred, self.from_logits, "categorical_crossentropy"
        )
        args = (y_true, y_pred, self.axis, self.label_smoothing)
        if from_logits:
            return cross_entropy.dense(*args)
        epsilon = check_clipping_epsilon(keras.config.epsilon())  # per call, as Keras
        return cross_entropy.dense_from_probabilities(*args, epsilon)


@keras.saving.register_keras_serializable(package="keras_bn")
class SparseCategoricalCrossentropy(BaseLoss):
    r"""Cross-entropy between integer labels and predictions.

    A drop-in for `keras.losses.SparseCategoricalCrossentropy`. Per example,
    with `y` the class id and `eps = keras.config.epsilon()`:

    ```
    from_logits=True:   loss = -log_softmax(y_pred)_y
    from_logits=False:  loss = -log(q_y) + log(sum_c q_c),
                        q = clip(y_pred, eps, 1 - eps)
    ```

    No one-hot tensor is built. Examples labelled `ignore_class` get loss 0,
    zero gradient and are left out of the mean (Keras marks them with a mask);
    a batch where every label is ignored gives 0. Unlike Keras's, any class
    `axis` works (channels-first segmentation).

    Args:
        from_logits: True (`y_pred` holds logits) or False (probabilities).
        ignore_class: Optional int label to ignore, e.g. a "void" class (-1 or
            255) in segmentation maps.
        reduction: One of Keras's reductions: "sum_over_batch_size", "sum",
            "mean", "mean_with_sample_weight", "none" or None.
        axis: The class axis of `y_pred`.
        name: Name of the loss.
        dtype: The loss computations' dtype (None: `keras.config.floatx()`).

    Call arguments:
        y_true: Class ids, shaped as `y_pred` without `axis` (or with a size-1
            `axis`).
        y_pred: Logits or probabilities.
        sample_weight: Optional per-example weights.

    Returns:
        The reduced loss, or the per-example losses for `reduction=None`.

    Example:

    >>> y_true = np.array([1, 2])
    >>> y_pred = np.array([[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    >>> round(float(SparseCategoricalCrossentropy()(y_true, y_pred)), 3)
    1.177
    """

    config_keys = ("from_logits", "ignore_class", "axis")

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction="sum_over_batch_size",
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(name, reduction, dtype, axis)
        self.from_logits = check_bool(from_logits, "from_logits")
        self.ignore_class = check_optional_int(ignore_class, "ignore_class")

    def call(self, y_true, y_pred):
        y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
        labels = sparse_class_ids(y_true, y_pred, self.axis)
        from_logits = self.from_logits
        if self.ignore_class is None:
            # Keras looks behind a softmax only without an ignored class.
            y_pred, from_logits = logits_behind(
                y_pred, from_logits, "sparse_categorical_crossentropy"
            )
        args = (labels, y_pred, self.axis, 0.0, self.ignore_class)
        if from_logits:
            losses = cross_entropy.sparse(*args)
        else:
            epsilon = check_clipping_epsilon(keras.config.epsilon())
            losses = cross_entropy.sparse_from_probabilities(*args, epsilon)
        if self.ignore_class is not None:
            set_keras_mask(losses, tf.not_equal(labels, self.ignore_class))
        return losses
