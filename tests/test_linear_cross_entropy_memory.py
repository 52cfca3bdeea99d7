"""Peak memory of one training step of `linear_softmax_cross_entropy`.

Each configuration runs in its own process, as the benchmark measures it
(`benchmarks/linear_cross_entropy.py`'s worker): one `tf.function` step
(the loss and its gradients to the features, kernel and bias), measured by
TensorFlow's CPU allocator where it keeps statistics (oneDNN on), else by
the resident-set high-water mark (`/proc/self/clear_refs`, Linux), reset
after the inputs are made. The heads are the benchmark's: `fused`
averages the per-token loss outside the op, `fused_reduced` asks the op for
`reduction="mean"` (the fast gradient). The bounds are the designs' budgets
with room for the allocator's slack, far below what the failures they
guard against would take.
"""

import pathlib
import sys

import pytest

from keras_bn._internals import onednn_enabled

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import linear_cross_entropy as benchmark  # noqa: E402

MIB = 2**20


def _peak_above_inputs(tokens, features, classes, head):
    result = benchmark.run_one(
        head, tokens, features, classes, weighted=False, repeats=0, chunk_size=None
    )
    assert "error" not in result, result
    # Not a lower bound from `ru_maxrss`: the reset must have worked.
    assert result["peak_method"] in ("allocator", "VmHWM"), result
    return result["peak_above_inputs_bytes"]


needs_clear_refs = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="resets the peak resident set through /proc/self/clear_refs (Linux)",
)


@pytest.mark.slow
@needs_clear_refs
@pytest.mark.parametrize("head", ["fused", "fused_reduced"])
def test_the_logits_are_never_held(head):
    # 4,096 tokens x 65,536 classes: the logits are 1 GiB in float32, the
    # kernel's gradient 64 MiB. Each path holds the kernel's gradient and a
    # few chunks (the fast gradient a 256 MiB block of tokens, and with
    # oneDNN off one 64 MiB product of rows of the kernel's gradient): 284
    # and 326 MiB by the allocator with oneDNN on, 384 and 561 by the
    # resident set off. With the logits in one chunk: 3.5 and 1.1 GiB.
    tokens, features, classes = 4096, 256, 65536
    logits = tokens * classes * 4
    peak = _peak_above_inputs(tokens, features, classes, head)
    assert peak < logits * 3 // 4, f"{peak / MIB:.0f} MiB"


@pytest.mark.slow
@needs_clear_refs
def test_the_fast_gradient_holds_one_kernel_sized_tensor():
    # A 512 MiB kernel, 256 tokens: one block of tokens (64 MiB), whose
    # kernel gradient is one product, so the step holds that gradient
    # (512 MiB), the block and the kernels' temporaries: 549 MiB by the
    # allocator with oneDNN on, 750 MiB by the resident set with oneDNN off
    # (677 on before Grappler optimized the step, tests/test_grappler.py).
    # Its per-token fallback, the untaken branch of a `tf.cond`, once built
    # its own kernel-sized zeros anyway: 2,078 and 1,154 MiB.
    tokens, features, classes = 256, 2048, 65536
    kernel = features * classes * 4
    peak = _peak_above_inputs(tokens, features, classes, "fused_reduced")
    assert peak < kernel * 7 // 4, f"{peak / MIB:.0f} MiB"


@pytest.mark.slow
@needs_clear_refs
def test_the_blocks_add_into_one_kernel_sized_tensor():
    # 2,048 tokens x 1,024 features -> 65,536 classes: a 256 MiB kernel
    # gradient, two blocks of 1,024 tokens (256 MiB of logits each). With
    # oneDNN on, oneDNN adds each block's product into the sum's buffer:
    # 529 MiB by the allocator (660 adding 128 MiB products of rows; 792
    # when TensorFlow dropped Grappler's optimizations of the step). With
    # oneDNN off, products of rows: 834 MiB by the resident set.
    tokens, features, classes = 2048, 1024, 65536
    kernel, block = features * classes * 4, 1024 * classes * 4
    extra = kernel // 4 if onednn_enabled() else kernel * 3 // 2
    peak = _peak_above_inputs(tokens, features, classes, "fused_reduced")
    assert peak < kernel + block + extra, f"{peak / MIB:.0f} MiB"
