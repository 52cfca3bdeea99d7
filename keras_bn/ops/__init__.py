"""Pure functional core: tensors in, tensors out, hand-written gradients."""

from keras_bn.ops.axes import canonicalize_axes
from keras_bn.ops.batch_norm import batch_norm_apply
from keras_bn.ops.batch_norm import batch_norm_inference
from keras_bn.ops.batch_norm import batch_norm_train
from keras_bn.ops.batch_norm import batch_renorm_train
from keras_bn.ops.cross_entropy import probability_cross_entropy
from keras_bn.ops.cross_entropy import softmax_cross_entropy
from keras_bn.ops.cross_entropy import sparse_probability_cross_entropy
from keras_bn.ops.cross_entropy import sparse_softmax_cross_entropy
from keras_bn.ops.linear_cross_entropy import linear_softmax_cross_entropy
from keras_bn.ops.softmax_ops import log_softmax
from keras_bn.ops.softmax_ops import softmax

__all__ = [
    "batch_norm_apply",
    "batch_norm_inference",
    "batch_norm_train",
    "batch_renorm_train",
    "canonicalize_axes",
    "linear_softmax_cross_entropy",
    "log_softmax",
    "probability_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "sparse_probability_cross_entropy",
    "sparse_softmax_cross_entropy",
]
