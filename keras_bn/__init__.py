"""keras_bn: batch normalization and softmax cross-entropy for Keras 3.

Every backward pass is hand-written with `tf.custom_gradient`.
"""

__version__ = "0.1.0"

from keras_bn import layers  # noqa: E402
from keras_bn import ops  # noqa: E402, F401
from keras_bn.layers import BatchNormalization  # noqa: E402

__all__ = ["BatchNormalization", "layers", "ops", "__version__"]
