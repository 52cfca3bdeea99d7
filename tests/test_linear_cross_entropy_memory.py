"""Peak memory of one training step of `linear_softmax_cross_entropy`.

Each configuration runs in its own process, which resets the resident-set
high-water mark (`/proc/self/clear_refs`, Linux) after making its inputs
and reports how far one `tf.function` step (the loss and its gradients to
the features, kernel and bias) raised it. The bounds are the designs'
budgets with room for the allocator's slack, far below what the failures
they guard against would take.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import keras_bn

STEP = r"""
import ctypes, gc, json, sys
import tensorflow as tf
import keras_bn

tokens, features, classes, reduction = sys.argv[1:5]
tokens, features, classes = int(tokens), int(features), int(classes)
reduction = None if reduction == "none" else reduction
h = tf.random.stateless_normal([tokens, features], seed=[0, 1])
w = tf.random.stateless_normal([features, classes], seed=[0, 2], stddev=0.03)
b = tf.zeros([classes])
labels = tf.random.stateless_uniform(
    [tokens], [0, 3], maxval=classes, dtype=tf.int32
)

@tf.function
def step(labels, h, w, b):
    with tf.GradientTape() as tape:
        tape.watch([h, w, b])
        loss = keras_bn.ops.linear_softmax_cross_entropy(
            labels, h, w, b, reduction=reduction
        )
        loss = tf.reduce_mean(loss) if reduction is None else loss
    grads = tape.gradient(loss, [h, w, b])
    return [loss] + [tf.reduce_sum(g) for g in grads]

def status(field):
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
baseline = status("VmRSS")
outputs = step(labels, h, w, b)
assert all(bool(tf.math.is_finite(o)) for o in outputs)
print(json.dumps(status("VmHWM") - baseline))
"""

MIB = 2**20


def _peak_above_inputs(tokens, features, classes, reduction):
    root = pathlib.Path(keras_bn.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(tokens), str(features), str(classes)]
        + [str(reduction).lower()],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_clear_refs = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="resets the peak resident set through /proc/self/clear_refs (Linux)",
)


@pytest.mark.slow
@needs_clear_refs
@pytest.mark.parametrize("reduction", [None, "mean"])
def test_the_logits_are_never_held(reduction):
    # 4,096 tokens x 65,536 classes: the logits are 1 GiB in float32, the
    # kernel's gradient 64 MiB. Each path holds the kernel's gradient and a
    # few chunks (the fast gradient a 256 MiB block of tokens): 371 and 400
    # MiB measured with oneDNN on, 374 and 532 off. With the logits in one
    # chunk: 3.5 and 1.1 GiB.
    tokens, features, classes = 4096, 256, 65536
    logits = tokens * classes * 4
    peak = _peak_above_inputs(tokens, features, classes, reduction)
    assert peak < logits * 3 // 4, f"{peak / MIB:.0f} MiB"


@pytest.mark.slow
@needs_clear_refs
def test_the_fast_gradient_holds_one_kernel_sized_tensor():
    # A 512 MiB kernel, 256 tokens: the fast gradient's step holds the
    # kernel's gradient (512 MiB), a 32 MiB block and a few 32 MiB chunks of
    # the kernel's gradient: 577 MiB measured with oneDNN on, 781 off
    # (where the chunks' updates are not fused). Its per-token fallback, the
    # untaken branch of a `tf.cond`, once built its own kernel-sized zeros
    # anyway: 1.6 GiB.
    tokens, features, classes = 256, 2048, 65536
    kernel = features * classes * 4
    peak = _peak_above_inputs(tokens, features, classes, "mean")
    assert peak < kernel * 7 // 4, f"{peak / MIB:.0f} MiB"
