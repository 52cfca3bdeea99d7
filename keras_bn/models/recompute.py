"""Population statistics of batch normalization, recomputed over data."""

import collections

import keras
import numpy as np
import tensorflow as tf

from keras_bn.models._data import Batches
from keras_bn.models._graph import check_graph_model
from keras_bn.models._graph import copy_model
from keras_bn.models._graph import reachable_batch_normalization
from keras_bn.ops import canonicalize_axes
from keras_bn.ops.checks import check_verbose

FUNCTION_NAME = "recompute_statistics"
Statistics = collections.namedtuple("Statistics", "count mean variance batches")
SUBCLASSED_ADVICE = (
    "For a subclassed model, use keras_bn.BatchNormalization(momentum=None) "
    "layers: set their `num_batches_tracked` to 0 and call the model with "
    "training=True on each batch; their cumulative averages are these "
    "statistics when all batches have the same size."
)


def recompute_statistics(model, data, steps=None, batch_size=None, verbose="auto"):
    r"""Sets batch normalization's moving statistics to population statistics.

    The inference step of Ioffe & Szegedy (2015, Algorithm 2, steps 8-11), as
    PreciseBN and SWA's `update_bn` do: the model runs in training mode over
    `data`, and each batch-normalization layer's moving statistics become the
    statistics of its inputs over all of it. Use it when the moving averages
    belong to other weights: after `keras.optimizers.Adam(use_ema=True)`
    swaps the averaged weights in at the end of `fit`, after weight averaging
    (SWA), or when the averages of a short run have not caught up.

    For each layer, with `x_b` its input on batch `b` and `n_b` the number of
    its positions per feature (examples times spatial positions; unmasked
    ones only; per virtual batch with `virtual_batch_size`):

        mean_b = sum(x_b) / n_b
        var_b  = sum((x_b - mean_b)^2) / n_b        ("biased", Keras's)
        var_b  = sum((x_b - mean_b)^2) / (n_b - 1)  ("unbiased"; n_b = 1: biased)

        moving_mean     = sum_b n_b * mean_b / sum_b n_b
        moving_variance = sum_b n_b * var_b  / sum_b n_b

    with the layer's own `moving_variance_estimator`. `moving_mean` is the
    mean over every position of every batch; a short last batch weighs less.
    `var_b` is the variance the layer normalizes with in training, within
    each batch (or virtual batch). Per batch the sums run in
    float32 in two passes (the mean, then squares of deviations from it);
    across batches they merge in float64 as running weighted means,
    `mean += n_b / (n_1 + ... + n_b) * (mean_b - mean)`.

    In training mode every layer behaves as in `fit`: each batch-normalization
    layer normalizes with its batch statistics, so a later layer's inputs are
    those of training (Algorithm 2 runs the training network); dropout and
    noise layers are active. Layers with `trainable=False` normalize with
    their moving statistics, as in `fit`, and keep them. The pass holds the
    renorm statistics fixed (the training output of `renorm=True` depends on
    them).

    No other weight changes: every variable of the model (including the
    statistics the layers update themselves during the pass, and seed
    states) is restored, and only then are the new statistics written. With
    `renorm=True`, `moving_stddev` and `renorm_stddev` become
    `sqrt(moving_variance + epsilon)` and `renorm_mean` becomes
    `moving_mean`. With `momentum=None`, `num_batches_tracked` becomes the
    number of batches the layer saw (per feature), so a cumulative average
    continues from them. The optimizer is not touched. If anything fails
    (bad data, a non-finite statistic, an interrupt), nothing changes.

    Under a `tf.distribute` strategy (the model's), each batch of `data` is a
    global batch and runs whole, in the cross-replica context: the statistics
    are those of the global batches, equal to a single-device run, and every
    replica receives them. (Later layers see inputs normalized with
    global-batch statistics, as with `synchronized=True`.) With
    `MultiWorkerMirroredStrategy`, give every worker the same data.

    Args:
        model: a built Sequential or Functional model (nested models
            included) with `keras.layers.BatchNormalization` or
            `keras_bn.BatchNormalization` layers.
        data: a `tf.data.Dataset` of `x` or of `(x, y[, sample_weight])`, a
            `keras.utils.PyDataset`, or NumPy arrays: `x`, or a tuple
            `(x, y[, sample_weight])` (a list or dict is a model's several
            inputs). Labels and sample weights are ignored, as batch
            statistics ignore them in `fit`.
        steps: None (all of `data`) or the number of batches to use.
        batch_size: the batch size for arrays, required there (the per-batch
            variances depend on it: use the training batch size). None for
            datasets.
        verbose: `"auto"` or 1 (a progress bar), 2 (one line at the end) or
            0 (silent).

    Returns:
        The list of layers whose statistics were set.

    Raises:
        ValueError: for a subclassed or unbuilt model, a model without a
            trainable batch-normalization layer or with one inside a custom
            layer, bad `data`/`steps`/`batch_size`, data that yields no
            batch, a layer that received no (unmasked) position, or
            non-finite statistics. The model is unchanged then.

    Reference:
        - Ioffe and Szegedy, 2015, https://arxiv.org/abs/1502.03167
        - Izmailov et al., 2018 (SWA), https://arxiv.org/abs/1803.05407

    Example:

    ```python
    model.compile(keras.optimizers.Adam(use_ema=True), loss=...)
    model.fit(x_train, y_train, batch_size=32, epochs=10)  # EMA weights at the end
    keras_bn.models.recompute_statistics(model, x_train, batch_size=32)
    model.evaluate(x_test, y_test)
    ```
    """
    verbose = check_verbose(verbose)
    recomputation = Recomputation(model)
    return recomputation.run(Batches(data, steps, batch_size), verbose)


class Recomputation:
    """The statistics pass over one model, reusable (the callback keeps one).

    Builds, once, a copy of the model's graph that shares every layer and
    wraps each recomputed batch-normalization layer in a recorder, and the
    `tf.function` that runs it on a batch.
    """

    def __init__(self, model):
        check_graph_model(model, FUNCTION_NAME, SUBCLASSED_ADVICE)
        self.model = model
        self.layers = trainable_batch_normalization_layers(model)
        self.strategy = model.distribute_strategy
        with self.strategy.scope():
            ids = {id(layer) for layer in self.layers}
            self.graph, pairs, _ = copy_model(
                model,
                lambda layer: _Recorder(layer) if id(layer) in ids else layer,
            )
        self.recorders = [new for _, new in pairs if isinstance(new, _Recorder)]
        # Static shapes: a layer's checks (a virtual batch size that must
        # divide the batch) then raise while tracing, with their messages.
        self.step = tf.function(self._step)

    def is_current(self):
        """False once the set of trainable batch-norm layers has changed."""
        layers = trainable_batch_normalization_layers(self.model)
        return [id(layer) for layer in layers] == [id(layer) for layer in self.layers]

    def _step(self, inputs):
        self.graph(inputs, training=True)

    def run(self, batches, verbose):
        """Runs the pass over `batches`; sets the statistics; returns the layers."""
        saved = [(variable, variable.numpy()) for variable in self.model.variables]
        progress = keras.utils.Progbar(batches.count, verbose=verbose, unit_name="step")
        try:
            with self.strategy.scope():
                for recorder in self.recorders:
                    recorder.reset()
                taken = 0
                for inputs in batches:
                    self.step(keras.tree.map_structure(tf.convert_to_tensor, inputs))
                    taken += 1
                    progress.update(taken)
            if not taken:
                raise ValueError("Argument `data` yielded no batch.")
            results = [recorder.result() for recorder in self.recorders]
            _check_results(self.recorders, results)
        finally:
            with self.strategy.scope():
                for variable, value in saved:
                    variable.assign(value)
        with self.strategy.scope():
            for recorder, result in zip(self.recorders, results):
                set_statistics(recorder.layer, result)
        return [recorder.layer for recorder in self.recorders]


def trainable_batch_normalization_layers(model):
    """The layers to recompute; raises if there are none or some are hidden."""
    layers = reachable_batch_normalization(model, FUNCTION_NAME)
    if not layers:
        raise ValueError(
            f"`{FUNCTION_NAME}`: the model {model.name!r} has no "
            "batch-normalization layer."
        )
    trainable = [layer for layer in layers if layer.trainable]
    if not trainable:
        raise ValueError(
            f"`{FUNCTION_NAME}`: every batch-normalization layer of "
            f"{model.name!r} has trainable=False, and such layers keep their "
            "statistics in training. Set `trainable = True` on those to "
            "recompute."
        )
    return trainable


class _Recorder(keras.layers.Layer):
    """Calls a batch-normalization layer and merges its inputs' statistics."""

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_statistics", dtype=layer.dtype_policy)
        self.layer = layer
        self.supports_masking = True
        self.unbiased = getattr(layer, "moving_variance_estimator", None) == "unbiased"
        self.virtual_batch_size = getattr(layer, "virtual_batch_size", None)
        self.grouping = getattr(layer, "virtual_batch_grouping", "interleaved")
        self.renorm = bool(getattr(layer, "renorm", False))

    def build(self, input_shape):
        self.feature_axes = canonicalize_axes(self.layer.axis, len(input_shape))
        shape = tuple(input_shape[a] for a in self.feature_axes)
        self.count = self._state("count", shape)
        self.mean = self._state("mean", shape)
        self.variance = self._state("variance", shape)
        self.batches = self._state("batches", shape)  # per feature: count > 0
        if self.renorm:  # the values the pass holds fixed
            self.renorm_mean = self._state(
                "renorm_mean", shape, self.layer.renorm_mean.dtype
            )
            self.renorm_stddev = self._state(
                "renorm_stddev", shape, self.layer.renorm_stddev.dtype
            )

    def _state(self, name, shape, dtype="float64"):
        return self.add_weight(
            shape=shape,
            name=name,
            initializer="zeros",
            dtype=dtype,
            trainable=False,
            autocast=False,
        )

    def reset(self):
        for variable in (self.count, self.mean, self.variance, self.batches):
            variable.assign(keras.ops.zeros_like(variable))
        if self.renorm:
            self.renorm_mean.assign(self.layer.renorm_mean)
            self.renorm_stddev.assign(self.layer.renorm_stddev)

    def call(self, inputs, training=None, mask=None):
        outputs = self.layer(inputs, training=training, mask=mask)
        if self.renorm:  # the next batch is normalized with the same ones
            self.layer.renorm_mean.assign(self.renorm_mean)
            self.layer.renorm_stddev.assign(self.renorm_stddev)
        count, mean, variance = batch_statistics(
            inputs,
            self.feature_axes,
            mask,
            self.virtual_batch_size,
            self.unbiased,
            self.grouping,
        )
        total, mean, variance = merge_statistics(
            self.count, self.mean, self.variance, count, mean, variance
        )
        self.count.assign(total)
        self.mean.assign(mean)
        self.variance.assign(variance)
        self.batches.assign_add(tf.cast(count > 0, "float64"))
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def result(self):
        """The merged statistics so far, as NumPy values."""
        return Statistics(
            self.count.numpy(),
            self.mean.numpy(),
            self.variance.numpy(),
            self.batches.numpy(),
        )


def batch_statistics(
    x,
    feature_axes,
    mask=None,
    virtual_batch_size=None,
    unbiased=False,
    grouping="interleaved",
):
    """Count, mean and variance of `x` per feature, over all other axes.

    Args:
        x: a float tensor.
        feature_axes: sorted non-negative axes that are kept.
        mask: None, or a boolean tensor read as the layer reads it: of
            rank one less than `x`'s, broadcast over a new last axis
            (Keras's rule); of `x`'s rank, broadcast as it is; or shaped as
            `x` without its (several) feature axes. False positions are
            left out.
        virtual_batch_size: None, or statistics per virtual batch of this
            many examples, averaged with their counts as weights.
        unbiased: divide the sum of squares by `count - 1` (at least 1)
            instead of `count`.
        grouping: how examples form virtual batches, `"interleaved"` or
            `"consecutive"` (`keras_bn.ops.virtual_batch`).

    Returns:
        `(count, mean, variance)`, float64 tensors of the feature shape. The
        sums of inputs run in float32, in two passes (the mean, then squares
        of deviations from it); counts and the division in float64.
    """
    x = tf.cast(x, "float32")
    weights = None if mask is None else _broadcast_mask(mask, feature_axes, x)
    if virtual_batch_size is not None:
        x = _split_batch(x, virtual_batch_size, grouping)
        if weights is not None:
            weights = _split_batch(weights, virtual_batch_size, grouping)
        numbering = 1 if grouping == "interleaved" else 0  # the virtual batches
        feature_axes = (numbering,) + tuple(axis + 1 for axis in feature_axes)
    reduced = [axis for axis in range(x.shape.rank) if axis not in feature_axes]
    if weights is None:
        mean = tf.reduce_mean(x, reduced, keepdims=True)
        squares = tf.reduce_sum(tf.square(x - mean), reduced, keepdims=True)
        size = tf.size(x, out_type="int64") // tf.size(mean, out_type="int64")
        count = tf.cast(size, "float64") + tf.zeros_like(mean, "float64")
    else:  # counts in float64: exact beyond float32's 2^24
        count = tf.reduce_sum(tf.cast(weights, "float64"), reduced, keepdims=True)
        total = tf.reduce_sum(weights * x, reduced, keepdims=True)
        mean = total / tf.cast(tf.maximum(count, 1.0), "float32")
        squares = tf.reduce_sum(weights * tf.square(x - mean), reduced, keepdims=True)
    divisor = tf.maximum(count - 1.0 if unbiased else count, 1.0)
    variance = tf.cast(squares, "float64") / divisor
    count, mean, variance = (
        tf.squeeze(tf.cast(t, "float64"), reduced) for t in (count, mean, variance)
    )
    if virtual_batch_size is not None:  # weighted mean over the virtual batches
        total = tf.reduce_sum(count, 0)  # the squeeze put their axis first
        share = tf.math.divide_no_nan(count, total)
        mean = tf.reduce_sum(share * mean, 0)
        return total, mean, tf.reduce_sum(share * variance, 0)
    return count, mean, variance


def _broadcast_mask(mask, feature_axes, x):
    """The mask as float weights of `x`'s shape, read as the layers read it."""
    weights = tf.cast(mask, "float32")
    if weights.shape.rank == x.shape.rank - 1:  # Keras's rule
        weights = tf.expand_dims(weights, -1)
    elif weights.shape.rank < x.shape.rank:  # without the feature axes
        for axis in feature_axes:
            weights = tf.expand_dims(weights, axis)
    return tf.broadcast_to(weights, tf.shape(x))


def _split_batch(t, virtual_batch_size, grouping):
    split = (
        [virtual_batch_size, -1]
        if grouping == "interleaved"
        else [-1, virtual_batch_size]
    )
    return tf.reshape(t, tf.concat([split, tf.shape(t)[1:]], axis=0))


def merge_statistics(total, mean, variance, count, batch_mean, batch_variance):
    """Running count-weighted means: `(total, mean, variance)` after a batch.

    `mean += count / (total + count) * (batch_mean - mean)`, and the same for
    the variance, in float64; a batch with `count = 0` changes nothing.
    """
    total = tf.convert_to_tensor(total) + count
    share = tf.math.divide_no_nan(count, total)
    mean = tf.convert_to_tensor(mean)
    variance = tf.convert_to_tensor(variance)
    return (
        total,
        mean + share * (batch_mean - mean),
        variance + share * (batch_variance - variance),
    )


def set_statistics(layer, statistics):
    """Writes recomputed `Statistics` into a layer, renorm's consistently."""
    mean, variance = statistics.mean, statistics.variance
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):
        stddev = np.sqrt(variance + layer.epsilon)
        for variable, value in (
            (layer.moving_stddev, stddev),
            (layer.renorm_mean, mean),
            (layer.renorm_stddev, stddev),
        ):
            variable.assign(value.astype(variable.dtype))
    if getattr(layer, "num_batches_tracked", None) is not None:
        tracked = layer.num_batches_tracked  # per feature, or one count
        batches = statistics.batches
        if tuple(tracked.shape) != batches.shape:
            batches = batches.max()
        tracked.assign(np.asarray(batches).astype(tracked.dtype))


def _check_results(recorders, results):
    empty = [
        r.layer.name
        for r, result in zip(recorders, results)
        if np.any(result.count == 0)
    ]
    if empty:
        raise ValueError(
            f"`{FUNCTION_NAME}`: the layers {empty} received no (unmasked) "
            "position in `data`, so they have no statistics to recompute."
        )
    bad = [
        r.layer.name
        for r, result in zip(recorders, results)
        if not np.all(np.isfinite(result.mean) & np.isfinite(result.variance))
    ]
    if bad:
        raise ValueError(
            f"`{FUNCTION_NAME}`: non-finite statistics for the layers {bad}: "
            "their inputs held NaN or Inf (or overflowed). The model is "
            "unchanged."
        )
