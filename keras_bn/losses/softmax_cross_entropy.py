"""`SoftmaxCrossEntropy`: softmax cross-entropy on logits, with class weights
and their weighted mean (the rest of the Keras contract is in `base.py`)."""

import math
import operator

import keras
import numpy as np
import tensorflow as tf

from keras_bn._internals import keras_mask
from keras_bn._internals import set_keras_mask
from keras_bn.losses.base import BaseLoss
from keras_bn.losses.base import logits_behind
from keras_bn.losses.base import sparse_class_ids
from keras_bn.losses.base import squeeze_or_expand_to_same_rank
from keras_bn.ops import cross_entropy
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_label_smoothing
from keras_bn.ops.checks import check_optional_int
from keras_bn.ops.checks import checked_at_run_time

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _times(x, weight):
    """`x * weight` aligned as Keras aligns a loss and its weight (a trailing
    size-1 axis squeezed or added, then broadcasting)."""
    x, weight = squeeze_or_expand_to_same_rank(x, weight)
    return x * weight


def _class_weighted_mean(losses, weights, sample_weight, mask, reduction):
    """The mean of `losses` (class weights `weights` applied; None: all 1):
    `sum(losses * sample_weight * mask) / sum(w * mask)`, or over `sum(w *
    sample_weight * mask)` for "mean_with_sample_weight" (docs/losses.md)."""
    dtype = losses.dtype
    weights = tf.ones_like(losses) if weights is None else weights
    mask = tf.cast(1.0 if mask is None else mask, dtype)  # None: a scalar 1
    sample_weight = tf.cast(1.0 if sample_weight is None else sample_weight, dtype)
    merged = _times(mask, sample_weight)
    spread = _times(mask, tf.ones_like(sample_weight))  # `w` broadcasts as losses
    counted_by = merged if reduction == "mean_with_sample_weight" else spread
    total = tf.reduce_sum(_times(losses, merged))
    count = tf.reduce_sum(_times(weights, counted_by))
    loss = tf.math.divide_no_nan(total, count)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * (1.0 / replicas) if replicas > 1 else loss  # as Keras scales it


@keras.saving.register_keras_serializable(package="keras_bn")
class SoftmaxCrossEntropy(BaseLoss):
    r"""Softmax cross-entropy on logits, dense or sparse labels, class weights.

    Per example, `loss = -sum_c t_c * log(softmax(logits)_c)` over `axis`,
    with `t` the labels (`onehot(label)` for sparse labels) smoothed to
    `(1 - s) * t + s / C`, `C` the size of `axis`; computed by
    `keras_bn.ops.cross_entropy`, with hand-written gradients.

    **Class weights** (PyTorch's `weight`) scale each example by the weight
    of its true class, and the mean reductions divide by the sum of those
    weights, `sum(w_i * l_i) / sum(w_i)`. Examples labelled `ignore_class` get
    loss 0 and gradient 0 and are left out of the mean, as in Keras. Details
    (soft labels, sample weights, empty batches): `docs/losses.md`.

    Args:
        sparse: Whether labels are integer class ids (shaped as the logits
            without `axis`, or with a size-1 `axis`) rather than
            distributions over the classes (shaped as the logits).
        label_smoothing: Float in [0, 1].
        axis: The logits' class axis (e.g. `1` for channels-first segmentation).
        ignore_class: Optional int label to ignore (sparse labels only).
        class_weight: Optional non-negative weights, one per class: a list,
            or a dict `{class_id: weight}` as `Model.fit(class_weight=...)`
            takes it (ids it leaves out, up to the largest, get 1.0). Stored
            as the list, whose length must be the number of classes.
        reduction: One of Keras's reductions: "sum_over_batch_size", "sum",
            "mean", "mean_with_sample_weight", "none" or None.
        name: Name of the loss.
        dtype: The dtype of the loss computations (Keras's `dtype`); None
            means `keras.config.floatx()`.

    Call arguments:
        y_true: The labels.
        y_pred: The logits. As in Keras, the output of its softmax activation or
            of a `Softmax` layer is replaced by its logits, with a warning.
        sample_weight: Optional weights, broadcast against the per-example
            losses (see above). Ragged or sparse inputs raise a ValueError.

    Returns:
        The reduced loss (a scalar), or the per-example losses for
        `reduction=None`/"none" (class weights applied).

    Example:

    >>> loss = SoftmaxCrossEntropy(sparse=True, class_weight=[1.0, 3.0])
    >>> logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    >>> round(float(loss([0, 1], logits)), 4)
    0.1269
    """

    config_keys = ("sparse", "label_smoothing", "axis", "ignore_class", "class_weight")

    def __init__(
        self,
        sparse=False,
        label_smoothing=0.0,
        axis=-1,
        ignore_class=None,
        class_weight=None,
        reduction="sum_over_batch_size",
        name="softmax_cross_entropy",
        dtype=None,
    ):
        super().__init__(name, reduction, dtype, axis)
        self.sparse = check_bool(sparse, "sparse")
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.ignore_class = check_optional_int(ignore_class, "ignore_class")
        if self.ignore_class is not None and not self.sparse:
            raise ValueError(
                "`ignore_class` applies to sparse labels only: pass sparse=True. "
                f"Received: ignore_class={ignore_class}, sparse={sparse}"
            )
        self.class_weight = _check_class_weight(class_weight)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Without class and sample weights Keras's mean is the same rule.
        unweighted = self.class_weight is None and sample_weight is None
        if unweighted or self.reduction not in _MEAN_REDUCTIONS:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        self._check_dense(y_true, y_pred, sample_weight)
        mask = keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = keras.ops.convert_to_tensor(y_pred, dtype=self.dtype)
            y_true = keras.ops.convert_to_tensor(y_true, dtype=self.dtype)
            losses, weights, valid = self._losses_and_weights(y_true, y_pred)
            if valid is not None:
                mask = valid if mask is None else tf.cast(mask, tf.bool) & valid
            return _class_weighted_mean(
                losses, weights, sample_weight, mask, self.reduction
            )

    def call(self, y_true, y_pred):
        losses, _, valid = self._losses_and_weights(y_true, y_pred)
        if valid is not None:
            set_keras_mask(losses, valid)
        return losses

    def _losses_and_weights(self, y_true, y_pred):
        """Per-example losses (class weights applied), the class weights (or
        None) and the mask of labels not ignored (or None)."""
        y_pred = tf.convert_to_tensor(y_pred)
        logits, _ = logits_behind(y_pred, True, "softmax_cross_entropy")
        axis = self.axis
        weights = valid = None
        if self.sparse:
            labels = sparse_class_ids(y_true, logits, axis)
            losses = cross_entropy.sparse(
                labels, logits, axis, self.label_smoothing, self.ignore_class
            )
            if self.ignore_class is not None:
                valid = tf.not_equal(labels, self.ignore_class)
        else:
            labels = tf.cast(y_true, logits.dtype)
            losses = cross_entropy.dense(labels, logits, axis, self.label_smoothing)
        if self.class_weight is not None:
            weights = self._example_weights(labels, logits, losses.dtype)
            losses *= weights
        return losses, weights, valid

    def _example_weights(self, labels, logits, dtype):
        entries = len(self.class_weight)
        num_classes = logits.shape[self.axis]
        if num_classes is not None and num_classes != entries:
            raise ValueError(
                f"`class_weight` has {entries} entries but the logits have "
                f"{num_classes} classes along axis {self.axis} (a dict gives "
                "the classes up to its largest key). "
                f"Received: logits.shape={logits.shape.as_list()}"
            )
        table = tf.constant(self.class_weight, dtype)
        if num_classes is None:
            table = _checked_table(table, tf.shape(logits)[self.axis], self.axis)
        if self.sparse:
            return tf.gather(table, tf.clip_by_value(labels, 0, entries - 1))
        return tf.tensordot(tf.cast(labels, dtype), table, [[self.axis], [0]])


def _checked_table(table, num_classes, axis):
    """`table`, one weight per class, once the class count known only at run
    time matches it: else an `InvalidArgumentError` naming `class_weight` in a
    graph, and (as XLA drops assertions) NaN weights, never a reused one."""
    entries = table.shape[0]
    matches = tf.equal(num_classes, entries)
    message = (
        f"`class_weight` has {entries} entries, which must equal the number "
        f"of classes (the size of the logits' axis {axis})"
    )
    table = checked_at_run_time(table, matches, message)
    # One entry per class whatever the count, so that dense labels broadcast.
    fitted = tf.gather(table, tf.minimum(tf.range(num_classes), entries - 1))
    return tf.where(matches, fitted, tf.constant(math.nan, table.dtype))


def _check_class_weight(class_weight):
    """None, or the weights as a list of floats; a dict's missing ids up to
    the largest get 1.0, as `Model.fit(class_weight=...)` fills them."""
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):
        ids = {}
        for key, weight in class_weight.items():
            if isinstance(key, (bool, np.bool_)) or not hasattr(key, "__index__"):
                raise TypeError(
                    "`class_weight` given as a dict must map int class ids to "
                    f"weights. Received: class_weight={class_weight!r}"
                )
            ids[operator.index(key)] = weight
        if not ids or min(ids) < 0:
            raise ValueError(
                "`class_weight` given as a dict must map class ids >= 0 to "
                "weights and name at least one class. "
                f"Received: class_weight={class_weight!r}"
            )
        class_weight = [ids.get(c, 1.0) for c in range(max(ids) + 1)]
    try:  # strings and sets are refused by their array's dtype or rank
        values = np.asarray(class_weight)
    except (TypeError, ValueError):  # ragged nesting
        values = None
    if values is None or values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(
            "`class_weight` must be a list of floats, one per class, or a dict "
            f"{{class_id: weight}}. Received: class_weight={class_weight!r}"
        )
    values = [float(w) for w in values]
    if not values or not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(
            "`class_weight` must be a non-empty list of finite, non-negative "
            f"floats. Received: class_weight={class_weight!r}"
        )
    return values
