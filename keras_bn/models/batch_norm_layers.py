"""Finding the batch-normalization layers of a model, of either class."""

import keras

from keras_bn.models._graph import BATCH_NORMALIZATION_CLASSES
from keras_bn.models._graph import reachable_batch_normalization


def is_batch_normalization(layer):
    """Whether `layer` is a batch-normalization layer of Keras or of keras_bn.

    `keras_bn.BatchNormalization` subclasses
    `keras.layers.BatchNormalization`, so `isinstance(layer,
    keras.layers.BatchNormalization)` finds both; this test says the same
    in words, where code looks for batch normalization (as the fine-tuning
    guides do to keep it frozen).

    Args:
        layer: any object.

    Returns:
        True for instances of `keras.layers.BatchNormalization`,
        `keras_bn.BatchNormalization` and their subclasses.

    Example:

    ```python
    for layer in model.layers[-20:]:
        if not keras_bn.models.is_batch_normalization(layer):
            layer.trainable = True  # BN stays frozen
    ```
    """
    return isinstance(layer, BATCH_NORMALIZATION_CLASSES)


def batch_normalization_layers(model):
    """Every batch-normalization layer of a model, nested models included.

    Walks `model.layers` depth first, through nested models (Sequential,
    Functional and subclassed ones), and returns the layers of either class,
    each once, in that order.

    Args:
        model: a `keras.Model`.

    Returns:
        A list of `keras.layers.BatchNormalization` and
        `keras_bn.BatchNormalization` layers.

    Raises:
        ValueError: if the model holds batch-normalization statistics that
            the walk cannot reach (a layer inside a custom layer): a list
            without them would silently leave them out.

    Example:

    ```python
    base = keras.applications.ResNet50(weights=None, include_top=False)
    for layer in keras_bn.models.batch_normalization_layers(base):
        layer.trainable = False  # frozen BN: inference mode, fixed statistics
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`batch_normalization_layers` takes a keras.Model. "
            f"Received: model={model!r}"
        )
    return reachable_batch_normalization(
        model,
        "batch_normalization_layers",
        "Set `trainable` on the custom layer itself, or list its "
        "batch-normalization layers from its own attributes.",
        descend=lambda layer: isinstance(layer, keras.Model),
    )
