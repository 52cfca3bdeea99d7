"""A copy of a model with every batch-normalization layer of one class."""

import inspect

import keras
import numpy as np

from keras_bn.layers import BatchNormalization
from keras_bn.models._graph import BATCH_NORMALIZATION_CLASSES
from keras_bn.models._graph import clone_from_config
from keras_bn.models._graph import copy_model
from keras_bn.models._graph import graph_batch_normalization

FUNCTION_NAME = "convert_batch_normalization"
TARGETS = {"keras_bn": BatchNormalization, "keras": keras.layers.BatchNormalization}
BASE_LAYER_ARGUMENTS = ("name", "dtype", "trainable")
# keras_bn arguments that Keras's layer does not take. The first two change
# no result Keras defines (a kernel choice, and what NaN batches do to the
# moving statistics); the others must be at their Keras value to convert.
KERAS_BN_ONLY = (
    "fused",
    "skip_nonfinite_updates",
    "virtual_batch_size",
    "moving_variance_estimator",
)
SUBCLASSED_ADVICE = (
    "For a subclassed model, create it with the other class, then copy the "
    "weights with `set_weights(get_weights())` (the weight names and order "
    "match)."
)


def convert_batch_normalization(model, to="keras_bn", **overrides):
    """A copy of a model whose batch-normalization layers are all of one class.

    Every `keras.layers.BatchNormalization` and `keras_bn.BatchNormalization`
    layer (of exactly those classes; subclasses are copied as they are) is
    rebuilt as the class `to` names, from its own config updated with
    `overrides`, and receives the original's weights. Every other layer is
    rebuilt from its config with its weights. The copy shares nothing with
    the original; if the original is compiled, so is the copy, from the same
    compile config (loss, metrics, optimizer settings, with a fresh
    optimizer), as `keras.models.clone_model` does. As PyTorch's
    `SyncBatchNorm.convert_sync_batchnorm`, but both ways and as a copy.

    Weights are copied by name (`gamma`, `beta`, `moving_mean`,
    `moving_variance`, and the renorm statistics `moving_stddev`,
    `renorm_mean`, `renorm_stddev`). A weight the original lacks starts
    consistent with its statistics: with `renorm=True` added,
    `moving_stddev = renorm_stddev = sqrt(moving_variance + epsilon)` and
    `renorm_mean = moving_mean`; with `momentum=None` added,
    `num_batches_tracked = 0`, so the first training batch replaces the
    copied averages (run `recompute_statistics` to start from data instead).

    Converting to `"keras"` refuses, with a `ValueError` naming the layer
    and the option, what Keras's layer cannot express: several feature axes,
    `momentum=None`, `virtual_batch_size`, and
    `moving_variance_estimator="unbiased"` (an override can set them to
    Keras's values). It drops `fused` (Keras picks its own kernels; the
    math is the same) and `skip_nonfinite_updates` (Keras's layer always
    updates, so a NaN batch then poisons its moving statistics).

    Inference outputs equal the original's up to float32 rounding (the two
    classes reach the same formula through different kernels); so do
    training outputs with the same batch.

    Args:
        model: a built Sequential or Functional model (nested models
            included).
        to: `"keras_bn"` (`keras_bn.BatchNormalization`) or `"keras"`
            (`keras.layers.BatchNormalization`).
        **overrides: constructor arguments of the target class, set on every
            converted layer, e.g. `synchronized=True`, `momentum=None`,
            `fused=False`.

    Returns:
        The converted copy, a `keras.Model` of the original's kind.

    Raises:
        ValueError: for a subclassed or unbuilt model, an unknown `to` or
            override, or a layer Keras cannot express (converting to
            `"keras"`), before anything is built.

    Example:

    ```python
    base = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    model = keras_bn.models.convert_batch_normalization(
        base, "keras_bn", synchronized=True
    )
    ```
    """
    if to not in TARGETS:
        raise ValueError(
            f"Argument `to` must be one of {list(TARGETS)}. Received: to={to!r}"
        )
    target = TARGETS[to]
    _check_overrides(target, overrides)
    found = graph_batch_normalization(model, FUNCTION_NAME, SUBCLASSED_ADVICE)
    configs = {
        id(layer): target_config(layer, target, overrides)
        for layer in found
        if type(layer) in BATCH_NORMALIZATION_CLASSES
    }

    def clone(layer):
        if id(layer) in configs:
            return target.from_config(configs[id(layer)])
        return clone_from_config(layer)

    converted, pairs = copy_model(model, clone, compile=True)
    for old, new in pairs:
        if id(old) in configs:
            copy_batch_normalization_weights(old, new)
        else:
            new.set_weights(old.get_weights())
    return converted


def _accepted_arguments(target):
    parameters = inspect.signature(target.__init__).parameters
    named = [name for name in parameters if name not in ("self", "kwargs")]
    if target is not BatchNormalization:  # to set them to Keras's values
        named += list(KERAS_BN_ONLY)
    return named + list(BASE_LAYER_ARGUMENTS)


def _check_overrides(target, overrides):
    accepted = _accepted_arguments(target)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        name = {BatchNormalization: "keras_bn.BatchNormalization"}.get(
            target, "keras.layers.BatchNormalization"
        )
        raise ValueError(
            f"`{FUNCTION_NAME}`: {unknown} are not arguments of {name}. "
            f"Accepted: {accepted}"
        )


def target_config(layer, target, overrides):
    """The config of `layer` for the class `target`, with `overrides`.

    Raises:
        ValueError: if `target` is Keras's layer and the config holds an
            option it cannot express.
    """
    config = {**layer.get_config(), **overrides}
    if not config.get("renorm"):
        config["renorm_clipping"] = None
    if target is BatchNormalization:
        return config
    problems = []
    axis = config["axis"]
    if isinstance(axis, list | tuple):
        if len(axis) == 1:
            config["axis"] = int(axis[0])
        else:
            problems.append(f"axis={axis} (Keras takes one feature axis)")
    if config["momentum"] is None:
        problems.append("momentum=None (a cumulative average)")
    if config.get("virtual_batch_size") is not None:
        problems.append(
            f"virtual_batch_size={config['virtual_batch_size']} (ghost batches)"
        )
    if config.get("moving_variance_estimator", "biased") != "biased":
        problems.append(
            f"moving_variance_estimator={config['moving_variance_estimator']!r}"
        )
    if problems:
        raise ValueError(
            f"`{FUNCTION_NAME}`: layer {layer.name!r} cannot become a "
            "keras.layers.BatchNormalization, which has no "
            f"{'; no '.join(problems)}. Keep keras_bn's layer, or pass "
            "overrides with Keras's values (e.g. momentum=0.99, "
            "virtual_batch_size=None, moving_variance_estimator='biased')."
        )
    for name in KERAS_BN_ONLY:
        config.pop(name, None)
    return config


def copy_batch_normalization_weights(old, new):
    """Copies weights by name; a renorm statistic `old` lacks starts consistent.

    Weights of `old` that `new` lacks are dropped; `num_batches_tracked`
    starts at 0 when `old` has none.
    """
    values = {variable.name: variable.numpy() for variable in old.weights}
    stddev = np.sqrt(values["moving_variance"].astype("float64") + new.epsilon)
    defaults = {
        "moving_stddev": stddev,
        "renorm_mean": values["moving_mean"],
        "renorm_stddev": stddev,
    }
    for variable in new.weights:
        value = values.get(variable.name, defaults.get(variable.name))
        if value is None:
            continue
        if tuple(np.shape(value)) != tuple(variable.shape):
            raise ValueError(
                f"`{FUNCTION_NAME}`: weight {variable.name!r} of layer "
                f"{old.name!r} has shape {np.shape(value)}, the converted "
                f"layer's has {tuple(variable.shape)} (an `axis` override?)."
            )
        variable.assign(np.asarray(value).astype(variable.dtype))
