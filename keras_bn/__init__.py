"""keras_bn: batch normalization and softmax cross-entropy for Keras 3.

Every backward pass is hand-written with `tf.custom_gradient`.
"""

__version__ = "0.1.0"

from keras_bn import callbacks
from keras_bn import layers
from keras_bn import losses
from keras_bn import models
from keras_bn import ops
from keras_bn._internals import register_loss_names
from keras_bn.layers import BatchNormalization
from keras_bn.layers import LinearCrossEntropyHead
from keras_bn.layers import Softmax

# `compile(loss="keras_bn>SoftmaxCrossEntropy")` for every exported loss.
register_loss_names([getattr(losses, name) for name in losses.__all__])

__all__ = [
    "BatchNormalization",
    "LinearCrossEntropyHead",
    "Softmax",
    "__version__",
    "callbacks",
    "layers",
    "losses",
    "models",
    "ops",
]
