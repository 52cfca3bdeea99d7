"""The batch-norm layers the benchmarks compare, built alike.

`bn_layer` returns an object with `__call__(inputs, training)` and
`trainable_weights` for each implementation, so that the timing section
(`run.py`) and the memory section (`memory.py`) run the same step on all of
them.
"""

import keras
import tensorflow as tf

import keras_bn

MOMENTUM = 0.99
EPSILON = 1e-3

# In table order, with the tables' column names.
BN_IMPLS = ("keras_bn", "keras_bn_closed_form", "keras", "tf_fused")
BN_NAMES = {
    "keras_bn": "keras_bn",
    "keras_bn_closed_form": "kbn fused=False",
    "keras": "keras",
    "tf_fused": "tf fused",
}


def random_normal(shape, seed, dtype="float32"):
    values = tf.random.stateless_normal(shape, seed=[seed, 0])
    return tf.cast(values, dtype)


class FusedBatchNorm:
    """`tf.compat.v1.nn.fused_batch_norm` with variables, as a layer holds them.

    TensorFlow 2's only public wrapper of the fused kernel. 2-D inputs are
    reshaped to `[N, 1, 1, C]`; in training, the moving averages are updated
    through `exponential_avg_factor`, as the layers do.
    """

    def __init__(self, channels):
        self.gamma = tf.Variable(tf.ones([channels]))
        self.beta = tf.Variable(tf.zeros([channels]))
        self.moving_mean = tf.Variable(tf.zeros([channels]), trainable=False)
        self.moving_variance = tf.Variable(tf.ones([channels]), trainable=False)

    @property
    def trainable_weights(self):
        return [self.gamma, self.beta]

    def __call__(self, inputs, training):
        shape = tf.shape(inputs)
        if inputs.shape.rank == 2:
            inputs = tf.reshape(inputs, [-1, 1, 1, inputs.shape[-1]])
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            self.gamma,
            self.beta,
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=EPSILON,
            is_training=training,
            exponential_avg_factor=1.0 - MOMENTUM if training else 1.0,
        )
        if training:
            # With exponential_avg_factor the op returns the new moving averages.
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return tf.reshape(y, shape)


def bn_layer(impl, dtype, channels):
    """A fresh batch-norm layer of implementation `impl` for `channels` features.

    float16 layers use the `mixed_float16` policy (float32 weights); the fused
    op takes float16 inputs with float32 variables directly.
    """
    policy = "mixed_float16" if dtype == "float16" else "float32"
    if impl == "keras_bn":
        return keras_bn.BatchNormalization(
            momentum=MOMENTUM, epsilon=EPSILON, dtype=policy
        )
    if impl == "keras_bn_closed_form":
        return keras_bn.BatchNormalization(
            momentum=MOMENTUM, epsilon=EPSILON, fused=False, dtype=policy
        )
    if impl == "keras":
        return keras.layers.BatchNormalization(
            momentum=MOMENTUM, epsilon=EPSILON, dtype=policy
        )
    if impl == "tf_fused":
        return FusedBatchNorm(channels)
    raise ValueError(f"Unknown batch-norm implementation: {impl!r}")
