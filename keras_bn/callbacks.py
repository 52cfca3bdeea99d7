"""Callbacks for batch normalization: watch its inputs, recompute its statistics."""

import os

import keras
import numpy as np

from keras_bn.models.recompute import Batches
from keras_bn.models.recompute import Recomputation
from keras_bn.ops.checks import check_arrays
from keras_bn.ops.checks import check_choice
from keras_bn.ops.checks import check_float_list
from keras_bn.ops.checks import check_int
from keras_bn.ops.checks import check_list_of
from keras_bn.ops.checks import check_optional_int
from keras_bn.ops.checks import check_verbose


@keras.saving.register_keras_serializable(package="keras_bn")
class ActivationStatistics(keras.callbacks.Callback):
    """Records percentiles of chosen layers' inputs during `fit`.

    Ioffe & Szegedy (2015) show internal covariate shift by plotting the
    15th, 50th and 85th percentiles of one sigmoid's input over training. This
    callback records those curves for any layers of a functional or
    `Sequential` model: once before the first step and then every
    `every_n_steps` steps of `model.optimizer.iterations` (across calls to
    `fit`), it runs the model's layers on a fixed `probe_data` batch in
    inference mode, so that batch normalization keeps its statistics.

    Args:
        layers: list of layers, or of layer names, of the trained model whose
            inputs to record. Each must have a single input tensor.
        probe_data: the fixed inputs to run the model on (a NumPy array, or a
            list/dict of arrays for a model with several inputs).
        percentiles: percentiles to record, each in [0, 100].
        every_n_steps: record after every this many optimizer steps.
        feature_index: if given, record only this index of the last axis (a
            dense layer's unit, a convolution's channel), not the whole input.

    Attributes:
        steps: int array `[n_records]`, the optimizer step of each record.
        percentiles: dict from layer name to a float array
            `[n_records, len(percentiles)]`.

    Raises:
        TypeError: at construction, for an argument of the wrong type.
        ValueError: at construction, for a value out of range; from `fit`,
            for layers or a `feature_index` that do not fit the model.

    Example:

    ```python
    stats = ActivationStatistics(
        layers=["sigmoid_3"], probe_data=x_test[:500], every_n_steps=50
    )
    model.fit(x_train, y_train, callbacks=[stats])
    stats.percentiles["sigmoid_3"]  # shape (n_records, 3)
    stats.plot("sigmoid_inputs.png")
    ```
    """

    def __init__(
        self,
        layers,
        probe_data,
        percentiles=(15, 50, 85),
        every_n_steps=100,
        feature_index=None,
    ):
        super().__init__()
        self.layer_refs = check_list_of(
            layers,
            "layers",
            (str, keras.layers.Layer),
            "a non-empty list of layers or layer names",
        )
        self.layer_names = [getattr(ref, "name", ref) for ref in self.layer_refs]
        if len(set(self.layer_names)) != len(self.layer_names):
            raise ValueError(
                "Argument `layers` must not repeat a layer. "
                f"Received: layers={self.layer_names}"
            )
        self.probe_data = check_arrays(probe_data, "probe_data")
        self.percentile_levels = check_float_list(percentiles, "percentiles", 0, 100)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", positive=True)
        self.feature_index = check_optional_int(feature_index, "feature_index")
        self._step_records = []
        self._value_records = {name: [] for name in self.layer_names}
        self._probe = None  # (the model, its probe model)

    @property
    def steps(self):
        return np.asarray(self._step_records, dtype="int64")

    @property
    def percentiles(self):
        n_levels = len(self.percentile_levels)
        return {
            name: np.asarray(records, dtype="float64").reshape(-1, n_levels)
            for name, records in self._value_records.items()
        }

    def on_train_begin(self, logs=None):
        if self._probe is None or self._probe[0] is not self.model:
            self._probe = (self.model, self._build_probe_model())
        if not self._step_records:
            self._record(self._current_step())

    def on_train_batch_end(self, batch, logs=None):
        step, last = self._current_step(), self._step_records[-1]
        if step // self.every_n_steps > last // self.every_n_steps:
            self._record(step)

    def _current_step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _build_probe_model(self):
        layers = [self._resolve_layer(ref) for ref in self.layer_refs]
        try:
            # A single input as a bare tensor, so the probe array matches it.
            inputs = self.model.inputs or ()
            inputs = inputs[0] if len(inputs) == 1 else self.model.input
            outputs = [layer.input for layer in layers]
            probe_model = keras.Model(inputs, outputs)
        except (AttributeError, ValueError) as error:
            raise ValueError(
                "`layers`: cannot read the inputs of "
                f"{[layer.name for layer in layers]} from the model. "
                "ActivationStatistics needs a functional or Sequential model "
                "built on a `keras.Input`, and layers called exactly once. "
                f"({error})"
            ) from error
        for layer, output in zip(layers, outputs):
            size, index = output.shape[-1], self.feature_index
            if None not in (size, index) and not -size <= index < size:
                raise ValueError(
                    f"`feature_index`={index} is out of range for the input of "
                    f"layer {layer.name!r}, whose last axis has {size} entries."
                )
        return probe_model

    def _resolve_layer(self, ref):
        name = getattr(ref, "name", ref)  # a layer or a layer's name
        try:
            layer = self.model.get_layer(name)
        except ValueError as error:  # it lists the model's layers
            raise ValueError(f"`layers`: {error}") from None
        if not isinstance(ref, str) and layer is not ref:
            raise ValueError(f"`layers`: layer {name!r} is not part of the model.")
        return layer

    def _record(self, step):
        inputs = self._probe[1](self.probe_data, training=False)
        if not isinstance(inputs, list | tuple):
            inputs = [inputs]
        for name, values in zip(self.layer_names, inputs):
            values = keras.ops.convert_to_numpy(values)
            if self.feature_index is not None:
                values = values[..., self.feature_index]
            self._value_records[name].append(
                np.percentile(values, self.percentile_levels)
            )
        self._step_records.append(step)

    def plot(self, path_or_ax, layer=None):
        """Plots the recorded percentiles against the training step.

        Args:
            path_or_ax: a file path to save a PNG to (one panel per layer), or
                a matplotlib `Axes` to draw one layer's curves on.
            layer: name of the layer to draw on an `Axes` (default: the first
                recorded layer). Ignored when saving to a path.

        Returns:
            The path written, or the `Axes` drawn on.

        Raises:
            RuntimeError: if nothing has been recorded yet.

        Example:

        ```python
        stats.plot("percentiles.png")
        fig, ax = plt.subplots()
        stats.plot(ax, layer="sigmoid_3")
        ```
        """
        if not self._step_records:
            raise RuntimeError(
                "Nothing recorded yet: pass this callback to `fit` first."
            )
        if isinstance(path_or_ax, str | os.PathLike):
            # A bare Figure draws without pyplot, whatever the GUI backend.
            from matplotlib.figure import Figure

            n_layers = len(self.layer_names)
            figure = Figure(figsize=(5 * n_layers, 3.5), layout="constrained")
            axes = figure.subplots(1, n_layers, squeeze=False)[0]
            for ax, name in zip(axes, self.layer_names):
                self._draw(ax, name)
            figure.savefig(path_or_ax, dpi=120)
            return path_or_ax
        if layer is None:
            layer = self.layer_names[0]
        elif layer not in self.layer_names:
            raise ValueError(
                f"`layer`: {layer!r} was not recorded; recorded layers are "
                f"{self.layer_names}."
            )
        self._draw(path_or_ax, layer)
        return path_or_ax

    def _draw(self, ax, layer):
        values = self.percentiles[layer]
        for column, level in enumerate(self.percentile_levels):
            ax.plot(self.steps, values[:, column], label=f"{level:g}th percentile")
        title = f"input of {layer}"
        if self.feature_index is not None:
            title += f" [..., {self.feature_index}]"
        ax.set(title=title, xlabel="training step", ylabel="value")
        ax.legend()

    def get_config(self):
        return {
            "layers": list(self.layer_names),
            "probe_data": keras.saving.serialize_keras_object(self.probe_data),
            "percentiles": list(self.percentile_levels),
            "every_n_steps": self.every_n_steps,
            "feature_index": self.feature_index,
        }

    @classmethod
    def from_config(cls, config):
        probe_data = keras.saving.deserialize_keras_object(config["probe_data"])
        return cls(**{**config, "probe_data": probe_data})


class RecomputeStatistics(keras.callbacks.Callback):
    """Recomputes batch normalization's statistics at the end of training.

    Runs `keras_bn.models.recompute_statistics` on the trained model (see
    docs/models.md for where to place it among other callbacks).

    Args:
        data: what `recompute_statistics` takes; usually the training data.
        steps: None (all of `data`) or the number of batches to use.
        batch_size: for arrays, the training batch size; None for datasets.
        on: `"train_end"`: once, when `fit` ends, after Keras swaps in the
            averaged weights of an optimizer with `use_ema=True`.
            `"epoch_end"`: after the last training batch of every epoch,
            before validation (at its start, else at the epoch's end), so
            validation metrics and later callbacks see fresh statistics.
        verbose: 0 (silent, the default), 1 (a progress bar) or 2.

    Raises:
        TypeError, ValueError: at construction, for a bad argument.
        ValueError: from `fit`, for a model `recompute_statistics` refuses.

    Example:

    ```python
    model.compile(keras.optimizers.Adam(use_ema=True), loss=...)
    model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=10,
        callbacks=[RecomputeStatistics(x_train, batch_size=32)],
    )  # ends with EMA weights and their own statistics
    ```
    """

    def __init__(self, data, steps=None, batch_size=None, on="train_end", verbose=0):
        super().__init__()
        self.on = check_choice(on, "on", ("train_end", "epoch_end"))
        self.batches = Batches(data, steps, batch_size)
        self.verbose = check_verbose(verbose)
        self._recomputation = None
        self._pending = False  # an epoch of `fit` trained since the last pass

    def recompute(self):
        """Recomputes the statistics of `self.model` now."""
        current = self._recomputation
        if current is None or not current.is_current(self.model):
            current = self._recomputation = Recomputation(self.model)
        current.run(self.batches, self.verbose)
        self._pending = False

    def on_epoch_begin(self, epoch, logs=None):
        self._pending = self.on == "epoch_end"

    def on_test_begin(self, *args, **kwargs):  # and at the end of an epoch
        if self._pending:
            self.recompute()

    on_epoch_end = on_test_begin

    def on_train_end(self, logs=None):
        self._pending = False
        if self.on == "train_end":
            self.recompute()
