"""Argument and input checks shared by keras_bn's losses."""

from keras_bn.layers.arguments import check_not_ragged
from keras_bn.ops.cross_entropy import check_label_smoothing  # noqa: F401

_DENSE_HINT = (
    "Pad it to a dense tensor (`.to_tensor()`) and give the padding zero "
    "`sample_weight` (or an `ignore_class` label)."
)


def check_dense_loss_inputs(loss, y_true, y_pred, sample_weight):
    """Refuses ragged and sparse labels, predictions and sample weights."""
    owner = type(loss).__name__
    for name, value in (
        ("y_true", y_true),
        ("y_pred", y_pred),
        ("sample_weight", sample_weight),
    ):
        check_not_ragged(value, name, owner, _DENSE_HINT)
