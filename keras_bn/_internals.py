"""Every reach into TensorFlow's and Keras's internals (no public equivalent),
each with the fallback that docs/testing.md tabulates. `KERAS_BN_NO_INTERNALS=1`,
read at import, turns every internal off (`tests/test_internals.py`)."""

import importlib
import os

import keras
import tensorflow as tf

NO_INTERNALS = os.environ.get("KERAS_BN_NO_INTERNALS", "") not in ("", "0")


def _find_internals():
    found = {}
    if NO_INTERNALS:
        return found
    for module, name in (
        ("tensorflow.python.eager.record", "could_possibly_record"),
        ("tensorflow.python.eager.record", "stop_recording"),
        ("tensorflow.python.eager.record", "record_operation"),
        ("tensorflow.python.eager.record", "record_operation_forwardprop_only"),
        ("tensorflow.python.ops.gradients_util", "PossibleTapeGradientTypes"),
        ("tensorflow.python.ops.control_flow_util", "GraphOrParentsInXlaContext"),
        ("tensorflow.python.util._pywrap_util_port", "IsMklEnabled"),
    ):
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - moved
            pass
    # Keras's table of loss names, found without importing `keras.src`.
    table = getattr(keras.losses.get, "__globals__", {}).get("ALL_OBJECTS_DICT")
    if isinstance(table, dict):
        found["ALL_OBJECTS_DICT"] = table
    # Keras's convention: attributes of the tensors its layers return.
    found["mask_attribute"], found["logits_attribute"] = "_keras_mask", "_keras_logits"
    return found


# The tests empty this to reach every fallback.
FOUND = _find_internals()

NO_GRADIENT, FIRST_ORDER, HIGHER_ORDER = 0, 1, 2


def tape_could_record():
    """Whether a tape or forward accumulator is recording now (fallback: True)."""
    could_possibly_record = FOUND.get("could_possibly_record")
    return True if could_possibly_record is None else could_possibly_record()


def gradient_order(tensors):
    """What the active tapes can ask of `tensors`, eagerly: NO_GRADIENT,
    FIRST_ORDER, or HIGHER_ORDER (several tapes, a persistent one, a forward
    accumulator; also in a graph, and as the fallback)."""
    possible = FOUND.get("PossibleTapeGradientTypes")
    if tf.executing_eagerly() and possible and "record_operation" in FOUND:
        return possible(tensors)
    return HIGHER_ORDER


def stop_recording():
    """A context that pauses the tapes (only after FIRST_ORDER: no fallback)."""
    return FOUND["stop_recording"]()


def record_operation(name, outputs, inputs, backward):
    """Records `outputs` on the tapes as one op of `inputs` (after FIRST_ORDER)."""
    FOUND["record_operation"](name, outputs, inputs, backward)


def can_record_for_forward_accumulators():
    """Whether `record_for_forward_accumulators` is at hand (fallback: False)."""
    return "record_operation_forwardprop_only" in FOUND


def record_for_forward_accumulators(name, outputs, inputs, backward):
    """Records `outputs` on the forward accumulators only, with the JVP
    `backward` transposed (after `can_record_for_forward_accumulators`)."""
    FOUND["record_operation_forwardprop_only"](name, outputs, inputs, backward, None)


def in_xla_function(unknown=False):
    """Whether ops are traced for XLA to compile. Fallback in a graph:
    `unknown` (True where only the XLA-safe path is right in both)."""
    in_context = FOUND.get("GraphOrParentsInXlaContext")
    if tf.executing_eagerly():
        return False
    if in_context is None:
        return unknown
    return bool(in_context(tf.compat.v1.get_default_graph()))


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN CPU kernels (fallback: False)."""
    enabled = FOUND.get("IsMklEnabled")
    return bool(enabled and enabled())


def register_loss_names(classes):
    """Makes `model.compile(loss="keras_bn>ClassName")` work for `classes`, in
    the table that `keras.losses.get` resolves strings against. Fallback:
    nothing added; loading still resolves them."""
    table = FOUND.get("ALL_OBJECTS_DICT")
    if table is None:
        return
    for cls in classes:
        table.setdefault(keras.saving.get_registered_name(cls), cls)


def keras_mask(tensor):
    """The mask Keras attached to `tensor` (a layer's output), or None."""
    return _read(tensor, "mask_attribute")


def set_keras_mask(tensor, mask):
    """`tensor`, with `mask` attached where Keras's loss reduction reads it."""
    _write(tensor, "mask_attribute", mask)
    return tensor


def keras_logits(tensor):
    """The logits behind a softmax output, as Keras records them, or None."""
    return _read(tensor, "logits_attribute")


def set_keras_logits(tensor, logits):
    """Records `logits` behind the softmax output `tensor`, as Keras does."""
    _write(tensor, "logits_attribute", logits)


def _read(tensor, attribute):
    return getattr(tensor, FOUND[attribute], None) if attribute in FOUND else None


def _write(tensor, attribute, value):
    if attribute in FOUND:
        setattr(tensor, FOUND[attribute], value)
