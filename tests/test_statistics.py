"""keras_bn.ops.statistics against float64 NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn.ops import statistics


@pytest.mark.parametrize("masked", [False, True])
def test_moments_at_a_large_offset_match_float64(rng, masked):
    x = (1e4 + rng.normal(size=(64, 3))).astype(np.float32)
    keep = rng.uniform(size=(64, 1)) < 0.7 if masked else np.ones((64, 1), bool)
    keep[0] = not masked  # with a mask, padding at the first position
    x[~keep[:, 0]] = -5e4
    mask = tf.constant(keep) if masked else None
    mean, variance, centred, count = statistics.moments(tf.constant(x), [0], mask)
    kept = x[keep[:, 0]].astype(np.float64)
    np.testing.assert_allclose(mean[0], kept.mean(0), rtol=1e-7)
    np.testing.assert_allclose(variance[0], kept.var(0), rtol=1e-4)
    np.testing.assert_allclose(centred, x - mean, rtol=0)
    assert float(np.max(count)) == keep.sum()


def test_moments_of_no_position_are_zero():
    mask = tf.zeros([4, 1], tf.bool)
    mean, variance, _, count = statistics.moments(tf.ones([4, 2]), [0], mask)
    assert np.all(mean == 0) and np.all(variance == 0) and np.all(count == 0)


def test_combined_parts_give_the_statistics_of_the_whole(rng):
    parts = [rng.normal(i, 1 + i, size=(n, 2)) for i, n in enumerate([5, 0, 9])]
    counts = np.array([[len(p)] * 2 for p in parts], np.float64)
    means = np.array([p.mean(0) if len(p) else [0, 0] for p in parts])
    variances = np.array([p.var(0) if len(p) else [0, 0] for p in parts])
    count, mean, variance = statistics.combine_moments(counts, means, variances)
    whole = np.concatenate(parts)
    np.testing.assert_allclose(count, [14, 14])
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(variance, whole.var(0), rtol=1e-12)


@pytest.mark.parametrize("count", [5, tf.constant(5, tf.int64)])
def test_unbiased_and_biased_variances_convert(rng, count):
    x = rng.normal(size=5)
    _, biased, n = statistics.from_unbiased(0.0, np.float32(x.var(ddof=1)), count)
    assert float(n) == 5
    np.testing.assert_allclose(biased, x.var(), rtol=1e-6)
    unbiased = statistics.unbiased_variance(
        tf.constant(x.var()), tf.constant(5.0, tf.float64)
    )
    np.testing.assert_allclose(unbiased, x.var(ddof=1), rtol=1e-12)
    # No position: the kernel's mean and variance are not statistics of
    # anything; both are 0 (as for `moments` with an empty mask).
    mean, empty, _ = statistics.from_unbiased(1.0, 2.0, tf.constant(0, tf.int64))
    assert float(mean) == 0 and float(empty) == 0
