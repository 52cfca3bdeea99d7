r"""Custom-gradient ops that stay differentiable to any order.

Every op in `keras_bn.ops` runs its forward pass on inputs cut from the tape
(`tf.stop_gradient`: an outer eager tape holds none of its intermediates) and
gives its gradient as a hand-written backward pass. Differentiated in turn (a
gradient penalty, a Hessian-vector product, a `ForwardAccumulator`), that is
exact only if built from differentiable ops of tensors that the tape links to
the op's inputs. `custom_op` arranges that:

- the backward pass sees the op's *original* inputs, not the stopped ones;
- it sees the op's *outputs* as the tape knows them: tensors whose gradient
  is this op's own backward pass;
- values it needs beyond those (say `x - mean`) are *hidden outputs*, given
  to the tape and dropped before the caller sees them; the backward pass
  adds each one's own vector-Jacobian product for its upstream gradient.

Differentiating the backward pass then runs through this op again, so every
order is exact. In a first-order graph a hidden output's upstream gradient is
built as zeros (`Fill`, `ZerosLike`), so its term is skipped. Eagerly, the
tapes that watch the inputs tell whether the backward pass can be
differentiated at all: only then are the hidden outputs given to the tape.

Forward mode in a graph: an accumulator keeps the first tangent it is given
for a tensor, and `tf.custom_gradient` gives the stopped inputs' (zero) before
it records the op. So `custom_op` records its outputs on the accumulators
itself, first; without that internal (`keras_bn/_internals.py`), an
accumulator that reaches the op in a graph raises an error that says so.
"""

import tensorflow as tf

from keras_bn import _internals

NAME = "keras_bn_custom_op"  # of the op on the tapes and accumulators


def structurally_zero(tensor):
    """Whether `tensor` is None or a graph's `ZerosLike`, or `Fill` or `Const`
    of zeros (an unused output's upstream gradient); False for eager ones."""
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
        outputs, hidden: The op's outputs and hidden outputs, linked to the
            inputs through this op.
        saved: What the forward pass kept; constants under differentiation.
        recording: Whether a tape or forward accumulator records (or has
            recorded) this op's backward pass, to differentiate it.
    """

    def __init__(self, inputs):
        self.inputs = tuple(inputs)
        self.outputs = self.hidden = ()
        self.saved = None
        self.recording = False

    def live(self, upstream, hidden=True):
        """Whether an upstream gradient can be nonzero, so its terms count:
        False if structurally zero, else True in a graph or while the backward
        pass is recorded; otherwise False for a hidden output (nothing reached
        it), and for an output whether any entry is nonzero."""
        if structurally_zero(upstream):
            return False
        if not tf.executing_eagerly() or self.recording:
            return True
        # Read on the host: the statistics' gradients are per-feature vectors.
        return not hidden and bool(tf.get_static_value(upstream).any())

    def _backward(self, backward, upstream, hidden_upstream):
        """Calls `backward`, noting first whether a tape records it."""
        self.recording = self.recording or _internals.tape_could_record()
        return backward(self, upstream, hidden_upstream)


def custom_op(
    forward, backward, *inputs, first_order_reads=None, first_order_output_reads=None
):
    """Calls `forward` as one op with gradient `backward`, to any order.

    Args:
        forward: `forward(*stopped_inputs) -> (outputs, hidden, saved)`:
            tuples of outputs and hidden outputs, and anything to keep.
        backward: `backward(context, upstream, hidden_upstream)` (an
            `OpContext`, tuples of upstream gradients): one gradient per
            input; a hidden output's term only where `context.live(gradient)`.
        *inputs: Tensors.
        first_order_reads: The positions of the inputs that a first-order
            backward pass reads (default: all). Eagerly, the others are then
            released once the op has run (a `tf.TensorSpec` in their place).
        first_order_output_reads: The same for the op's outputs.

    Returns:
        The tuple of outputs (hidden outputs dropped).
    """
    order = _internals.gradient_order(inputs)
    if order == _internals.NO_GRADIENT:
        return tuple(forward(*inputs)[0])
    context = OpContext(inputs)
    if order == _internals.FIRST_ORDER:  # eager only: a graph is always HIGHER_ORDER
        outputs = _record_first_order(forward, backward, context)
        context.inputs = _specs_but(context.inputs, first_order_reads)
        context.outputs = _specs_but(context.outputs, first_order_output_reads)
        return outputs

    @tf.custom_gradient
    def op(*args):
        in_graph = not tf.executing_eagerly()
        record_jvp = in_graph and _internals.can_record_for_forward_accumulators()
        cut = _refuse_forward_mode if in_graph and not record_jvp else tf.stop_gradient
        outputs, hidden, context.saved = forward(*[cut(a) for a in args])
        # A forward accumulator runs the backward pass (transposed) before
        # this op returns, on these values; the linked outputs replace them.
        context.outputs, context.hidden = tuple(outputs), tuple(hidden)

        def grad(*upstream):
            n = len(context.outputs)
            return tuple(context._backward(backward, upstream[:n], upstream[n:]))

        if record_jvp:  # first, as the module docstring says
            results = list(context.outputs + context.hidden)
            _internals.record_for_forward_accumulators(NAME, results, list(args), grad)

        return context.outputs + context.hidden, grad

    results = op(*inputs)
    n = len(context.outputs)
    context.outputs, context.hidden = tuple(results[:n]), tuple(results[n:])
    return context.outputs


def _refuse_forward_mode(tensor):
    """`tensor` stopped behind an op whose gradient raises: a forward
    accumulator gets a clear error, not a stopped input's zero tangent."""
    refused = tf.raw_ops.PreventGradient(
        input=tensor,
        message="keras_bn: forward mode (tf.autodiff.ForwardAccumulator) inside "
        "a tf.function needs TensorFlow's record_operation_forwardprop_only, "
        "which this TensorFlow lacks; compute the JVP eagerly",
    )
    return tf.stop_gradient(refused)


def _specs_but(tensors, kept):
    """`tensors`, a `tf.TensorSpec` for each not in `kept` (None: all kept)."""
    return tuple(
        t if kept is None or i in kept else tf.TensorSpec(t.shape, t.dtype)
        for i, t in enumerate(tensors)
    )


def _record_first_order(forward, backward, context):
    """The eager first-order case: `tf.custom_gradient` less its per-call
    work, the forward pass run with the tapes paused and its outputs recorded
    as one op whose gradient is `backward`. Returns the outputs."""
    with _internals.stop_recording():
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

    _internals.record_operation(NAME, list(outputs), list(context.inputs), grad)
    return context.outputs
