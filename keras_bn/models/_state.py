"""Copying a layer's whole state into its copy, through Keras's saving hooks.

A layer's state is what `model.save()` writes for it: its own variables
(`save_own_variables`), its assets (`save_assets`), the same for every layer
it holds, and `trainable`. See docs/models.md, "What a copy carries".
"""

import tempfile
import warnings

import keras
import numpy as np

from keras_bn.models._graph import exactly_batch_normalization


def child_layers(layer):
    """The layers `layer` holds directly, each once: a model's `layers`, then
    those in its attributes (alone, or in lists, tuples and dicts) by name."""
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


def layer_pairs(old, new, visited):
    """`(old, new)` for `old` and every layer in it not in `visited` (ids),
    parents first; a ValueError where their sublayers differ."""
    if id(old) in visited or not isinstance(old, keras.layers.Layer):
        return  # done already, or an operation without state (`ops.pad`)
    visited.add(id(old))
    yield old, new
    old_children, new_children = child_layers(old), child_layers(new)
    in_model = isinstance(old, keras.Model)
    old_kinds = [_kind(child, in_model) for child in old_children]
    new_kinds = [_kind(child, in_model) for child in new_children]
    if old_kinds != new_kinds:
        raise ValueError(f"layer {old.name!r} holds {old_kinds}, its copy {new_kinds}")
    for old_child, new_child in zip(old_children, new_children, strict=True):
        yield from layer_pairs(old_child, new_child, visited)


def copy_state(original, copy, visited=None):
    """Copies the state of `original` and of every layer in it into `copy`
    (see `layer_pairs`); a batch-normalization layer may change class."""
    visited = set() if visited is None else visited
    for old, new in layer_pairs(original, copy, visited):
        if exactly_batch_normalization(old) and exactly_batch_normalization(new):
            weights = {variable.name: variable.numpy() for variable in old.weights}
            set_batch_normalization_weights(new, weights)  # `num_batches_tracked`: 0
        elif type(old) is not type(new):
            raise ValueError(
                f"layer {old.name!r} ({type(old).__name__}) was rebuilt as "
                f"{new.name!r} ({type(new).__name__})"
            )
        elif not isinstance(old, keras.Model) and _config(old) != _config(new):
            raise ValueError(
                f"layer {old.name!r} ({type(old).__name__}) was rebuilt with "
                "another config"
            )
        else:
            copy_own_state(old, new)


def finish_copy(models, pairs, function_name, why, reasons=None, done=()):
    """Completes a `copy_model` copy: the state of each pair's layers (but
    those in `done`, ids), then `trainable` as in the original, parents first
    (a layer's `trainable` sets its sublayers' too); a warning for each model
    whose copy lost its class, for the reason `why` or `reasons[id(old)]`."""
    visited = set(done)
    for old, new in pairs:
        copy_state(old, new, visited)
    for old, new, _ in models:
        if type(new) is not type(old):
            warnings.warn(
                f"`{function_name}`: the copy of {old.name!r} is a plain "
                f"{type(new).__name__} model, not a {type(old).__name__}: "
                f"{(reasons or {}).get(id(old), why)} Its predictions are the "
                "original's; class attributes (such as a keras-hub Backbone's "
                "`pyramid_outputs`) are lost.",
                stacklevel=3,
            )
    visited = set()
    for old, new, rebuilt in models:
        if not rebuilt:
            new.trainable = old.trainable
    walked = [(old, new) for old, new, rebuilt in models if rebuilt] + pairs
    for old, new in walked:
        for old_layer, new_layer in layer_pairs(old, new, visited):
            new_layer.trainable = old_layer.trainable


def _config(layer):
    return {k: v for k, v in layer.get_config().items() if k != "name"}


def _kind(layer, in_model):
    """A model's layers keep their config's names (inputs may be named anew);
    a layer's sublayers may be named anew (automatic names count instances)."""
    if in_model and not isinstance(layer, keras.layers.InputLayer):
        return layer.name
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


def set_batch_normalization_weights(layer, values):
    """Assigns `values` to `layer`'s weights by name (skipping the others);
    renorm statistics `values` lacks start consistent with the moving ones."""
    stddev = np.sqrt(np.asarray(values["moving_variance"], "float64") + layer.epsilon)
    renorm = {"moving_stddev": stddev, "renorm_stddev": stddev}
    renorm["renorm_mean"] = values["moving_mean"]
    for variable in layer.weights:
        value = values.get(variable.name, renorm.get(variable.name))
        if value is None:
            continue
        if tuple(np.shape(value)) != tuple(variable.shape):
            raise ValueError(
                f"`convert_batch_normalization`: weight {variable.name!r} of layer "
                f"{layer.name!r} has shape {np.shape(value)}, the converted "
                f"layer's has {tuple(variable.shape)} (an `axis` override?)."
            )
        variable.assign(np.asarray(value).astype(variable.dtype))
