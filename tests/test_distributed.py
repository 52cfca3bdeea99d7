"""Synchronized BN under tf.distribute: equal to one device on the global batch."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import conv_bn_regressor

import keras_bn
from keras_bn.ops import batch_norm_train


def _per_replica(strategy, parts):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )


def _loss(y, wy, mask):
    if mask is not None:
        y = y * tf.cast(mask, y.dtype)[..., None]
    return tf.reduce_sum(wy * y) + 0.1 * tf.reduce_sum(y**2)


def _step(layer, x, wy, mask=None):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = _loss(y, wy, mask)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return y, dx, dgamma, dbeta


def _distributed_step(strategy, layer, xs, wys, masks=None):
    args = [_per_replica(strategy, xs), _per_replica(strategy, wys)]
    if masks is not None:
        args.append(_per_replica(strategy, masks))

    @tf.function
    def run(*args):
        return strategy.run(lambda *a: _step(layer, *a), args=args)

    return [strategy.experimental_local_results(t) for t in run(*args)]


CASES = {
    "even": ([8, 8], (None, 3), None),
    "uneven": ([5, 11], (None, 3), None),
    "one_replica_empty": ([12, 0], (None, 3), None),
    "masked": ([4, 4], (None, 5, 3), 0.6),
    "nchw": ([3, 3], (None, 3, 4, 4), None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("synchronized", [True, False])
def test_two_replicas_equal_one_device_on_the_global_batch(
    rng, strategy, case, synchronized
):
    sizes, shape, keep = CASES[case]
    axis = 1 if case == "nchw" else -1
    xs = [rng.normal(1.0, 2.0, size=(n, *shape[1:])).astype("float32") for n in sizes]
    wys = [rng.normal(size=x.shape).astype("float32") for x in xs]
    masks = None
    if keep is not None:
        masks = [rng.random(x.shape[:-1]) < keep for x in xs]

    def make():
        layer = keras_bn.BatchNormalization(
            axis=axis, momentum=0.5, synchronized=synchronized
        )
        layer.build(shape)
        return layer

    reference = make()
    weights = [rng.uniform(0.5, 1.5, size=w.shape) for w in reference.get_weights()]
    reference.set_weights(weights)
    with strategy.scope():
        layer = make()
    layer.set_weights(weights)

    concat = lambda parts: tf.constant(np.concatenate(parts))  # noqa: E731
    want = _step(
        reference,
        concat(xs),
        concat(wys),
        None if masks is None else concat(masks),
    )
    got = _distributed_step(strategy, layer, xs, wys, masks)
    y, dx = (np.concatenate([t.numpy() for t in ts]) for ts in got[:2])
    dgamma, dbeta = (sum(t.numpy() for t in ts) for ts in got[2:])
    if not synchronized:
        # Per-replica statistics differ from the global batch's, unless one
        # replica holds the whole batch.
        differs = np.max(np.abs(y - want[0])) > 1e-2
        assert differs == (0 not in sizes)
        return
    for name, a, b in zip(["y", "dx", "dgamma", "dbeta"], [y, dx, dgamma, dbeta], want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
    for variable, expected in zip(layer.weights[2:], reference.weights[2:]):
        for replica_value in variable.value.values:
            np.testing.assert_allclose(replica_value, expected, rtol=1e-5, atol=1e-6)


def test_synchronized_op_outside_a_replica_context_is_local(rng):
    x = rng.normal(size=(6, 3)).astype("float32")
    # The same closed form runs in both calls (no replica context to
    # synchronize over), so the results are identical, not just close.
    for fused in (False, None):
        plain = batch_norm_train(x, None, None, fused=fused)
        synced = batch_norm_train(x, None, None, fused=fused, synchronized=True)
        for a, b in zip(plain, synced):
            np.testing.assert_array_equal(a, b)


def test_synchronized_fused_true_is_rejected(strategy):
    def call():
        x = tf.ones([4, 3])
        return batch_norm_train(x, None, None, fused=True, synchronized=True)[0]

    with pytest.raises(ValueError, match=r"synchronized across replicas"):
        strategy.run(tf.function(call))


def _fit(strategy, synchronized, x, y):
    with strategy.scope():
        keras.utils.set_random_seed(7)
        model = conv_bn_regressor(synchronized)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model


def test_fit_under_mirrored_strategy_equals_single_device_fit(rng, strategy):
    x = rng.normal(1.0, 2.0, size=(64, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    single = _fit(tf.distribute.get_strategy(), True, x, y)
    mirrored = _fit(strategy, True, x, y)
    unsynchronized = _fit(strategy, False, x, y)
    for a, b in zip(mirrored.weights, single.weights):
        for replica_value in a.value.values:
            np.testing.assert_allclose(replica_value, b.numpy(), rtol=1e-4, atol=1e-5)
    moving_mean = unsynchronized.layers[1].moving_mean.numpy()
    assert np.max(np.abs(moving_mean - single.layers[1].moving_mean.numpy())) > 1e-4


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_keeps_workers_identical(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    script = os.path.join(os.path.dirname(__file__), "mwms_worker.py")
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        processes.append(
            subprocess.Popen(
                [sys.executable, script, str(tmp_path / f"worker{index}.npz")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        outputs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
    first, second = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    assert len(first.files) == 8  # conv (2), gamma, beta, moving (2), dense (2)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
    assert np.abs(first["arr_4"]).max() > 0  # the moving mean has moved
