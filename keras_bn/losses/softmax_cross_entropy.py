"""`SoftmaxCrossEntropy`: softmax cross-entropy on logits, with class weights.

The per-example loss comes from `keras_bn.ops.cross_entropy`; this module adds
the Keras contract (sample weights, masks, reductions, serialization) and the
class weights. The Keras-contract plumbing it shares with the Keras drop-ins
lives in `base.py`.
"""

import math
import operator

import keras
import numpy as np
import tensorflow as tf

from keras_bn._internals import keras_mask
from keras_bn._internals import set_keras_mask
from keras_bn.losses.base import check_dense_loss_inputs
from keras_bn.losses.base import dtype_config
from keras_bn.losses.base import logits_behind
from keras_bn.losses.base import sparse_class_ids
from keras_bn.losses.base import squeeze_or_expand_to_same_rank
from keras_bn.ops import cross_entropy
from keras_bn.ops.checks import check_axis
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_label_smoothing
from keras_bn.ops.checks import check_optional_int

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _times(x, weight):
    """`x * weight` aligned as Keras aligns a loss and its weight: a trailing
    size-1 axis squeezed or added, then NumPy broadcasting."""
    if weight is None:
        return x
    x, weight = squeeze_or_expand_to_same_rank(x, weight)
    return x * weight


def _class_weighted_mean(losses, weights, sample_weight, mask, reduction):
    """Mean of weighted losses by one broadcasting rule.

    `losses` already include the class weights `weights` (None: no class
    weights, `w = 1`). The mask and the sample weight are aligned with the
    losses as Keras aligns them, and every entry of their broadcast product
    `losses * sample_weight * mask` is one term, counted with the class weight
    `w` of its example; all sums run over that broadcast shape:

        sum(losses * sample_weight * mask) / sum(w * mask)
            for "sum_over_batch_size" and "mean" (PyTorch's weighted mean),
        sum(losses * sample_weight * mask) / sum(w * sample_weight * mask)
            for "mean_with_sample_weight".

    With `w = 1` this is Keras's reduction, except that Keras's
    "mean_with_sample_weight" sums a sample weight before broadcasting it (a
    `(B, 1)` weight on `(B, T)` losses counts each example once, not `T`
    times). The result is scaled for distribution as Keras scales it.
    """
    dtype = losses.dtype
    if weights is None:
        weights = tf.ones_like(losses)
    mask = None if mask is None else tf.cast(mask, dtype)
    sample_weight = None if sample_weight is None else tf.cast(sample_weight, dtype)
    if sample_weight is None:
        merged = spread = mask
    else:
        ones = tf.ones_like(sample_weight)
        merged = sample_weight if mask is None else _times(mask, sample_weight)
        spread = ones if mask is None else _times(mask, ones)
    # `spread` has the shape of `merged`: `w` broadcasts as the losses do.
    counted_by = merged if reduction == "mean_with_sample_weight" else spread
    total = tf.reduce_sum(_times(losses, merged))
    count = tf.reduce_sum(_times(weights, counted_by))
    loss = tf.math.divide_no_nan(total, count)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss *= 1.0 / replicas
    return loss


@keras.saving.register_keras_serializable(package="keras_bn")
class SoftmaxCrossEntropy(keras.losses.Loss):
    r"""Softmax cross-entropy on logits, dense or sparse labels, class weights.

    Per example, with `p = softmax(logits)` over `axis` and `t` the target
    distribution (the labels, or `onehot(label)` for sparse labels, smoothed
    to `(1 - s) * t + s / C` with `C` the size of `axis`):

    ```
    loss = -sum_c t_c * log(p_c)
    ```

    computed with one log-sum-exp per example and hand-written gradients
    (`keras_bn.ops.cross_entropy`).

    **Class weights** (PyTorch's `weight`): each example is scaled by the
    weight of its true class, `w[label]`, and the mean reductions divide by
    the sum of those weights instead of the number of examples:
    `sum(w_i * l_i) / sum(w_i)` over the examples that are not masked or
    ignored. For dense (soft) labels the example weight is `sum_c w_c *
    labels_c`, taken on the unsmoothed labels (PyTorch instead weights each
    class term and divides by the batch size). Sample weights multiply the
    numerator; with "mean_with_sample_weight" the denominator is
    `sum(w_i * sample_weight_i)`. A batch with nothing to count gives 0.

    **Sample weights** broadcast by one rule, with or without class weights:
    aligned with the per-example losses as Keras aligns them (a trailing
    size-1 axis squeezed or added, then NumPy broadcasting), every entry of
    the broadcast product `losses * sample_weight` is one term, and the
    denominators above sum over those entries. A `(B, B)` weight on `B`
    losses thus gives `B * B` terms and the mean divides by `B * B` (times
    the class weights), as Keras's mean does. Keras's
    "mean_with_sample_weight" instead sums a weight before broadcasting it;
    here a `(B, 1)` weight on `(B, T)` losses counts `T` terms per example.

    **Ignored labels** (sparse only): examples whose label is `ignore_class`
    get loss 0 and gradient 0 and are left out of the mean, as in Keras; a
    batch where every label is ignored gives loss 0. Labels outside
    `[0, C)` raise a ValueError in eager mode and give a NaN loss in a
    `tf.function` or under XLA (see `keras_bn.ops.cross_entropy`).

    Args:
        sparse: Whether labels are integer class ids (shaped as the logits
            without `axis`, or with a size-1 `axis`) rather than
            distributions over the classes (shaped as the logits).
        label_smoothing: Float in [0, 1].
        axis: The class axis of the logits (e.g. `1` for channels-first
            segmentation).
        ignore_class: Optional int label to ignore (sparse labels only).
        class_weight: Optional non-negative weights, one per class: a list
            (entry `c` for class `c`), or a dict `{class_id: weight}` as
            `Model.fit(class_weight=...)` takes it, where classes from 0 to
            the largest key that the dict leaves out get weight 1.0 (as in
            Keras). Stored (and serialized) as the list. The number of
            entries must equal the number of classes: a ValueError when the
            class axis is known while tracing; otherwise a run-time check,
            an `InvalidArgumentError` naming `class_weight` in a
            `tf.function`, and under XLA (which drops run-time assertions) a
            NaN loss and NaN gradients, never a silently reused weight.
        reduction: One of Keras's reductions: "sum_over_batch_size", "sum",
            "mean", "mean_with_sample_weight", "none" or None.
        name: Name of the loss.
        dtype: The dtype of the loss computations (Keras's `dtype`); None
            means `keras.config.floatx()`.

    Call arguments:
        y_true: The labels.
        y_pred: The logits. The output of a Keras softmax activation or of a
            `Softmax` layer is replaced by its logits, with a warning, as in
            Keras.
        sample_weight: Optional weights, broadcast against the per-example
            losses (see above). Ragged or sparse `y_true`, `y_pred` or
            `sample_weight` raise a ValueError.

    Returns:
        The reduced loss (a scalar), or the per-example losses for
        `reduction=None`/"none" (class weights applied).

    Example:

    >>> loss = SoftmaxCrossEntropy(sparse=True, class_weight=[1.0, 3.0])
    >>> logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    >>> round(float(loss([0, 1], logits)), 4)
    0.1269
    """

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
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.sparse = check_bool(sparse, "sparse")
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.axis = check_axis(axis, single=True)
        self.ignore_class = check_optional_int(ignore_class, "ignore_class")
        if self.ignore_class is not None and not self.sparse:
            raise ValueError(
                "`ignore_class` applies to sparse labels only: pass sparse=True. "
                f"Received: ignore_class={ignore_class}, sparse={sparse}"
            )
        self.class_weight = _check_class_weight(class_weight)
        self.dtype_config = dtype_config(dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        check_dense_loss_inputs(self, y_true, y_pred, sample_weight)
        # Without class and sample weights Keras's mean is the same rule.
        unweighted = self.class_weight is None and sample_weight is None
        if unweighted or self.reduction not in _MEAN_REDUCTIONS:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        in_mask = keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = keras.ops.convert_to_tensor(y_pred, dtype=self.dtype)
            y_true = keras.ops.convert_to_tensor(y_true, dtype=self.dtype)
            losses, weights, valid = self._losses_and_weights(y_true, y_pred)
            mask = in_mask
            if valid is not None:
                mask = (
                    valid
                    if mask is None
                    else tf.logical_and(tf.cast(mask, tf.bool), valid)
                )
            if weights is not None:
                losses *= weights
            return _class_weighted_mean(
                losses, weights, sample_weight, mask, self.reduction
            )

    def call(self, y_true, y_pred):
        losses, weights, valid = self._losses_and_weights(y_true, y_pred)
        if weights is not None:
            losses *= weights
        if valid is not None:
            set_keras_mask(losses, valid)
        return losses

    def _losses_and_weights(self, y_true, y_pred):
        """Per-example losses, class weights (or None), valid mask (or None)."""
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
            ids = tf.clip_by_value(labels, 0, len(self.class_weight) - 1)
            return tf.gather(table, ids)
        shape = [1] * logits.shape.rank
        shape[self.axis] = -1
        weighted = tf.cast(labels, dtype) * tf.reshape(table, shape)
        return tf.reduce_sum(weighted, axis=self.axis)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sparse": self.sparse,
                "label_smoothing": self.label_smoothing,
                "axis": self.axis,
                "ignore_class": self.ignore_class,
                "class_weight": self.class_weight,
                "dtype": self.dtype_config,
            }
        )
        return config


def _checked_table(table, num_classes, axis):
    """`table` once the class count, known only at run time, matches it.

    In a graph the assertion raises an `InvalidArgumentError` naming
    `class_weight`. XLA drops assertions, so a mismatch also turns every
    weight into NaN: the loss and its gradients are NaN, not a weight reused
    for a class it does not belong to. Returns one weight per class.
    """
    entries = table.shape[0]
    check = tf.debugging.assert_equal(
        num_classes,
        tf.constant(entries, num_classes.dtype),
        message=(
            f"`class_weight` has {entries} entries, which must equal the number "
            f"of classes (the size of the logits' axis {axis})"
        ),
    )
    with tf.control_dependencies([check]):
        table = tf.identity(table)
    # One entry per class whatever the count, so that dense labels broadcast.
    fitted = tf.gather(table, tf.minimum(tf.range(num_classes), entries - 1))
    return tf.where(
        tf.equal(num_classes, entries), fitted, tf.constant(math.nan, table.dtype)
    )


def _class_weight_from_dict(class_weight):
    """A `{class_id: weight}` dict as a list; missing ids up to the largest
    get 1.0, as `Model.fit(class_weight=...)` fills them."""
    ids = {}
    for key in class_weight:
        try:
            if isinstance(key, (bool, np.bool_)):
                raise TypeError
            ids[operator.index(key)] = class_weight[key]
        except TypeError:
            raise TypeError(
                "`class_weight` given as a dict must map int class ids to "
                f"weights. Received: class_weight={class_weight!r}"
            ) from None
    if not ids or min(ids) < 0:
        raise ValueError(
            "`class_weight` given as a dict must map class ids >= 0 to weights "
            f"and name at least one class. Received: class_weight={class_weight!r}"
        )
    return [ids.get(c, 1.0) for c in range(max(ids) + 1)]


def _check_class_weight(class_weight):
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):
        class_weight = _class_weight_from_dict(class_weight)
    values = None
    if not isinstance(class_weight, (str, bytes, set, frozenset)):
        try:
            values = np.asarray(class_weight)
        except (TypeError, ValueError):  # ragged nesting
            pass
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
