r"""Custom-gradient ops that stay differentiable to any order.

Every op in `keras_bn.ops` runs its forward pass on inputs cut from the tape
(`tf.stop_gradient`), so that an outer eager tape holds none of its
intermediates, and gives its gradient as a hand-written backward pass. That
backward pass, differentiated in turn (a gradient penalty, a Hessian-vector
product, `tf.autodiff.ForwardAccumulator`, `jacobian`), is exact only if it
is built from differentiable ops of tensors that the tape links to the op's
inputs. `custom_op` arranges that:

- the backward pass sees the op's *original* inputs, not the stopped ones;
- it sees the op's *outputs* as the tape knows them: tensors whose gradient
  is this op's own backward pass;
- values it needs beyond those (say `x - mean`) are *hidden outputs*, given
  to the tape and dropped before the caller sees them; the backward pass
  adds each one's own vector-Jacobian product for its upstream gradient.

Differentiating the backward pass then runs through this op again, so every
order is exact. In a first-order pass a hidden output's upstream gradient is
zero: under `tf.function` the tape builds it as `Fill` or `ZerosLike`, known
when the graph is built, so its term costs nothing. Eagerly, the tapes that
watch the inputs tell whether the backward pass can be differentiated at all:
only then are the hidden outputs given to the tape; with no tape watching,
the op runs as its plain forward pass.

Forward mode in a graph: an accumulator keeps the first tangent it is given
for a tensor, and `tf.custom_gradient` passes on the stopped inputs' (zero)
before it records the op. So `custom_op` records its outputs on the
accumulators first, with the backward pass to transpose, as eagerly. Without
that internal (`keras_bn/_internals.py`), an accumulator that reaches the op
in a graph raises an error that says so.
"""

import tensorflow as tf

from keras_bn._internals import FIRST_ORDER
from keras_bn._internals import NO_GRADIENT
from keras_bn._internals import can_record_for_forward_accumulators
from keras_bn._internals import gradient_order
from keras_bn._internals import record_for_forward_accumulators
from keras_bn._internals import record_operation
from keras_bn._internals import stop_recording
from keras_bn._internals import tape_could_record


def structurally_zero(tensor):
    """Whether `tensor` is None or, in a graph, built as zeros: the upstream
    gradient the tape makes for an unused output (`ZerosLike`, or a `Fill` or
    `Const` of zeros). Never reads an eager tensor's values: False for all."""
    if tensor is None:
        return True
    op = getattr(tensor, "op", None)  # eager tensors have none
    if op is None or op.type not in ("ZerosLike", "Fill", "Const"):
        return False
    if op.type == "ZerosLike":
        return True
    value = tf.get_static_value(op.inputs[1] if op.type == "Fill" else tensor)
    return value is not None and not value.any()


class OpContext:
    """What a backward pass of `custom_op` sees.

    Attributes:
        inputs: The op's inputs, as the caller passed them (not stopped).
        outputs: The op's outputs, linked to the inputs through this op.
        hidden: The op's hidden outputs, linked the same way.
        saved: Whatever the forward pass returned to keep; constants under
            differentiation (values the math treats as constant, such as the
            shift of a softmax or Batch Renormalization's `r` and `d`).
        recording: Whether a tape or forward accumulator has recorded (or is
            recording) this op's backward pass: then it is differentiated.
    """

    def __init__(self, inputs):
        self.inputs = tuple(inputs)
        self.outputs = self.hidden = ()
        self.saved = None
        self.recording = False

    def live(self, upstream, hidden=True):
        """Whether an upstream gradient can be nonzero, so its terms count.

        False when it is structurally zero (an unused output in a graph).
        True in a graph, or eagerly while this op's backward pass is recorded
        (its dependents then matter, not its value). Otherwise False for a
        hidden output (nothing can have reached it), and for a returned
        output whether any entry is nonzero.
        """
        if structurally_zero(upstream):
            return False
        if not tf.executing_eagerly() or self.recording:
            return True
        # Read on the host: the statistics' gradients are per-feature vectors.
        return not hidden and bool(tf.get_static_value(upstream).any())

    def _backward(self, backward, upstream, hidden_upstream):
        """Calls `backward`, noting first whether a tape records it."""
        self.recording = self.recording or tape_could_record()
        return backward(self, upstream, hidden_upstream)


def shape_of(tensor):
    """The shape of an input in `OpContext.inputs`: a tensor's, or the static
    shape of a `tf.TensorSpec` that stands for a released input."""
    if isinstance(tensor, tf.TensorSpec):
        return tensor.shape.as_list()
    return tf.shape(tensor)


def custom_op(
    forward, backward, *inputs, first_order_reads=None, first_order_output_reads=None
):
    """Calls `forward` as one op with gradient `backward`, to any order.

    Args:
        forward: `forward(*stopped_inputs) -> (outputs, hidden, saved)`:
            tuples of output and hidden-output tensors, and anything to keep
            for the backward pass (`OpContext.saved`).
        backward: `backward(context, upstream, hidden_upstream)`, with
            `context` an `OpContext` and the upstream gradients as tuples,
            returns one gradient per input, built as the module docstring
            says; a hidden output's term only where `context.live(gradient)`.
        *inputs: Tensors.
        first_order_reads: The positions of the inputs whose values a
            first-order backward pass reads (default: all). Eagerly, where
            the backward pass cannot be differentiated, the others are
            released once the op has run (`context.inputs` then holds a
            `tf.TensorSpec` in their place, which `shape_of` reads), so the
            op keeps no large input alive.
        first_order_output_reads: The same for the op's outputs (the caller
            keeps the outputs it uses; the op need not).

    Returns:
        The tuple of outputs (hidden outputs dropped).
    """
    order = gradient_order(inputs)
    if order == NO_GRADIENT:
        return tuple(forward(*inputs)[0])
    context = OpContext(inputs)
    if order == FIRST_ORDER:  # eager only: a graph is always HIGHER_ORDER
        outputs = _record_first_order(forward, backward, context)
        context.inputs = _specs_but(context.inputs, first_order_reads)
        context.outputs = _specs_but(context.outputs, first_order_output_reads)
        return outputs

    @tf.custom_gradient
    def op(*args):
        in_graph = not tf.executing_eagerly()
        record_jvp = in_graph and can_record_for_forward_accumulators()
        cut = _refuse_forward_mode if in_graph and not record_jvp else tf.stop_gradient
        outputs, hidden, context.saved = forward(*[cut(a) for a in args])
        # A forward accumulator runs the backward pass (transposed) before
        # this op returns, on these values; the linked outputs replace them.
        context.outputs, context.hidden = tuple(outputs), tuple(hidden)

        def grad(*upstream):
            n = len(context.outputs)
            return tuple(context._backward(backward, upstream[:n], upstream[n:]))

        if record_jvp:  # first, as the module docstring says
            record_for_forward_accumulators(
                "keras_bn_custom_op",
                list(context.outputs + context.hidden),
                list(args),
                grad,
            )

        return context.outputs + context.hidden, grad

    results = op(*inputs)
    n = len(context.outputs)
    context.outputs, context.hidden = tuple(results[:n]), tuple(results[n:])
    return context.outputs


def _refuse_forward_mode(tensor):
    """`tensor` stopped, but first through an op whose gradient raises: a
    forward accumulator that reaches it in a graph (it differentiates the
    gradient) gets a clear error, not the zero tangent of a stopped input."""
    refused = tf.raw_ops.PreventGradient(
        input=tensor,
        message="keras_bn: forward mode (tf.autodiff.ForwardAccumulator) inside "
        "a tf.function needs TensorFlow's record_operation_forwardprop_only, "
        "which this TensorFlow lacks; compute the JVP eagerly",
    )
    return tf.stop_gradient(refused)


def _specs_but(tensors, kept):
    """`tensors`, with a `tf.TensorSpec` in place of those not in `kept`
    (all kept when None)."""
    return tuple(
        t if kept is None or i in kept else tf.TensorSpec(t.shape, t.dtype)
        for i, t in enumerate(tensors)
    )


def _record_first_order(forward, backward, context):
    """The eager first-order case, recorded on the tapes directly.

    What `tf.custom_gradient` does, less its per-call work (argument
    inspection, variable watching, an identity per output): the forward
    pass runs with the tapes paused, and its outputs are recorded as one op
    whose gradient is `backward`. (`gradient_order` gives FIRST_ORDER only
    where TensorFlow's tape API is at hand.) Returns the outputs.
    """
    with stop_recording():
        outputs, hidden, context.saved = forward(*context.inputs)
        # An output that is an input (a cast to its own dtype) gets its own
        # tensor: the tape records outputs apart from inputs.
        outputs = [
            tf.identity(o) if any(o is i for i in context.inputs) else o
            for o in outputs
        ]
    context.outputs, context.hidden = tuple(outputs), tuple(hidden)
    none = (None,) * len(context.hidden)

    def grad(*upstream):
        return list(context._backward(backward, upstream, none))

    record_operation("keras_bn_custom_op", list(outputs), list(context.inputs), grad)
    return context.outputs
