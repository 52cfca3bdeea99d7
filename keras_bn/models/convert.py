"""A copy of a model with every batch-normalization layer of one class."""

import numpy as np

from keras_bn.models._graph import check_graph_model
from keras_bn.models._graph import clone_from_config
from keras_bn.models._graph import copy_model
from keras_bn.models._graph import exactly_batch_normalization
from keras_bn.models._graph import reachable_batch_normalization
from keras_bn.models._graph import warn_lost_classes
from keras_bn.models._state import copy_state
from keras_bn.models._state import copy_trainable_everywhere
from keras_bn.models.scope import _scope
from keras_bn.models.scope import check_overrides
from keras_bn.models.scope import check_target
from keras_bn.models.scope import target_arguments

FUNCTION_NAME = "convert_batch_normalization"
SUBCLASSED_ADVICE = (
    "For a subclassed model, build it inside "
    "`keras_bn.models.batch_normalization_scope(to)`, then load the weights "
    "(the weight names and order match)."
)


def convert_batch_normalization(model, to="keras_bn", **overrides):
    """A copy of a model whose batch-normalization layers are all of one class.

    Every `keras.layers.BatchNormalization` and `keras_bn.BatchNormalization`
    layer (of exactly those classes; subclasses are copied as they are) is
    rebuilt as the class `to` names, from its own config updated with
    `overrides`, and receives the original's weights. Every other layer is
    rebuilt from its config with its whole state, copied through Keras's
    saving hooks (`save_own_variables`, `save_assets`: an adapted
    `Normalization`'s statistics, a lookup layer's vocabulary), and
    `trainable` at every level. The copy runs inside
    `batch_normalization_scope(to, **overrides)`, so batch normalization
    made inside custom layers converts too. A Functional subclass (a
    keras-hub `Backbone` or task) is rebuilt from its own config and keeps
    its class and attributes; where that config does not rebuild the same
    layers, its graph is copied as a plain Functional model, with a
    warning. The copy shares nothing with
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
    math is the same), `virtual_batch_grouping` (without virtual batches)
    and `skip_nonfinite_updates` (Keras's layer always
    updates, so a NaN batch then poisons its moving statistics).

    Inference outputs equal the original's up to float32 rounding (the two
    classes reach the same formula through different kernels); so do
    training outputs with the same batch.

    A keras-hub `Backbone`'s `.keras` file records its constructor's
    arguments, so loading the converted copy gives keras_bn's layers back
    only inside `batch_normalization_scope()` (outside it, Keras's layers
    with the same weights).

    Args:
        model: a built Sequential or Functional model (nested models,
            Functional subclasses and `keras.ops` calls included).
        to: `"keras_bn"` (`keras_bn.BatchNormalization`) or `"keras"`
            (`keras.layers.BatchNormalization`).
        **overrides: constructor arguments of the target class, set on every
            converted layer, e.g. `synchronized=True`, `momentum=None`,
            `fused=False`.

    Returns:
        The converted copy, a `keras.Model` of the original's kind.

    Raises:
        ValueError: for a subclassed or unbuilt model, an unknown `to` or
            override (before anything is built), or a layer Keras cannot
            express (converting to `"keras"`; the original is unchanged).

    Example:

    ```python
    base = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    model = keras_bn.models.convert_batch_normalization(
        base, "keras_bn", synchronized=True
    )
    ```
    """
    target = check_target(to)
    check_overrides(target, overrides, FUNCTION_NAME)
    check_graph_model(model, FUNCTION_NAME, SUBCLASSED_ADVICE)
    found = reachable_batch_normalization(model, FUNCTION_NAME, hidden=lambda _: None)
    configs = {
        id(layer): target_arguments(
            layer.get_config(), target, overrides, layer.name, FUNCTION_NAME
        )
        for layer in found
        if exactly_batch_normalization(layer)
    }
    reasons = {}

    def clone(layer):
        if id(layer) in configs:
            return target.from_config(configs[id(layer)])
        return clone_from_config(layer)

    def rebuild(graph_model):
        try:
            rebuilt = type(graph_model).from_config(graph_model.get_config())
            copy_state(graph_model, rebuilt, copy_batch_normalization_weights)
        except Exception as error:  # a config that does not rebuild the model
            reasons[id(graph_model)] = (
                f"its config does not rebuild it ({type(error).__name__}: "
                f"{error}), so its graph was copied instead."
            )
            return None
        return rebuilt

    # Inside the scope, batch normalization made by any code (a layer's
    # `from_config`, a Backbone's constructor) is of the target class.
    with _scope(target, overrides, FUNCTION_NAME):
        converted, pairs, models = copy_model(
            model, clone, compile=True, rebuild=rebuild
        )
        visited = set()
        for old, new in pairs:
            copy_state(old, new, copy_batch_normalization_weights, visited)
    warn_lost_classes(
        models, FUNCTION_NAME, "its class cannot be rebuilt from a graph.", reasons
    )
    copy_trainable_everywhere(models, pairs)
    return converted


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
