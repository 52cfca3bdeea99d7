"""keras_bn: batch normalization and softmax cross-entropy for Keras 3.

Every backward pass is hand-written with `tf.custom_gradient`.
"""

__version__ = "0.1.0"

from keras_bn import callbacks  # noqa: E402
from keras_bn import layers  # noqa: E402
from keras_bn import losses  # noqa: E402
from keras_bn import models  # noqa: E402
from keras_bn import ops  # noqa: E402
from keras_bn.layers import BatchNormalization  # noqa: E402
from keras_bn.layers import Softmax  # noqa: E402
from keras_bn.loss_names import register_loss_names  # noqa: E402

register_loss_names(
    [
        losses.CategoricalCrossentropy,
        losses.SoftmaxCrossEntropy,
        losses.SparseCategoricalCrossentropy,
    ]
)

__all__ = [
    "BatchNormalization",
    "Softmax",
    "__version__",
    "callbacks",
    "layers",
    "losses",
    "models",
    "ops",
]
