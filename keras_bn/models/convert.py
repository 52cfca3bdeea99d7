"""A copy of a model with every batch-normalization layer of one class."""

from keras_bn.models._graph import check_graph_model
from keras_bn.models._graph import clone_from_config
from keras_bn.models._graph import copy_model
from keras_bn.models._graph import exactly_batch_normalization
from keras_bn.models._graph import reachable_batch_normalization
from keras_bn.models._state import copy_state
from keras_bn.models._state import finish_copy
from keras_bn.models.scope import _scope
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
    layer (of exactly those classes) is rebuilt as the class `to` names, from
    its config updated with `overrides`, with the original's weights. Every
    other layer is rebuilt from its config with its whole state and
    `trainable`, inside `batch_normalization_scope(to, **overrides)`, so batch
    normalization made inside custom layers converts too. A Functional
    subclass (a keras-hub `Backbone`) keeps its class where its config
    rebuilds it, else becomes a plain Functional model, with a warning. Like
    PyTorch's `SyncBatchNorm.convert_sync_batchnorm`, but both ways and as a
    copy, which shares nothing with the original and is compiled if it is.

    A weight the original lacks starts consistent with its statistics: with
    `renorm=True` added, `moving_stddev = renorm_stddev = sqrt(moving_variance
    + epsilon)` and `renorm_mean = moving_mean`; with `momentum=None` added,
    `num_batches_tracked = 0`. Converting to `"keras"` refuses what Keras's
    layer cannot express (several feature axes, `momentum=None`,
    `virtual_batch_size`, `moving_variance_estimator="unbiased"`) and drops
    `fused`, `virtual_batch_grouping` and `skip_nonfinite_updates`. Outputs
    equal the original's up to float32 rounding. Details in docs/models.md.

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
    target = check_target(to, overrides, FUNCTION_NAME)
    check_graph_model(model, FUNCTION_NAME, SUBCLASSED_ADVICE)
    # The scope below builds the layers; this raises its ValueError first, as
    # Keras's `from_config` would turn it into a TypeError.
    found = reachable_batch_normalization(model, FUNCTION_NAME, hidden=lambda _: None)
    for layer in filter(exactly_batch_normalization, found):
        target_arguments(layer.get_config(), target, overrides, FUNCTION_NAME)
    reasons = {}

    def rebuild(graph_model):
        try:
            rebuilt = type(graph_model).from_config(graph_model.get_config())
            copy_state(graph_model, rebuilt)
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
        converted, pairs, models = copy_model(model, clone_from_config, rebuild=rebuild)
        if model.compiled:  # as `clone_model` does, with a fresh optimizer
            converted.compile_from_config(model.get_compile_config())
        why = "its class cannot be rebuilt from a graph."
        finish_copy(models, pairs, FUNCTION_NAME, why, reasons)
    return converted
