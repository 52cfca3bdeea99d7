"""One worker of a MultiWorkerMirroredStrategy run (started by the tests).

Usage: TF_CONFIG=... python mwms_worker.py OUT.npz
Trains a small Conv-BN model with synchronized BN for a few steps on data
every worker generates identically, then saves its weights. Keras 3.15's
`Model.fit` fails under this strategy in its own symbolic build (with
Keras's built-in layers too), so the steps are a `strategy.run` loop.
"""

import sys

import numpy as np
import tensorflow as tf
from helpers import conv_bn_regressor

strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras  # noqa: E402  (after the strategy, which must come first)

GLOBAL_BATCH = 16
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(1.0, 2.0, size=(64, 6, 6, 2)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")
with strategy.scope():
    model = conv_bn_regressor(synchronized=True)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


@tf.function
def train_step(xb, yb):
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((model(xb, training=True) - yb) ** 2) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    strategy.run(step, args=(xb, yb))


for xb, yb in strategy.experimental_distribute_dataset(data):
    train_step(xb, yb)
np.savez(sys.argv[1], *[w.numpy() for w in model.weights])
