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
from keras_bn.models._state import set_batch_normalization_weights
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

    The inference step of Ioffe & Szegedy (2015, Algorithm 2), as PreciseBN
    and SWA's `update_bn` do: the model runs in training mode over `data`, as
    in `fit` (dropout active; layers with `trainable=False` keep their
    statistics), and each batch-normalization layer's moving statistics
    become those of its inputs over all of it: for when they belong to other
    weights (after `Adam(use_ema=True)` or SWA). With `x_b` a layer's input
    on batch `b` and `n_b` its unmasked positions per feature (per virtual
    batch with `virtual_batch_size`):

        mean_b = sum(x_b) / n_b
        var_b  = sum((x_b - mean_b)^2) / n_b        ("biased", Keras's)
        var_b  = sum((x_b - mean_b)^2) / (n_b - 1)  ("unbiased"; n_b = 1: biased)

        moving_mean     = sum_b n_b * mean_b / sum_b n_b
        moving_variance = sum_b n_b * var_b  / sum_b n_b

    with the layer's own `moving_variance_estimator`, so a short last batch
    weighs less. Each layer computes `mean_b` and `var_b` by its own training
    update with `momentum=0`; the sums run in float64. No other variable,
    layer argument or optimizer state changes; a failed pass changes nothing.
    Details (renorm, `momentum=None`, `tf.distribute`) in docs/models.md.

    Args:
        model: a built Sequential or Functional model (nested models
            included) with batch-normalization layers of either class.
        data: a `tf.data.Dataset` of `x` or `(x, y[, sample_weight])`, a
            `keras.utils.PyDataset`, or NumPy arrays (`x` or such a tuple; a
            list or dict is several inputs). Labels and weights are ignored.
        steps: None (all of `data`) or the number of batches to use.
        batch_size: the batch size for arrays, required there (use the
            training batch size); None for datasets.
        verbose: `"auto"` or 1 (progress bar), 2 (line at the end), 0 (silent).

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
    return Recomputation(model).run(Batches(data, steps, batch_size), verbose)


class Batches:
    """The inputs `x` of `count` batches of `data` (at most `steps`), every
    argument checked before any batch is read."""

    def __init__(self, data, steps=None, batch_size=None):
        self.steps = check_optional_positive_int(steps, "steps")
        self.batch_size = check_optional_positive_int(batch_size, "batch_size")
        if isinstance(data, tf.data.Dataset | keras.utils.PyDataset):
            if batch_size is not None:
                raise ValueError(
                    "Argument `batch_size` is only for arrays: a dataset is "
                    f"batched already. Received: batch_size={batch_size}"
                )
            dataset = isinstance(data, tf.data.Dataset)
            available = int(data.cardinality()) if dataset else data.num_batches
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
            size = self.batch_size
            elements = (
                keras.tree.map_structure(lambda a, i=i: a[i : i + size], self.data)
                for i in range(0, self.count * size, size)
            )
        for element in itertools.islice(elements, self.count):
            # As in `fit`: a tuple is (x, y[, sample_weight]); a list or a
            # dict is the inputs of a model with several.
            yield element[0] if isinstance(element, tuple) else element


class Recomputation:
    """The statistics pass over one model, reusable (the callback keeps one):
    a copy of its graph that shares every layer and wraps each recomputed
    layer in a `_Recorder`, run by a `tf.function`."""

    def __init__(self, model):
        check_graph_model(model, FUNCTION_NAME, SUBCLASSED_ADVICE)
        self.model = model
        self.layers = trainable_batch_normalization_layers(model)
        self.strategy = model.distribute_strategy
        ids = {id(layer) for layer in self.layers}
        with self.strategy.scope():
            graph, pairs, _ = copy_model(
                model, lambda layer: _Recorder(layer) if id(layer) in ids else layer
            )
        self.recorders = [new for _, new in pairs if isinstance(new, _Recorder)]

        def step(inputs):  # no outputs: only the recorded sums are wanted
            graph(inputs, training=True)

        # Static shapes: a layer's checks (a virtual batch size that must
        # divide the batch) then raise while tracing, with their messages.
        self.step = tf.function(step)

    def is_current(self, model):
        """Whether it is the pass of `model` and its trainable BN layers."""
        layers = model is self.model and trainable_batch_normalization_layers(model)
        return layers == self.layers

    def run(self, batches, verbose):
        """Runs the pass over `batches`, sets the statistics, returns the layers."""
        saved = [(variable, variable.numpy()) for variable in self.model.variables]
        arguments = [
            (layer, name, getattr(layer, name))
            for layer in self.layers
            for name in PASS_ARGUMENTS
            if hasattr(layer, name)
        ]
        progress = keras.utils.Progbar(batches.count, verbose=verbose, unit_name="step")
        with self.strategy.scope():
            try:
                for layer, name, _ in arguments:
                    setattr(layer, name, PASS_ARGUMENTS[name])
                for recorder in self.recorders:
                    recorder.sums.assign(tf.zeros_like(recorder.sums))
                taken = 0
                for taken, inputs in enumerate(batches, 1):
                    self.step(keras.tree.map_structure(tf.convert_to_tensor, inputs))
                    progress.update(taken)
                if not taken:
                    raise ValueError("Argument `data` yielded no batch.")
                statistics = _statistics(self.recorders)
            finally:
                for layer, name, value in arguments:
                    setattr(layer, name, value)
                for variable, value in saved:
                    variable.assign(value)
            for recorder, values in zip(self.recorders, statistics):
                set_batch_normalization_weights(recorder.layer, values)
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
    """Calls a batch-normalization layer and adds up, per feature in float64,
    the positions, the statistics its update just wrote weighted by them, and
    the calls that held a position."""

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_statistics", dtype=layer.dtype_policy)
        self.layer = layer
        self.supports_masking = True

    def build(self, input_shape):
        self.feature_axes = canonicalize_axes(self.layer.axis, len(input_shape))
        self.sums = self.add_weight(  # count, mean_sum, variance_sum, batches
            shape=(4, *(input_shape[a] for a in self.feature_axes)),
            name="sums",
            initializer="zeros",
            dtype="float64",
            trainable=False,
            autocast=False,
        )

    def call(self, inputs, training=None, mask=None):
        outputs = self.layer(inputs, training=training, mask=mask)
        count = _count(inputs, mask, self.feature_axes)
        seen = count > 0  # a feature without a position kept its old values
        weighted = [
            tf.where(seen, count * tf.cast(statistic, "float64"), 0)
            for statistic in (self.layer.moving_mean, self.layer.moving_variance)
        ]
        self.sums.assign_add(tf.stack([count, *weighted, tf.cast(seen, "float64")]))
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _count(x, mask, feature_axes):
    """The number of (unmasked) positions per feature, in float64, the mask
    read in the layouts the layers take (docs/layer.md, "Masks")."""
    reduced = [axis for axis in range(x.shape.rank) if axis not in feature_axes]
    if mask is None:
        size = tf.reduce_prod(tf.gather(tf.shape(x, out_type="int64"), reduced))
        return tf.fill([x.shape[a] for a in feature_axes], tf.cast(size, "float64"))
    weights = tf.cast(mask, "float64")
    if weights.shape.rank == x.shape.rank - 1:  # Keras's rule
        weights = tf.expand_dims(weights, -1)
    elif weights.shape.rank < x.shape.rank:  # without the feature axes
        for axis in feature_axes:
            weights = tf.expand_dims(weights, axis)
    return tf.reduce_sum(tf.broadcast_to(weights, tf.shape(x)), reduced)


def _statistics(recorders):
    """Each recorder's layer's new statistics, by weight name; a ValueError for
    layers with a feature that got no position, or non-finite statistics."""
    names = [recorder.layer.name for recorder in recorders]
    sums = [recorder.sums.numpy() for recorder in recorders]
    empty = [name for name, (count, *_) in zip(names, sums) if np.any(count == 0)]
    if empty:
        raise ValueError(
            f"`{FUNCTION_NAME}`: the layers {empty} received no (unmasked) "
            "position in `data`, so they have no statistics to recompute."
        )
    bad = [name for name, s in zip(names, sums) if not np.isfinite(s[1:3]).all()]
    if bad:
        raise ValueError(
            f"`{FUNCTION_NAME}`: non-finite statistics for the layers {bad}: "
            "their inputs held NaN or Inf (or overflowed). The model is "
            "unchanged."
        )
    return [
        {
            "moving_mean": mean_sum / count,
            "moving_variance": variance_sum / count,
            "num_batches_tracked": batches,  # per feature
        }
        for count, mean_sum, variance_sum, batches in sums
    ]
