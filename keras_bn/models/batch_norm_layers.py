"""Finding the batch-normalization layers of a model, nested ones included."""

import keras

from keras_bn.models._graph import check_model
from keras_bn.models._graph import reachable_batch_normalization


def batch_normalization_layers(model):
    """Every batch-normalization layer of a model, nested models included.

    The `keras.layers.BatchNormalization` layers (keras_bn's included) of
    `model.layers`, each once, depth first through nested models of all kinds.

    Args:
        model: a `keras.Model`.

    Returns:
        A list of `keras.layers.BatchNormalization` layers.

    Raises:
        ValueError: if the model holds batch-normalization statistics that
            the walk cannot reach (a layer inside a custom layer).

    Example:

    ```python
    base = keras.applications.ResNet50(weights=None, include_top=False)
    for layer in keras_bn.models.batch_normalization_layers(base):
        layer.trainable = False  # frozen BN: inference mode, fixed statistics
    ```
    """
    check_model(model, "batch_normalization_layers")
    return reachable_batch_normalization(
        model,
        "batch_normalization_layers",
        "Set `trainable` on the custom layer itself, or list its "
        "batch-normalization layers from its own attributes.",
        descend=lambda layer: isinstance(layer, keras.Model),
    )
