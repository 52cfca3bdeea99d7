"""Axis bookkeeping: the merged view the batch-norm closed form computes on."""

import pytest
import tensorflow as tf

from keras_bn.ops.axes import merge_adjacent_axes
from keras_bn.ops.axes import merged_shape


@pytest.mark.parametrize(
    "rank,axes,expected",
    [
        (2, (1,), [(False, [0]), (True, [1])]),
        (4, (3,), [(False, [0, 1, 2]), (True, [3])]),
        (4, (1,), [(False, [0]), (True, [1]), (False, [2, 3])]),
        (5, (0, 4), [(True, [0]), (False, [1, 2, 3]), (True, [4])]),
        (5, (1, 2), [(False, [0]), (True, [1, 2]), (False, [3, 4])]),
        (4, (1, 3), [(False, [0]), (True, [1]), (False, [2]), (True, [3])]),
    ],
)
def test_merge_adjacent_axes(rank, axes, expected):
    assert merge_adjacent_axes(rank, axes) == expected


def test_merged_shape_static_and_broadcast_forms():
    x = tf.zeros([2, 3, 4, 5, 6])
    groups = merge_adjacent_axes(5, (1, 2))
    assert merged_shape(x, groups) == [2, 12, 30]
    assert merged_shape(x, groups, reduced=False) == [1, 12, 1]
    assert merged_shape(x, groups, features=False) == [2, 1, 30]


def test_merged_shape_with_unknown_sizes_is_computed_at_run_time():
    groups = merge_adjacent_axes(4, (3,))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 4, 3])])
    def shapes(x):
        return merged_shape(x, groups), merged_shape(x, groups, reduced=False)

    view, params = shapes(tf.zeros([2, 5, 4, 3]))
    assert view.numpy().tolist() == [40, 3]
    assert params.numpy().tolist() == [1, 3]
