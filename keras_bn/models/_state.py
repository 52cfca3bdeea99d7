"""Copying a layer's whole state into its copy, through Keras's saving hooks.

A layer's state is what `model.save()` writes for it: its own variables
(`save_own_variables`, which a layer may override: an adapted
`Normalization`'s statistics, a lookup layer's idf weights), its assets
(`save_assets`: a lookup layer's adapted vocabulary), the same for every
layer it holds, and `trainable`. Copying through the same hooks carries what
a `.keras` file would, with no list of special cases.
"""

import tempfile

import keras
import numpy as np

from keras_bn.models._graph import exactly_batch_normalization


def child_layers(layer):
    """The layers `layer` holds directly, each once, in a fixed order.

    A model's `layers` first, then the layers in its attributes (alone, or
    in lists, tuples and dicts), by attribute name, as Keras's saving walks
    them.
    """
    found, seen = [], {id(layer)}

    def add(value):
        if isinstance(value, keras.layers.Layer) and id(value) not in seen:
            seen.add(id(value))
            found.append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                add(value[key])

    if isinstance(layer, keras.Model):
        add(list(layer.layers))
    for name in sorted(vars(layer)):
        add(vars(layer)[name])
    return found


class StructureMismatch(ValueError):
    """The copy does not hold the same layers as the original."""


def copy_state(old, new, copy_batch_normalization, visited=None):
    """Copies the state of `old` and of every layer in it into `new`.

    Args:
        old: the original layer (or model).
        new: its copy, with the same structure: the same classes (a
            batch-normalization layer may change class) and names.
        copy_batch_normalization: `fn(old, new)` for a pair of batch
            normalization layers of exactly Keras's or keras_bn's class.
        visited: ids of original layers already copied (shared layers are
            copied once).

    Raises:
        StructureMismatch: where the two differ (nothing is rolled back; the
            caller drops the copy).
    """
    visited = set() if visited is None else visited
    if id(old) in visited or not isinstance(old, keras.layers.Layer):
        return  # copied already, or an operation without state (`ops.pad`)
    visited.add(id(old))
    if exactly_batch_normalization(old) and exactly_batch_normalization(new):
        copy_batch_normalization(old, new)
    elif type(old) is not type(new):
        raise StructureMismatch(
            f"layer {old.name!r} ({type(old).__name__}) was rebuilt as "
            f"{new.name!r} ({type(new).__name__})"
        )
    else:
        if not isinstance(old, keras.Model) and _config(old) != _config(new):
            raise StructureMismatch(
                f"layer {old.name!r} ({type(old).__name__}) was rebuilt with "
                "another config"
            )
        copy_own_state(old, new)
    old_children, new_children = child_layers(old), child_layers(new)
    # A layer's sublayers may be named anew (automatic names count instances).
    describe = _kind if not isinstance(old, keras.Model) else _model_layer_kind
    if [describe(c) for c in old_children] != [describe(c) for c in new_children]:
        raise StructureMismatch(
            f"layer {old.name!r} holds {[describe(c) for c in old_children]}, "
            f"its copy {[describe(c) for c in new_children]}"
        )
    for old_child, new_child in zip(old_children, new_children, strict=True):
        copy_state(old_child, new_child, copy_batch_normalization, visited)


def copy_trainable(old, new, visited=None):
    """Sets `trainable` of `new` and of every layer in it as in `old`.

    Parents first: setting a layer's `trainable` sets its sublayers' too,
    which then get their own value.
    """
    visited = set() if visited is None else visited
    if id(old) in visited or not isinstance(old, keras.layers.Layer):
        return
    visited.add(id(old))
    new.trainable = old.trainable
    for old_child, new_child in zip(child_layers(old), child_layers(new)):
        copy_trainable(old_child, new_child, visited)


def copy_trainable_everywhere(models, pairs):
    """`trainable` of a `copy_model` copy as in the original, parents first.

    Args:
        models: `copy_model`'s `(original, new, rebuilt)` graph models,
            outer models first.
        pairs: its `(original, new)` cloned operations.
    """
    visited = set()
    for old, new, rebuilt in models:
        if rebuilt:
            copy_trainable(old, new, visited)
        else:
            new.trainable = old.trainable
    for old, new in pairs:
        copy_trainable(old, new, visited)


def _config(layer):
    return {k: v for k, v in layer.get_config().items() if k != "name"}


def _model_layer_kind(layer):
    """A model's layers keep their config's names; inputs may be named anew."""
    return _kind(layer) if isinstance(layer, keras.layers.InputLayer) else layer.name


def _kind(layer):
    if exactly_batch_normalization(layer):
        return "batch normalization"
    return type(layer).__name__


def copy_own_state(old, new):
    """A layer's own variables and assets, without those of its sublayers."""
    store = {}
    old.save_own_variables(store)
    if store:
        new.load_own_variables({key: _value(v) for key, v in store.items()})
    if hasattr(old, "save_assets") and hasattr(new, "load_assets"):
        with tempfile.TemporaryDirectory() as directory:
            old.save_assets(directory)
            new.load_assets(directory)


def _value(value):
    """A stored variable as an array, so that the copy shares nothing."""
    if isinstance(value, keras.Variable):
        return np.array(value.numpy(), copy=True)
    return np.array(value, copy=True) if isinstance(value, np.ndarray) else value
