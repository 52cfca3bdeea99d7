"""The batches of inputs that `recompute_statistics` runs the model on."""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_bn.ops.checks import check_optional_positive_int


class Batches:
    """The inputs `x` of the batches of `data`, at most `steps` of them.

    Args:
        data: a `tf.data.Dataset` of `x` or of `(x, y[, sample_weight])`, a
            `keras.utils.PyDataset`, or arrays: `x`, or a tuple
            `(x, y[, sample_weight])`, `x` being an array or a list or dict
            of arrays. Labels and sample weights are dropped.
        steps: None, or the number of batches to take.
        batch_size: the batch size for arrays (required there); None
            otherwise.

    Attributes:
        count: the number of batches, or None when unknown in advance.

    Raises:
        TypeError, ValueError: for arguments that do not fit, before any
            batch is read.
    """

    def __init__(self, data, steps=None, batch_size=None):
        self.steps = check_optional_positive_int(steps, "steps")
        batch_size = check_optional_positive_int(batch_size, "batch_size")
        if isinstance(data, tf.data.Dataset | keras.utils.PyDataset):
            if batch_size is not None:
                raise ValueError(
                    "Argument `batch_size` is only for arrays: a dataset is "
                    f"batched already. Received: batch_size={batch_size}"
                )
            available = _dataset_length(data)
        else:
            data = _check_arrays(data)
            if batch_size is None:
                raise ValueError(
                    "Argument `batch_size` is required with arrays: the "
                    "per-batch variances depend on it (use the training batch "
                    "size)."
                )
            available = math.ceil(len(keras.tree.flatten(data)[0]) / batch_size)
        if available is None and self.steps is None:
            raise ValueError(
                "Argument `steps` is required: the data has no known end "
                "(an infinite dataset, or a PyDataset without `num_batches`)."
            )
        self.data, self.batch_size = data, batch_size
        self.count = available if self.steps is None else self.steps
        if available is not None and self.steps is not None:
            self.count = min(self.steps, available)
            if self.steps > available:
                warnings.warn(
                    f"`steps`={self.steps} exceeds the {available} batches of "
                    f"the data; recomputing from {available}.",
                    stacklevel=3,
                )

    def __iter__(self):
        taken = 0
        for element in self._elements():
            if self.steps is not None and taken == self.steps:
                return
            # As in `fit`: a tuple is (x, y[, sample_weight]); a list or a
            # dict is the inputs of a model with several.
            yield element[0] if isinstance(element, tuple) else element
            taken += 1

    def _elements(self):
        if isinstance(self.data, tf.data.Dataset):
            yield from self.data
        elif isinstance(self.data, keras.utils.PyDataset):
            index = 0
            while self.count is None or index < self.count:
                yield self.data[index]
                index += 1
        else:
            length = len(keras.tree.flatten(self.data)[0])
            for start in range(0, length, self.batch_size):
                batch = slice(start, start + self.batch_size)
                yield keras.tree.map_structure(lambda a, b=batch: a[b], self.data)


def _dataset_length(data):
    if isinstance(data, keras.utils.PyDataset):
        return data.num_batches
    cardinality = int(data.cardinality())
    return None if cardinality < 0 else cardinality


def _check_arrays(data):
    leaves = keras.tree.flatten(data)
    supported = (
        "a tf.data.Dataset, a keras.utils.PyDataset, or arrays (x, or a tuple "
        "(x, y[, sample_weight]) with x an array or a list/dict of arrays)"
    )
    if not leaves or not all(isinstance(a, np.ndarray | tf.Tensor) for a in leaves):
        raise TypeError(f"Argument `data` must be {supported}. Received: {data!r}")
    lengths = {len(a) for a in leaves if a.ndim > 0}
    if len(lengths) != 1 or any(a.ndim == 0 for a in leaves):
        raise ValueError(
            "Argument `data`: every array must have the same, non-empty "
            f"batch axis. Received arrays of shapes {[a.shape for a in leaves]}."
        )
    if lengths == {0}:
        raise ValueError("Argument `data` holds no example.")
    return data
