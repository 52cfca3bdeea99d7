"""Population statistics of batch normalization, recomputed over data."""

import itertools
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_bn.models._graph import check_graph_model
from keras_bn.models._graph import copy_model
from keras_bn.models._graph import reachable_batch_normalization
from keras_bn.ops import canonicalize_axes
from keras_bn.ops.checks import check_arrays
from keras_bn.ops.checks import check_optional_positive_int
from keras_bn.ops.checks import check_verbose

FUNCTION_NAME = "recompute_statistics"
DATA_FORMS = (
    "a tf.data.Dataset, a keras.utils.PyDataset, or arrays (x, or a tuple "
    "(x, y[, sample_weight]) with x an array or a list/dict of arrays)"
)
# Arguments under which a layer's moving statistics are, after each call,
# that call's batch statistics; the renorm statistics stay fixed.
PASS_ARGUMENTS = {
    "momentum": 0.0,
    "renorm_momentum": 1.0,
    "skip_nonfinite_updates": False,
}
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
    each batch (or virtual batch). The layer computes them itself, in
    float32: during the pass it runs its own training update with
    `momentum=0`, `renorm_momentum=1` (renorm's statistics, on which its
    training output depends, stay fixed) and `skip_nonfinite_updates=False`,
    so after each call its moving statistics are that call's. The sums over
    batches run in float64. (A cumulative average, `momentum=None`, would
    weigh a short last batch as much as a full one.)

    In training mode every layer behaves as in `fit`: each batch-normalization
    layer normalizes with its batch statistics, so a later layer's inputs are
    those of training (Algorithm 2 runs the training network); dropout and
    noise layers are active. Layers with `trainable=False` normalize with
    their moving statistics, as in `fit`, and keep them.

    No other weight changes: every variable of the model (including the
    statistics the layers update themselves during the pass, and seed
    states) and the layers' arguments are restored, and only then are the
    new statistics written. With `renorm=True`, `moving_stddev` and
    `renorm_stddev` become
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
        TypeError: for `data`, `steps` or `batch_size` of a wrong type.
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


class Batches:
    """The inputs `x` of the batches of `data` (labels and sample weights
    dropped), at most `steps` of them; `count` is their number. Every
    argument is checked here, before any batch is read."""

    def __init__(self, data, steps=None, batch_size=None):
        self.steps = check_optional_positive_int(steps, "steps")
        self.batch_size = check_optional_positive_int(batch_size, "batch_size")
        if isinstance(data, tf.data.Dataset | keras.utils.PyDataset):
            if batch_size is not None:
                raise ValueError(
                    "Argument `batch_size` is only for arrays: a dataset is "
                    f"batched already. Received: batch_size={batch_size}"
                )
            if isinstance(data, tf.data.Dataset):
                available = int(data.cardinality())
            else:
                available = data.num_batches
            available = None if available is None or available < 0 else available
        else:
            data = check_arrays(data, "data", DATA_FORMS)
            lengths = {len(array) for array in keras.tree.flatten(data)}
            if len(lengths) != 1:
                raise ValueError(
                    "Argument `data`: every array must have the same batch "
                    f"axis. Received batch sizes {sorted(lengths)}."
                )
            if self.batch_size is None:
                raise ValueError(
                    "Argument `batch_size` is required with arrays: the "
                    "per-batch variances depend on it (use the training batch "
                    "size)."
                )
            available = math.ceil(lengths.pop() / self.batch_size)
        if available is None and self.steps is None:
            raise ValueError(
                "Argument `steps` is required: the data has no known end "
                "(an infinite dataset, or a PyDataset without `num_batches`)."
            )
        self.data = data
        self.count = min(n for n in (self.steps, available) if n is not None)
        if self.count < (self.steps or 0):
            warnings.warn(
                f"`steps`={self.steps} exceeds the {available} batches of "
                f"the data; recomputing from {available}.",
                stacklevel=3,
            )

    def __iter__(self):
        if isinstance(self.data, tf.data.Dataset):
            elements = iter(self.data)
        elif isinstance(self.data, keras.utils.PyDataset):
            elements = (self.data[index] for index in range(self.count))
        else:
            elements = (
                keras.tree.map_structure(
                    lambda a, i=start: a[i : i + self.batch_size], self.data
                )
                for start in range(0, self.count * self.batch_size, self.batch_size)
            )
        for element in itertools.islice(elements, self.count):
            # As in `fit`: a tuple is (x, y[, sample_weight]); a list or a
            # dict is the inputs of a model with several.
            yield element[0] if isinstance(element, tuple) else element


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
        arguments = [
            (layer, name, getattr(layer, name))
            for layer in self.layers
            for name in PASS_ARGUMENTS
            if hasattr(layer, name)
        ]
        progress = keras.utils.Progbar(batches.count, verbose=verbose, unit_name="step")
        try:
            for layer, name, _ in arguments:
                setattr(layer, name, PASS_ARGUMENTS[name])
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
            for layer, name, value in arguments:
                setattr(layer, name, value)
            with self.strategy.scope():
                for variable, value in saved:
                    variable.assign(value)
        with self.strategy.scope():
            for recorder, result in zip(self.recorders, results):
                set_statistics(recorder.layer, *result)
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
    """Calls a batch-normalization layer and adds up its batch statistics.

    Per feature, in float64: the count of positions, the count-weighted sums
    of the layer's statistics (its moving ones right after its update), and
    the number of calls that held a position.
    """

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_statistics", dtype=layer.dtype_policy)
        self.layer = layer
        self.supports_masking = True

    def build(self, input_shape):
        self.feature_axes = canonicalize_axes(self.layer.axis, len(input_shape))
        shape = tuple(input_shape[a] for a in self.feature_axes)
        self.sums = [
            self.add_weight(
                shape=shape,
                name=name,
                initializer="zeros",
                dtype="float64",
                trainable=False,
                autocast=False,
            )
            for name in ("count", "mean_sum", "variance_sum", "batches")
        ]

    def reset(self):
        for variable in self.sums:
            variable.assign(keras.ops.zeros_like(variable))

    def call(self, inputs, training=None, mask=None):
        outputs = self.layer(inputs, training=training, mask=mask)
        count = _count(inputs, mask, self.feature_axes)
        seen = count > 0  # a feature without a position kept its old values
        for variable, value in zip(
            self.sums,
            (
                count,
                tf.where(seen, count * tf.cast(self.layer.moving_mean, "float64"), 0),
                tf.where(
                    seen, count * tf.cast(self.layer.moving_variance, "float64"), 0
                ),
                tf.cast(seen, "float64"),
            ),
        ):
            variable.assign_add(value)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def result(self):
        """`(count, mean, variance, batches)` so far, as NumPy float64 arrays."""
        count, mean_sum, variance_sum, batches = (v.numpy() for v in self.sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            return count, mean_sum / count, variance_sum / count, batches


def _count(x, mask, feature_axes):
    """The number of (unmasked) positions per feature, in float64.

    The mask is read as the layers read it: of rank one less than `x`'s,
    broadcast over a new last axis (Keras's rule); of `x`'s rank, broadcast
    as it is; or shaped as `x` without its (several) feature axes.
    """
    reduced = [axis for axis in range(x.shape.rank) if axis not in feature_axes]
    if mask is None:
        shape = tf.shape(x, out_type="int64")
        size = tf.reduce_prod(tf.gather(shape, reduced))
        return tf.cast(size, "float64") + tf.zeros(
            [x.shape[a] for a in feature_axes], "float64"
        )
    weights = tf.cast(mask, "float64")
    if weights.shape.rank == x.shape.rank - 1:  # Keras's rule
        weights = tf.expand_dims(weights, -1)
    elif weights.shape.rank < x.shape.rank:  # without the feature axes
        for axis in feature_axes:
            weights = tf.expand_dims(weights, axis)
    return tf.reduce_sum(tf.broadcast_to(weights, tf.shape(x)), reduced)


def set_statistics(layer, count, mean, variance, batches):
    """Writes recomputed statistics into a layer, renorm's consistently."""
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
        tracked = layer.num_batches_tracked  # per feature
        tracked.assign(np.reshape(batches, tracked.shape).astype(tracked.dtype))


def _check_results(recorders, results):
    names = [recorder.layer.name for recorder in recorders]
    empty = [n for n, (count, *_) in zip(names, results) if np.any(count == 0)]
    if empty:
        raise ValueError(
            f"`{FUNCTION_NAME}`: the layers {empty} received no (unmasked) "
            "position in `data`, so they have no statistics to recompute."
        )
    bad = [
        name
        for name, (_, mean, variance, _) in zip(names, results)
        if not np.all(np.isfinite(mean) & np.isfinite(variance))
    ]
    if bad:
        raise ValueError(
            f"`{FUNCTION_NAME}`: non-finite statistics for the layers {bad}: "
            "their inputs held NaN or Inf (or overflowed). The model is "
            "unchanged."
        )
