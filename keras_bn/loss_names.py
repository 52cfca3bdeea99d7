"""Makes `model.compile(loss="keras_bn>SoftmaxCrossEntropy")` work.

Keras 3 resolves a loss given as a string only against its own table of
built-in losses (`keras.losses.get`), not against the registry that
`keras.saving.register_keras_serializable` fills: a registered loss loads from
a `.keras` file but is not found by `compile`. This adds each keras_bn loss to
that table under its registered name (`keras_bn>ClassName`), once, at import.
If a Keras version has no such table, nothing is added and a string still
resolves wherever Keras itself consults the registry.
"""

import keras


def register_loss_names(classes):
    """Adds `classes` to Keras's string-to-loss table under registered names."""
    table = getattr(keras.losses.get, "__globals__", {}).get("ALL_OBJECTS_DICT")
    if not isinstance(table, dict):
        return
    for cls in classes:
        table.setdefault(keras.saving.get_registered_name(cls), cls)
