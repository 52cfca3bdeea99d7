"""A drop-in for `keras.layers.BatchNormalization` on keras_bn's own ops."""

import math
import warnings

import keras
import tensorflow as tf
from keras import constraints
from keras import initializers
from keras import regularizers

from keras_bn.ops import batch_norm
from keras_bn.ops.axes import axes_for_rank
from keras_bn.ops.checks import check_axis
from keras_bn.ops.checks import check_bool
from keras_bn.ops.checks import check_choice
from keras_bn.ops.checks import check_epsilon
from keras_bn.ops.checks import check_in_range
from keras_bn.ops.checks import check_not_ragged
from keras_bn.ops.checks import check_optional_bool
from keras_bn.ops.checks import check_optional_positive_int
from keras_bn.ops.checks import check_renorm_clipping
from keras_bn.ops.statistics import unbiased_variance
from keras_bn.ops.virtual_batch import GROUPINGS
from keras_bn.ops.virtual_batch import to_virtual_batches


def _copy_initializer(initializer):
    """A fresh copy of an `Initializer` (an unseeded random one draws anew),
    through its own class's `from_config` as Keras clones; a function as is."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


_DENSE_HINT = (
    "Pad it to a dense tensor (`inputs.to_tensor()`) and pass the padding as "
    "`mask` (e.g. `tf.sequence_mask(inputs.row_lengths())`)."
)
# The arguments Keras's layer does not take. The first two change no result
# Keras defines (a kernel choice, and what NaN batches do to the moving
# statistics); the others must be at their Keras value to convert.
KERAS_BN_ONLY = (
    "fused",
    "skip_nonfinite_updates",
    "virtual_batch_size",
    "virtual_batch_grouping",
    "moving_variance_estimator",
)


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    r"""Batch normalization (Ioffe & Szegedy, 2015) with hand-written gradients.

    A drop-in for `keras.layers.BatchNormalization` (the same arguments,
    weight names and weight order; docs/layer.md) whose math runs in
    `keras_bn.ops`, with backward passes written out in closed form.

    **During training** (`training=True` and `layer.trainable`), for each
    feature the layer returns

        gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    with the statistics of the current batch, `var` being the biased variance
    `mean((x - mean(x))^2)`, and updates its moving statistics:

        moving_mean     = moving_mean * momentum + mean(x) * (1 - momentum)
        moving_variance = moving_variance * momentum + var(x) * (1 - momentum)

    **During inference** (`training=False`, the default, or `trainable=False`)
    it returns `gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) +
    beta` and changes no state. As in Keras, setting `trainable = False`
    forces inference mode (fine-tuning a frozen model keeps its statistics).

    Args:
        axis: Integer, or (beyond Keras 3) a list/tuple of distinct integers:
            the feature axis or axes, kept and normalized per entry; the
            weights take their shape. `-1` after `Dense`/channels-last
            convolutions, `1` for channels-first.
        momentum: Float in [0, 1], momentum of the moving averages (the weight
            of the old value), or None for a cumulative average over every
            batch seen (PyTorch's `momentum=None`: the n-th batch weighs
            `1 / n`), counted per feature in a non-trainable int64 weight
            `num_batches_tracked`, last in the weight list.
        epsilon: Finite float > 0 added to the variance (no division by zero).
        center: True or False: add the learned offset `beta`.
        scale: True or False: multiply by the learned scale `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        synchronized: If True, inside a `tf.distribute` strategy with several
            replicas, the batch statistics are the global batch's, combined
            exactly (Chan et al.), and each replica's `dx` equals the
            single-device `dx` on the concatenated batch (docs/distributed.md).
            Outside a replica context it has no effect.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017): the
            training output becomes `x_hat * r + d` (docs/math.md, "Batch
            Renormalization"); inference is unchanged. As in Keras, it adds
            the weights `moving_stddev`, `renorm_mean` and `renorm_stddev`.
        renorm_clipping: With `renorm=True`, a dict with optional keys
            `"rmax"`, `"rmin"`, `"dmax"`: `r` is clipped to `[rmin, rmax]` and
            `d` to `[-dmax, dmax]` (missing keys: unclipped).
        renorm_momentum: Float in [0, 1], momentum of the renorm statistics
            `renorm_mean` and `renorm_stddev`.
        skip_nonfinite_updates: If True (the default), a feature whose batch
            mean or variance is NaN or Inf keeps its moving statistics instead
            of being poisoned for good. False updates regardless, as Keras
            does. Not a Keras argument.
        fused: None (the default: automatic), True or False. True runs on
            TensorFlow's fused batch-norm kernels (cuDNN on GPUs) and raises a
            ValueError saying why where they cannot apply (docs/layer.md,
            "Fused kernels"); False always uses the closed form (the more
            accurate for inputs with a large offset); None picks per call.
            `layer.fused` and `get_config()` keep the value passed.
        virtual_batch_size: None, or a positive int dividing the batch size:
            Ghost Batch Normalization (Hoffer et al., 2017). Each virtual
            batch of this many examples is normalized with its own statistics;
            the moving averages take the mean of their means and variances
            (as tf-keras 2 did). Not a Keras 3 argument.
        virtual_batch_grouping: `"interleaved"` (the default, tf-keras's:
            batch 6 and `v = 3` give examples 0, 2, 4 and 1, 3, 5) or
            `"consecutive"` (0, 1, 2 and 3, 4, 5). Not a Keras argument.
        moving_variance_estimator: `"biased"` (the default, as Keras) stores
            the batch variance `sum((x - mean)^2) / N` in the moving average;
            `"unbiased"` stores `sum((x - mean)^2) / (N - 1)` as PyTorch does
            (for `N = 1`, the biased value). Training normalizes with the
            biased variance either way. Not a Keras argument.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: Dense float tensor of any rank above the number of feature
            axes. Ragged and sparse tensors raise a ValueError (pad them and
            pass the padding as `mask`).
        training: Python boolean: batch statistics and moving-average updates
            (True), or the moving statistics (False or None).
        mask: Optional boolean tensor: of rank one less than `inputs`,
            expanded at the last axis as in Keras; of the rank of `inputs`
            (`mask[:, None]` for a channels-first input's positions); or, with
            several feature axes, of the shape of `inputs` without them
            (docs/layer.md, "Masks"). Masked (False) entries are left out of
            the batch statistics; a feature with none left keeps its moving
            statistics.

    Returns:
        A tensor with the shape of `inputs`, in the layer's compute dtype.

    Reference:
        - Ioffe and Szegedy, 2015, https://arxiv.org/abs/1502.03167
        - Ioffe, 2017 (Batch Renormalization), https://arxiv.org/abs/1702.03275

    Example:

    >>> layer = keras_bn.BatchNormalization()
    >>> x = np.random.normal(5.0, 2.0, size=(64, 3)).astype("float32")
    >>> y = layer(x, training=True)          # batch statistics
    >>> float(abs(np.mean(y)))  < 1e-3
    True
    >>> # The moving mean moved 1% of the way towards the batch mean:
    >>> bool(np.allclose(layer.moving_mean, 0.01 * x.mean(axis=0)))
    True
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        skip_nonfinite_updates=True,
        fused=None,
        virtual_batch_size=None,
        moving_variance_estimator="biased",
        virtual_batch_grouping="interleaved",
        **kwargs,
    ):
        if self.__dict__.pop("_built_by_scope", False):
            return  # `batch_normalization_scope` built it with other arguments
        super().__init__(**kwargs)
        self.axis = check_axis(axis)
        self.momentum = (
            None if momentum is None else check_in_range(momentum, "momentum", 0, 1)
        )
        self.epsilon = check_epsilon(epsilon)
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = check_bool(renorm, "renorm")
        if renorm_clipping is not None and not self.renorm:
            raise ValueError(
                "Argument `renorm_clipping` is only used with renorm=True. "
                f"Received: renorm_clipping={renorm_clipping}, renorm={renorm}"
            )
        self.renorm_clipping = (
            check_renorm_clipping(renorm_clipping or {}) if self.renorm else None
        )
        self.renorm_momentum = check_in_range(renorm_momentum, "renorm_momentum", 0, 1)
        self.synchronized = check_bool(synchronized, "synchronized")
        self.fused = check_optional_bool(fused, "fused")
        if self.fused and (self.synchronized or self.renorm):
            raise ValueError(
                "Argument `fused=True` cannot be combined with "
                f"{'synchronized' if self.synchronized else 'renorm'}=True: the "
                "fused kernels compute one replica's statistics, without renorm's "
                "correction. Use fused=None or False."
            )
        self.virtual_batch_size = check_optional_positive_int(
            virtual_batch_size, "virtual_batch_size"
        )
        if self.virtual_batch_size is not None and (self.synchronized or self.fused):
            raise ValueError(
                "Argument `virtual_batch_size` cannot be combined with "
                f"{'synchronized' if self.synchronized else 'fused'}=True: virtual "
                "batches take statistics per group of one replica's examples."
            )
        self.skip_nonfinite_updates = check_bool(
            skip_nonfinite_updates, "skip_nonfinite_updates"
        )
        self.moving_variance_estimator = check_choice(
            moving_variance_estimator,
            "moving_variance_estimator",
            ("biased", "unbiased"),
        )
        self.virtual_batch_grouping = check_choice(
            virtual_batch_grouping, "virtual_batch_grouping", GROUPINGS
        )
        self.num_batches_tracked = None
        self._warned_single_position = False

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        self._axes = axes_for_rank(self.axis, rank)
        unknown = [a for a in self._axes if input_shape[a] is None]
        if unknown:
            raise ValueError(
                f"The feature axis {unknown} of the input must have a known size "
                f"when the layer is built (axis={self.axis}). "
                f"Received: input_shape={input_shape}"
            )
        if self.virtual_batch_size is not None and 0 in self._axes:
            raise ValueError(
                "Argument `virtual_batch_size` splits the batch axis 0, which "
                f"cannot also be a feature axis. Received: axis={self.axis}"
            )
        shape = tuple(input_shape[a] for a in self._axes)
        for name, wanted in (("gamma", self.scale), ("beta", self.center)):
            if wanted:  # in Keras's order
                weight = self.add_weight(
                    shape=shape,
                    name=name,
                    initializer=getattr(self, f"{name}_initializer"),
                    regularizer=getattr(self, f"{name}_regularizer"),
                    constraint=getattr(self, f"{name}_constraint"),
                    autocast=False,
                )
                setattr(self, name, weight)
        statistics = [
            ("moving_mean", self.moving_mean_initializer),
            ("moving_variance", self.moving_variance_initializer),
        ]
        if self.renorm:
            # As Keras starts them: the stddevs at the root of the variance
            # initializer's values, from fresh copies of the initializers, so
            # that random ones do not repeat their values.
            def stddev(shape, dtype=None):
                variance = _copy_initializer(self.moving_variance_initializer)
                return tf.sqrt(variance(shape, dtype=dtype))

            mean = _copy_initializer(self.moving_mean_initializer)
            statistics += [
                ("moving_stddev", stddev),
                ("renorm_mean", mean),
                ("renorm_stddev", stddev),
            ]
        if self.momentum is None:
            statistics.append(("num_batches_tracked", "zeros"))
        for name, initializer in statistics:
            weight = self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                dtype="int64" if name == "num_batches_tracked" else None,
                trainable=False,
                autocast=False,
            )
            setattr(self, name, weight)
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in self._axes}
        )

    def _value(self, weight):
        """A plain tensor for the ops (never a Keras variable)."""
        return None if weight is None else tf.convert_to_tensor(weight)

    def __call__(self, inputs, *args, **kwargs):
        # Before Keras builds the layer from a ragged shape.
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        for name, value in (("inputs", inputs), ("mask", mask)):
            check_not_ragged(value, name, type(self).__name__, _DENSE_HINT)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype.is_integer or inputs.dtype == tf.bool:
            # As Keras and tf-keras: integer (and boolean) inputs are values.
            wide = tf.float64 if self.compute_dtype == "float64" else tf.float32
            inputs = tf.cast(inputs, wide)
        mask = self._mask_for_ops(mask, inputs)
        gamma, beta = self._value(self.gamma), self._value(self.beta)
        if training and self.trainable:
            outputs = self._train(inputs, gamma, beta, mask)
        else:
            # No custom gradient here: serving and exported graphs stay plain.
            outputs = batch_norm.normalize_with_given_statistics(
                inputs,
                self._value(self.moving_mean),
                self._value(self.moving_variance),
                gamma,
                beta,
                self._axes,
                self.epsilon,
                self.fused,
                statistics_gradients=False,
            )
        return tf.cast(outputs, self.compute_dtype)

    def _mask_for_ops(self, mask, inputs):
        """The call's mask in a layout of the ops, as docs/layer.md ("Masks")
        describes (Keras's rule first), its static shape checked."""
        if mask is None:
            return None
        mask = tf.convert_to_tensor(mask)
        rank, mask_rank, n_axes = inputs.shape.rank, mask.shape.rank, len(self._axes)
        if mask_rank == rank or (n_axes > 1 and mask_rank == rank - n_axes):
            return mask
        received = f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
        if mask_rank != rank - 1:
            without_axes = ", or the inputs' shape without the feature axes"
            raise ValueError(
                f"The `mask` of layer '{self.name}' must have the rank of the "
                "inputs, or one less (Keras's rule: then broadcast over a new "
                f"last axis){without_axes if n_axes > 1 else ''}. {received}"
            )
        full = tf.expand_dims(mask, -1)
        got, shape = full.shape.as_list(), inputs.shape.as_list()
        if any(g not in (None, 1) and s not in (None, g) for g, s in zip(got, shape)):
            raise ValueError(
                f"The `mask` of layer '{self.name}' has one axis less than the "
                "inputs, so it is broadcast as Keras does, over a new last axis: "
                "`mask[..., None]` must broadcast to the inputs' shape (for a "
                f"channels-first input's positions, pass `mask[:, None]`). {received}"
            )
        return full

    def _train(self, inputs, gamma, beta, mask):
        x, axes = inputs, self._axes
        renorm_mean = self._value(getattr(self, "renorm_mean", None))
        renorm_stddev = self._value(getattr(self, "renorm_stddev", None))
        if self.virtual_batch_size is not None:
            if mask is not None:
                raise ValueError(
                    "Argument `virtual_batch_size` cannot be combined with a mask "
                    "in training: the moving averages cannot weigh virtual "
                    "batches with different numbers of unmasked positions. "
                    f"Received: virtual_batch_size={self.virtual_batch_size}"
                )
            x, axes, params = to_virtual_batches(
                inputs,
                axes,
                self.virtual_batch_size,
                (gamma, beta, renorm_mean, renorm_stddev),
                self.virtual_batch_grouping,
            )
            gamma, beta, renorm_mean, renorm_stddev = params
        renorm = None
        if self.renorm:
            renorm = batch_norm.Renorm(
                renorm_mean, renorm_stddev, **self.renorm_clipping
            )
        outputs, mean, variance, count = batch_norm.normalize_with_batch_statistics(
            x,
            gamma,
            beta,
            axes,
            self.epsilon,
            mask,
            renorm,
            fused=False if self.renorm else self.fused,
            synchronized=self.synchronized,
        )
        if self.virtual_batch_size is not None:  # unsplit, average the statistics
            outputs = tf.reshape(outputs, tf.shape(inputs))
            mean, variance = tf.reduce_mean(mean, 0), tf.reduce_mean(variance, 0)
        if mask is None:
            self._warn_if_single_position(x, axes)
        # The statistics this call read (renorm's) must not be overwritten
        # before the output that uses them exists: in graph mode a variable
        # read can alias the buffer the update writes into.
        with tf.control_dependencies([outputs]):
            self._update_statistics(mean, variance, count)
        return outputs

    def _warn_if_single_position(self, x, axes):
        reduced = [d for i, d in enumerate(x.shape) if i not in axes]
        if self._warned_single_position or None in reduced or math.prod(reduced) != 1:
            return
        self._warned_single_position = True
        warnings.warn(
            f"Layer '{self.name}' was called in training mode on a batch with a "
            f"single example per feature (inputs.shape={x.shape}): its "
            "variance is 0 and the output is `beta` whatever the input, so "
            "batch statistics from one example are meaningless. Use larger "
            "batches or call the layer with training=False.",
            stacklevel=3,
        )

    def _update_statistics(self, mean, variance, count):
        """Moves the averages towards this batch's statistics, except for a
        feature with no (unmasked) position in `count` or, with
        `skip_nonfinite_updates`, with NaN or Inf statistics."""
        accept = count > 0
        if self.skip_nonfinite_updates:
            accept = accept & tf.math.is_finite(mean) & tf.math.is_finite(variance)
        if self.moving_variance_estimator == "unbiased":
            variance = unbiased_variance(variance, count)
        momentum = self.momentum
        if momentum is None:
            # Cumulative average: a feature's n-th accepted batch weighs 1/n.
            # Each feature counts its own batches: one that skipped a batch
            # (NaN there) must not dilute its average with the initial value.
            accepted = tf.broadcast_to(accept, tf.shape(mean))
            tracked = self.num_batches_tracked + tf.cast(accepted, "int64")
            self.num_batches_tracked.assign(tracked)
            momentum = 1.0 - 1.0 / tf.maximum(tf.cast(tracked, mean.dtype), 1.0)

        def update(variable, value, momentum):
            old = tf.convert_to_tensor(variable)
            new = old * momentum + tf.cast(value, old.dtype) * (1.0 - momentum)
            variable.assign(tf.where(accept, new, variable))
            return new

        update(self.moving_mean, mean, momentum)
        if not self.renorm:
            update(self.moving_variance, variance, momentum)
            return
        stddev = tf.sqrt(variance + self.epsilon)
        update(self.renorm_mean, mean, self.renorm_momentum)
        update(self.renorm_stddev, stddev, self.renorm_momentum)
        moving_stddev = update(self.moving_stddev, stddev, momentum)
        # The inference variance follows from the moving stddev (floored at 0).
        moving_variance = tf.nn.relu(tf.square(moving_stddev) - self.epsilon)
        self.moving_variance.assign(
            tf.where(accept, moving_variance, self.moving_variance)
        )

    def compute_output_shape(self, input_shape):
        axes_for_rank(self.axis, len(input_shape))
        return input_shape

    def get_config(self):
        # Keras's own `get_config` serializes the arguments the two share.
        config = super().get_config()
        return {**config, **{name: getattr(self, name) for name in KERAS_BN_ONLY}}
