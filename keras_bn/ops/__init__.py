"""Pure functional core: tensors in, tensors out, hand-written gradients."""

from keras_bn.ops.axes import canonicalize_axes
from keras_bn.ops.batch_norm import batch_norm_inference
from keras_bn.ops.batch_norm import batch_norm_train
from keras_bn.ops.batch_norm import batch_renorm_train

__all__ = [
    "batch_norm_inference",
    "batch_norm_train",
    "batch_renorm_train",
    "canonicalize_axes",
]
