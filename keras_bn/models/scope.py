"""Building models with one class of batch normalization, wherever it is made."""

import contextlib
import inspect
import threading

import keras

from keras_bn.layers import BatchNormalization
from keras_bn.layers.batch_normalization import KERAS_BN_ONLY
from keras_bn.ops.checks import check_choice

TARGETS = {"keras_bn": BatchNormalization, "keras": keras.layers.BatchNormalization}
_ACTIVE = threading.local()
KERAS_VALUES = {"virtual_batch_size": None, "moving_variance_estimator": "biased"}


@contextlib.contextmanager
def batch_normalization_scope(to="keras_bn", **overrides):
    """Builds every batch-normalization layer made inside it as one class.

    Inside the scope, constructing a `keras.layers.BatchNormalization` or a
    `keras_bn.BatchNormalization` (not a subclass) gives a layer of the class
    `to` names, with `overrides` applied, wherever it is made: in a model's
    Python code (keras-hub constructors and presets included), in
    `from_config` and in `keras.saving.load_model`. Weights saved from a
    model built with one class load into the same model built with the
    other, unless an override adds weights (`renorm=True`, `momentum=None`).
    The scope acts on the thread that entered it.

    Args:
        to: `"keras_bn"` (the default) or `"keras"`: the class to build.
        **overrides: constructor arguments set on every layer it builds,
            e.g. `synchronized=True`.

    Returns:
        A context manager.

    Raises:
        ValueError: for an unknown `to` or override (at once), or, with
            `to="keras"`, when a layer Keras's class cannot express is made.

    Example:

    ```python
    with keras_bn.models.batch_normalization_scope("keras_bn"):
        backbone = keras_hub.models.MobileNetBackbone(...)  # keras_bn's layers
    backbone.load_weights("mobilenet.weights.h5")  # saved with Keras's layers
    ```
    """
    target = check_target(to, overrides, "batch_normalization_scope")
    with _scope(target, overrides, "batch_normalization_scope"):
        yield


@contextlib.contextmanager
def _scope(target, overrides, function_name):
    """The scope with `target` as a class: the other class's `__new__` makes a
    `target` layer; with overrides, `target.__init__` applies them too. Both
    are restored on exit (an enclosing scope's patches included)."""
    source = TARGETS["keras" if target is BatchNormalization else "keras_bn"]
    previous = getattr(_ACTIVE, "scope", None)
    saved = {
        (cls, name): vars(cls).get(name)
        for cls, name in ((source, "__new__"), (target, "__init__"))
    }
    _ACTIVE.scope = (source, target, overrides, function_name)
    source.__new__ = _new
    if overrides:
        target.__init__ = _init_with_overrides(saved[target, "__init__"], target)
    try:
        yield
    finally:
        _ACTIVE.scope = previous
        for (cls, name), value in saved.items():
            if value is not None:
                setattr(cls, name, value)
            elif name in vars(cls):
                delattr(cls, name)


def _active(cls, role):
    """The active scope if `cls` is exactly (not a subclass of) its class in
    `role` on this thread."""
    scope = getattr(_ACTIVE, "scope", None)
    return scope if scope is not None and cls is scope[role] else None


def _new(cls, *args, **kwargs):
    scope = _active(cls, 0)
    if scope is None:
        return keras.layers.Layer.__new__(cls, *args, **kwargs)
    target = scope[1]
    config = _arguments(cls, args, kwargs, scope)
    layer = keras.layers.Layer.__new__(target, **config)
    target.__init__(layer, **config)
    if isinstance(layer, cls):  # Python calls __init__ again, with `args`
        layer._built_by_scope = True  # which returns at once
    return layer


def _init_with_overrides(original, target):
    def __init__(self, *args, **kwargs):
        scope = _active(type(self), 1)
        if scope is None or self.__dict__.get("_built_by_scope"):
            return original(self, *args, **kwargs)
        return original(self, **_arguments(target, args, kwargs, scope))

    # Keras reads the constructor's signature (auto-config): the original's.
    __init__.__signature__ = inspect.signature(original)
    return __init__


def _arguments(cls, args, kwargs, scope):
    """The arguments of a call of `cls`'s constructor, by name with defaults,
    as the scope's target class takes them."""
    arguments = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    arguments.apply_defaults()
    config = dict(arguments.arguments)
    config.pop("self")
    config.update(config.pop("kwargs", {}))
    _, target, overrides, function_name = scope
    return target_arguments(config, target, overrides, function_name)


def check_target(to, overrides, function_name):
    """The class `to` names; a ValueError for an unknown `to` or override."""
    target = TARGETS[check_choice(to, "to", TARGETS)]
    parameters = inspect.signature(target.__init__).parameters
    accepted = [name for name in parameters if name not in ("self", "kwargs")]
    if target is not BatchNormalization:  # to set them to Keras's values
        accepted += list(KERAS_BN_ONLY)
    accepted += ["name", "dtype", "trainable"]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        module = "keras_bn" if target is BatchNormalization else "keras.layers"
        raise ValueError(
            f"`{function_name}`: {unknown} are not arguments of "
            f"{module}.BatchNormalization. Accepted: {accepted}"
        )
    return target


def target_arguments(config, target, overrides, function_name):
    """Constructor arguments for `target` from a BN layer's config (or
    constructor arguments) and `overrides`; a ValueError for what Keras's
    layer cannot express."""
    name = config.get("name") or "(unnamed)"
    config = {**config, **overrides}
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
    for key, keras_value in KERAS_VALUES.items():
        if config.get(key, keras_value) != keras_value:
            problems.append(f"{key}={config[key]!r}")
    if problems:
        raise ValueError(
            f"`{function_name}`: layer {name!r} cannot become a "
            "keras.layers.BatchNormalization, which has no "
            f"{'; no '.join(problems)}. Keep keras_bn's layer, or pass "
            "overrides with Keras's values (e.g. momentum=0.99, "
            "virtual_batch_size=None, moving_variance_estimator='biased')."
        )
    for name in KERAS_BN_ONLY:
        config.pop(name, None)
    return config
