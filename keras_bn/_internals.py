"""Every reach into TensorFlow's and Keras's internals (no public equivalent),
each with its fallback, as docs/testing.md tabulates. `KERAS_BN_NO_INTERNALS=1`,
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
    ):
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - moved
            pass
    # The string table in the globals of `keras.losses.get` (so as not to
    # import `keras.src`).
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
    """Whether a gradient tape or forward accumulator is recording now.
    Fallback: True, the safe answer (hidden outputs are then differentiated)."""
    could_possibly_record = FOUND.get("could_possibly_record")
    return True if could_possibly_record is None else could_possibly_record()


def gradient_order(tensors):
    """What the active tapes can ask of `tensors`, eagerly: NO_GRADIENT,
    FIRST_ORDER, or HIGHER_ORDER (several tapes, a persistent one, a forward
    accumulator), as TensorFlow's own functions ask. HIGHER_ORDER in a graph
    (`tf.gradients` needs no tape) and as the fallback, also without
    `record_operation`, which FIRST_ORDER needs."""
    possible = FOUND.get("PossibleTapeGradientTypes")
    if tf.executing_eagerly() and possible and "record_operation" in FOUND:
        return possible(tensors)
    return HIGHER_ORDER


def stop_recording():
    """A context that pauses the tapes (only after FIRST_ORDER: no fallback)."""
    return FOUND["stop_recording"]()


def record_operation(name, outputs, inputs, backward):
    """Records `outputs` on the tapes as one op of `inputs` with gradient
    `backward` (only after FIRST_ORDER: no fallback)."""
    FOUND["record_operation"](name, outputs, inputs, backward)


def can_record_for_forward_accumulators():
    """Whether `record_for_forward_accumulators` is at hand. Fallback: False
    (`custom_op` then refuses forward mode in a graph with a clear error)."""
    return "record_operation_forwardprop_only" in FOUND


def record_for_forward_accumulators(name, outputs, inputs, backward):
    """Records `outputs` on the active forward accumulators (not on the
    tapes) as one op of `inputs`, whose JVP is `backward` transposed (only
    after `can_record_for_forward_accumulators`: no fallback)."""
    FOUND["record_operation_forwardprop_only"](name, outputs, inputs, backward, None)


def in_xla_function():
    """Whether ops are traced into a function that XLA compiles (`jit_compile`,
    and the functions it calls). Fallback: False (the same values)."""
    in_context = FOUND.get("GraphOrParentsInXlaContext")
    if tf.executing_eagerly() or in_context is None:
        return False
    return bool(in_context(tf.compat.v1.get_default_graph()))


def register_loss_names(classes):
    """Makes `model.compile(loss="keras_bn>ClassName")` work for `classes`.

    Keras 3 resolves a loss given as a string only against its own table of
    built-in losses (`keras.losses.get`), not against the registry of
    `register_keras_serializable`: this adds each class to that table under
    its registered name. Fallback: nothing added; loading still resolves it.
    """
    table = FOUND.get("ALL_OBJECTS_DICT")
    if table is None:
        return
    for cls in classes:
        table.setdefault(keras.saving.get_registered_name(cls), cls)


def keras_mask(tensor):
    """The mask Keras attached to `tensor` (a layer's output), or None.
    Fallback: None (Keras's masks are not seen)."""
    return _read(tensor, "mask_attribute")


def set_keras_mask(tensor, mask):
    """Attaches `mask` to `tensor`, where Keras's loss reduction reads it.
    Returns `tensor`. Fallback: nothing attached (a mean over an
    `ignore_class` loss then counts the ignored entries)."""
    _write(tensor, "mask_attribute", mask)
    return tensor


def keras_logits(tensor):
    """The logits behind a softmax output, as Keras's softmax records them,
    or None. Fallback: None (the output is read as probabilities)."""
    return _read(tensor, "logits_attribute")


def set_keras_logits(tensor, logits):
    """Records `logits` behind the softmax output `tensor`, as Keras's own
    softmax does, for the losses to read. Fallback: nothing recorded."""
    _write(tensor, "logits_attribute", logits)


def _read(tensor, attribute):
    return getattr(tensor, FOUND[attribute], None) if attribute in FOUND else None


def _write(tensor, attribute, value):
    if attribute in FOUND:
        setattr(tensor, FOUND[attribute], value)
