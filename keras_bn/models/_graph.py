"""Walking and copying Sequential and Functional models, nested ones included,
with the public Keras API only: `model.layers`, `Model.get_config()` (whose
`inbound_nodes` record which layer feeds which) and `keras.models.clone_model`.
"""

import collections
import functools

import keras

from keras_bn.layers import BatchNormalization


def exactly_batch_normalization(layer):
    """Of exactly Keras's or keras_bn's class: a subclass may compute else."""
    return type(layer) in (keras.layers.BatchNormalization, BatchNormalization)


@functools.cache
def _functional_class():
    # Keras exports no Functional class; `keras.Model(inputs, outputs)` is one.
    inputs = keras.Input((1,))
    return type(keras.Model(inputs, keras.layers.Identity()(inputs)))


def is_graph_model(layer):
    """A Sequential or Functional model whose `call` runs its graph (one
    that overrides `call` counts as subclassed)."""
    if isinstance(layer, keras.Sequential):
        return type(layer).call is keras.Sequential.call
    functional = _functional_class()
    return isinstance(layer, functional) and type(layer).call is functional.call


def check_model(model, function_name):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{function_name}` takes a keras.Model. Received: model={model!r}"
        )


def check_graph_model(model, function_name, instead):
    """Raises unless `model` is a built Sequential or Functional model;
    `instead` says what to do with a subclassed one."""
    check_model(model, function_name)
    if not is_graph_model(model):
        raise ValueError(
            f"`{function_name}` needs a Sequential or Functional model (nested "
            "models included), whose layers and connections it can read. "
            f"Received a subclassed model of class {type(model).__name__}, "
            f"whose `call` is Python code. {instead}"
        )
    if not model.built:
        raise ValueError(
            f"`{function_name}`: the model {model.name!r} is not built. Start "
            "it with `keras.Input(...)` or call it once on data first."
        )


def iter_layers(model, descend=is_graph_model, seen=None):
    """Every layer of a model once, depth first, each layer for which
    `descend(layer)` holds followed by its own layers."""
    seen = set() if seen is None else seen
    for layer in model.layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            yield layer
            if descend(layer):
                yield from iter_layers(layer, descend, seen)


HIDDEN_ADVICE = (
    "Build that part with the Functional API, so that its layers are "
    "reachable, and try again."
)


def reachable_batch_normalization(
    model, function_name, instead=HIDDEN_ADVICE, descend=is_graph_model, hidden=None
):
    """The `keras.layers.BatchNormalization` layers `iter_layers` reaches.

    One inside a custom layer or a subclassed model is not reachable, but its
    `moving_variance` gives it away: then this raises, or calls
    `hidden(paths)` with the paths of those variables."""
    found = [
        layer
        for layer in iter_layers(model, descend)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    known = {id(variable) for layer in found for variable in layer.weights}
    paths = [
        variable.path
        for variable in model.weights
        if variable.name == "moving_variance" and id(variable) not in known
    ]
    if paths and hidden is not None:
        hidden(paths)
    elif paths:
        raise ValueError(
            f"`{function_name}` reaches the layers of Sequential and Functional "
            "models only, but the model holds batch-normalization statistics "
            f"inside a custom layer or a subclassed model: {paths}. {instead}"
        )
    return found


def copy_model(model, clone_layer, skip=(), rebuild=None):
    """An uncompiled copy of a graph model, nested graph models copied too.

    `clone_layer(operation)` copies (or returns, to share) each operation that
    is not a graph model; the layers in `skip`, called on one tensor, are cut
    out; `rebuild(graph)` is tried first on each Functional subclass (a
    keras-hub `Backbone`): a model of its class with its state, or None.
    Returns `(copy, pairs, models)`: `(original, new)` per `clone_layer` call,
    `(original, new, rebuilt)` per graph model, outer models first.
    """
    skip_ids = {id(layer) for layer in skip}
    cache, pairs, models = {}, [], []

    def clone(layer):
        if id(layer) not in cache:
            if is_graph_model(layer):
                cache[id(layer)] = copy(layer)
            elif id(layer) in skip_ids:
                cache[id(layer)] = layer  # never called: `call` passes through
            else:
                cache[id(layer)] = clone_layer(layer)
                pairs.append((layer, cache[id(layer)]))
        return cache[id(layer)]

    def call(layer, *args, **kwargs):
        return args[0] if id(layer) in skip_ids else layer(*args, **kwargs)

    def copy(graph_model):
        entry = len(models)
        models.append(None)  # outer models first
        # A subclass's constructor may not take a graph (a keras-hub Backbone).
        subclass = type(graph_model) not in (_functional_class(), keras.Sequential)
        if rebuild is not None and subclass:
            rebuilt = rebuild(graph_model)
            if rebuilt is not None:
                models[entry] = (graph_model, rebuilt, True)
                return rebuilt
        if isinstance(graph_model, keras.Sequential):
            copied = _copy_sequential(graph_model, clone, skip_ids)
        else:
            copied = keras.models.clone_model(
                graph_model, clone_function=clone, call_function=call
            )
            if copied.compiled:  # clone_model compiles; a new Functional does not
                copied = keras.Model(copied.input, copied.output, name=copied.name)
        models[entry] = (graph_model, copied, False)
        return copied

    return copy(model), pairs, models


def _copy_sequential(model, clone, skip_ids):
    layers = [clone(layer) for layer in model.layers if id(layer) not in skip_ids]
    spec = model.inputs[0]
    inputs = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name)
    return keras.Sequential(
        [inputs, *layers], name=model.name, trainable=model.trainable
    )


def clone_from_config(layer, **changes):
    """A new layer of the same class, from `layer`'s config with `changes`."""
    return type(layer).from_config({**layer.get_config(), **changes})


def sole_input_producers(model):
    """`(pairs, uses)` over `model` and every graph model nested in it.

    `uses[id(operation)]` counts its calls (a nested model called several
    times counts once: each call runs the same graph). `pairs` holds the
    `(producer, consumer)` pairs of one graph where both are called once there
    and the consumer on a single tensor that only it takes from the producer
    (no model output either); in a Sequential model, each layer and the next.
    """
    pairs, uses = [], collections.Counter()
    nested = [layer for layer in iter_layers(model) if is_graph_model(layer)]
    for graph in [model, *nested]:
        if isinstance(graph, keras.Sequential):
            uses.update(id(layer) for layer in graph.layers)
            pairs += zip(graph.layers[:-1], graph.layers[1:])
            continue
        # A subclass's `get_config` may hold its constructor's arguments.
        view = keras.Model(graph.inputs, graph.outputs, name=graph.name)
        config, operations = view.get_config(), {op.name: op for op in view.operations}
        nodes = {entry["name"]: entry["inbound_nodes"] for entry in config["layers"]}
        tensor_uses = collections.Counter(_keras_histories(list(nodes.values())))
        outputs = keras.tree.flatten(config["output_layers"])  # name, node, tensor...
        tensor_uses.update(tuple(outputs[i : i + 3]) for i in range(0, len(outputs), 3))
        for name, layer_nodes in nodes.items():
            uses[id(operations[name])] += len(layer_nodes)
            inputs = [list(_keras_histories(node)) for node in layer_nodes]
            if len(inputs) != 1 or len(inputs[0]) != 1:
                continue
            history = inputs[0][0]  # (producer, node index, tensor index)
            if len(nodes.get(history[0], ())) == 1 and tensor_uses[history] == 1:
                pairs.append((operations[history[0]], operations[name]))
    return pairs, uses


def _keras_histories(node):
    """The `(layer, node, tensor)` triples of the tensors a node is called on."""
    if isinstance(node, dict) and node.get("class_name") == "__keras_tensor__":
        yield tuple(node["config"]["keras_history"])
    elif isinstance(node, dict | list | tuple):
        for value in node.values() if isinstance(node, dict) else node:
            yield from _keras_histories(value)
