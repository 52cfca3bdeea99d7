"""Batch normalization folded into the convolution or dense layer before it."""

import warnings

import keras
import numpy as np
from keras import layers

from keras_bn.layers import BatchNormalization
from keras_bn.models._graph import check_graph_model
from keras_bn.models._graph import clone_from_config
from keras_bn.models._graph import copy_model
from keras_bn.models._graph import exactly_batch_normalization
from keras_bn.models._graph import reachable_batch_normalization
from keras_bn.models._graph import sole_input_producers
from keras_bn.models._state import finish_copy
from keras_bn.models.scope import KERAS_VALUES
from keras_bn.models.scope import target_arguments
from keras_bn.ops import canonicalize_axes

FUNCTION_NAME = "fold_batch_normalization"
# Exact classes: a subclass may compute something else with the same kernel.
TRANSPOSED = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
DEPTHWISE = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)
SEPARABLE = (layers.SeparableConv1D, layers.SeparableConv2D)
PLAIN = (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.Dense)
FOLDABLE = PLAIN + TRANSPOSED + DEPTHWISE + SEPARABLE
SUBCLASSED_ADVICE = (
    "For a subclassed model, fold each pair yourself: scale the kernel's "
    "output channels by gamma / sqrt(moving_variance + epsilon) and set the "
    "bias to (bias - moving_mean) * that scale + beta (see the docstring)."
)


def fold_batch_normalization(model):
    r"""An inference copy of a model with batch normalization folded away.

    In inference, batch normalization is a per-channel affine map, so when it
    directly follows a linear layer it merges into that layer's kernel and
    bias. With `z = conv(x) + bias` and the BN's `gamma`, `beta`,
    `moving_mean`, `moving_variance` and `epsilon`,

        BN(z) = gamma * (z - moving_mean) / sqrt(moving_variance + epsilon) + beta
              = conv'(x) + bias'

        scale = gamma / sqrt(moving_variance + epsilon)   (gamma = 1 if scale=False)
        kernel' = kernel * scale     (per output channel)
        bias'   = (bias - moving_mean) * scale + beta     (bias = 0 without one,
                                                           beta = 0 if center=False)

    computed in float64 and stored in the kernel's dtype, along the kernel's
    output channels (for `SeparableConv1D/2D`, the pointwise kernel's).

    A BN layer (of exactly Keras's or keras_bn's class) folds when it is the
    only consumer of a convolution or `Dense` layer (of exactly those classes,
    with a linear activation, without LoRA or quantization) and normalizes
    its channel axis. Where either is called more than once, or a
    `channels_first` output's last axis may have as many entries as channels
    (Keras 3 adds the bias along the wrong axis there), the pair stays, with
    a warning. Other keras_bn layers become `keras.layers.BatchNormalization`
    with the same inference, so that the copy loads without keras_bn. The
    folded layers get `use_bias=True` and keep their names.

    Predictions equal the original's up to float32 rounding. The copy is for
    inference, shares nothing with the original, and is not compiled; every
    other layer is copied with its whole state and `trainable`. A Functional
    subclass (a keras-hub `Backbone`) comes back as a plain Functional model,
    and batch normalization inside custom layers stays, each with a warning.
    Details in docs/models.md.

    Args:
        model: a built Sequential or Functional model (nested models,
            Functional subclasses and `keras.ops` calls included).

    Returns:
        The folded copy, a `keras.Model` of the original's kind.

    Raises:
        ValueError: for a subclassed or unbuilt model.

    Example:

    ```python
    folded = keras_bn.models.fold_batch_normalization(model)
    folded.save("deploy.keras")  # loads without keras_bn
    ```
    """
    check_graph_model(model, FUNCTION_NAME, SUBCLASSED_ADVICE)
    found = reachable_batch_normalization(model, FUNCTION_NAME, hidden=_warn_hidden)
    folds = foldable_pairs(model)  # id(linear layer) -> its batch normalization
    kept = {
        id(layer): _keras_inference_config(layer)
        for layer in found
        if type(layer) is BatchNormalization
        and id(layer) not in {id(bn) for bn in folds.values()}
    }

    def clone(layer):
        if id(layer) in folds:
            return clone_from_config(layer, use_bias=True)
        if kept.get(id(layer)) is not None:
            return keras.layers.BatchNormalization.from_config(kept[id(layer)])
        return clone_from_config(layer)

    folded, pairs, models = copy_model(model, clone, skip=list(folds.values()))
    for old, new in pairs:
        if id(old) in folds:
            set_folded_weights(new, old, folds[id(old)])
    # The others' state, a kept keras_bn layer's too (into Keras's class).
    why = "a folded model holds other layers than its class builds."
    finish_copy(models, pairs, FUNCTION_NAME, why, done=folds)
    return folded


def _warn_hidden(paths):
    warnings.warn(
        f"`{FUNCTION_NAME}`: batch normalization inside custom layers or "
        f"subclassed models stays unfolded, as it is: {paths}.",
        stacklevel=4,
    )


def foldable_pairs(model):
    """`{id(linear layer): batch-normalization layer}` for every pair to fold."""
    folds, (pairs, uses) = {}, sole_input_producers(model)
    for linear, bn in pairs:
        if not exactly_batch_normalization(bn) or not _can_fold(linear, bn):
            continue
        shared = [layer.name for layer in (linear, bn) if uses[id(layer)] > 1]
        if shared:
            warnings.warn(
                f"`{FUNCTION_NAME}`: layer {bn.name!r} stays unfolded: "
                f"{shared} {'is' if len(shared) == 1 else 'are'} called "
                "more than once (shared between models or repeated), and "
                "a fold must hold at every call.",
                stacklevel=3,
            )
            continue
        folds[id(linear)] = bn
    return folds


def _can_fold(linear, bn):
    if type(linear) not in FOLDABLE:
        return False
    config = linear.get_config()
    quantized = getattr(linear.dtype_policy, "quantization_mode", None) is not None
    if quantized or config.get("activation") != "linear" or config.get("lora_rank"):
        return False
    shape = linear.output.shape
    channels_first = config.get("data_format") == "channels_first"
    channel_axis = 1 if channels_first else len(shape) - 1
    if canonicalize_axes(bn.axis, len(shape)) != (channel_axis,):
        return False
    if channels_first and shape[-1] in (None, shape[1]):
        warnings.warn(
            f"`{FUNCTION_NAME}`: layer {bn.name!r} stays unfolded: "
            f"{linear.name!r} is channels_first with output shape {shape}, "
            "and where its last axis has as many entries as channels, Keras "
            "adds a convolution's bias along the last axis instead of the "
            "channels.",
            stacklevel=4,
        )
        return False
    return True


def folded_kernel_and_bias(linear, bn):
    """The folded `(kernel, bias)` as float64 NumPy arrays (the pointwise
    kernel if separable)."""
    mean = np.asarray(bn.moving_mean, "float64")
    variance = np.asarray(bn.moving_variance, "float64")
    gamma = np.asarray(bn.gamma, "float64") if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta, "float64") if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    bias = np.asarray(linear.bias, "float64") if linear.use_bias else 0.0
    kernel_variable = (
        linear.pointwise_kernel if isinstance(linear, SEPARABLE) else linear.kernel
    )
    kernel = np.asarray(kernel_variable, "float64")
    if isinstance(linear, TRANSPOSED):  # [..., filters, input channels]
        kernel = kernel * scale[:, None]
    elif isinstance(linear, DEPTHWISE):  # [..., input channel i, multiplier m]
        kernel = kernel * scale.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * scale
    return kernel, (bias - mean) * scale + beta


def set_folded_weights(new, linear, bn):
    """Writes the folded kernel and bias of `linear` and `bn` into `new`."""
    kernel, bias = folded_kernel_and_bias(linear, bn)
    if isinstance(linear, SEPARABLE):  # its depthwise kernel unchanged
        new.depthwise_kernel.assign(linear.depthwise_kernel)
    target = new.pointwise_kernel if isinstance(linear, SEPARABLE) else new.kernel
    target.assign(kernel.astype(target.dtype))
    new.bias.assign(bias.astype(new.bias.dtype))


def _keras_inference_config(layer):
    """Config of a Keras layer with `layer`'s inference, or None (warned)."""
    momentum = 0.99 if layer.momentum is None else layer.momentum
    training_only = {**KERAS_VALUES, "momentum": momentum}
    try:
        config = layer.get_config()
        keras_class = keras.layers.BatchNormalization
        return target_arguments(config, keras_class, training_only, FUNCTION_NAME)
    except ValueError:
        warnings.warn(
            f"`{FUNCTION_NAME}`: layer {layer.name!r} (axis={layer.axis}) does "
            "not fold and has several feature axes, which Keras's layer "
            "cannot express: it stays a keras_bn.BatchNormalization, so "
            "loading the folded model needs keras_bn.",
            stacklevel=3,
        )
        return None
