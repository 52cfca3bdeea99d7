"""benchmarks/gpu_check.py, run between the two logical CPUs of conftest.py.

The script's checks are device-agnostic: here `--device CPU:1 --reference
CPU:0` exercises every one of them on a CPU-only machine, and numerics broken
on purpose (on the device side only) must make them fail.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_bn

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402

DEVICE, REFERENCE = "CPU:1", "CPU:0"
NO_GPU = not tf.config.list_physical_devices("GPU")


@pytest.fixture(autouse=True)
def one_strategy_per_process(monkeypatch, strategy):
    """The script's synchronized checks run on the suite's two-CPU strategy:
    a second MirroredStrategy over the same devices in one process would
    break the first's collectives (and the order of tests decides which)."""
    key = tuple(gpu_check.replica_devices("CPU:0"))
    monkeypatch.setitem(gpu_check._STRATEGIES, key, strategy)


def small_cases(monkeypatch, cases):
    monkeypatch.setattr(gpu_check, "numeric_cases", lambda quick: iter(cases))


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "No GPU" in out and "Nothing was checked" in out


def test_cpu_against_cpu_numerics_and_xla_pass(monkeypatch):
    small_cases(
        monkeypatch,
        [
            ("bn", "fused", "float32", True),
            ("bn", "closed_form", "mixed_float16", True),
            ("bn", "ghost", "mixed_bfloat16", True),
            ("bn", "renorm", "float32", True),
            ("bn", "momentum_none", "float32", True),
            ("bn", "masked", "mixed_bfloat16", False),
            ("bn", "synchronized", "float32", True),
            ("ce", "sparse", "mixed_float16", None),
            ("ce", "dense", "mixed_bfloat16", None),
            ("ce", "linear", "mixed_bfloat16", None),
            ("ce", "linear_mean", "float32", None),
        ],
    )
    modes = ["eager", "tf.function", "xla"]
    checks = gpu_check.check_numerics(DEVICE, REFERENCE, modes, True, 0.0)
    failed = [c for c in checks if c.passed is False]
    assert not failed, failed
    names = {c.name for c in checks if c.passed}
    # Every case ran in every mode (synchronized under XLA is reported as
    # not checked), and the XLA rows compiled.
    assert len(names) == 11 * 3 - 1
    assert {c.section for c in checks} == {"numerics", "xla"}


def test_the_synchronized_path_runs_on_two_replicas():
    assert len(gpu_check.replica_devices(DEVICE)) == 2


@pytest.mark.parametrize("perturb", [1e-4, -1e-4])
def test_a_perturbed_float32_result_fails(monkeypatch, perturb):
    small_cases(monkeypatch, [("bn", "fused", "float32", True)])
    checks = gpu_check.check_numerics(DEVICE, REFERENCE, ["eager"], True, perturb)
    assert [c.passed for c in checks] == [False]
    assert {"y", "dx", "moving_mean"} <= over_the_bound(checks[0])


def over_the_bound(check):
    _, _, names = check.detail.partition("over the bound: ")
    return set(names.split(", ")) - {""}


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_low_precision_bounds_are_one_rounding_wide(monkeypatch, policy):
    """The gradient to float16/bfloat16 logits is compared to its dtype's
    rounding: 8 units of roundoff fail, half a unit (one rounding) passes.
    (The loss is computed in float32 and fails either way.)"""
    small_cases(monkeypatch, [("ce", "dense", policy, None)])
    roundoff = gpu_check.ROUNDOFF[policy.replace("mixed_", "")]
    failed = {}
    for units in (8, 0.5):
        (check,) = gpu_check.check_numerics(
            DEVICE, REFERENCE, ["eager"], True, units * roundoff
        )
        failed[units] = over_the_bound(check)
    assert failed == {8: {"loss", "dlogits"}, 0.5: {"loss"}}


def test_broken_math_on_the_device_only_fails(monkeypatch):
    """The device's batch norm uses 1.5 * epsilon: a relative error of
    about 3e-5 in the outputs, which only the device side has."""
    small_cases(monkeypatch, [("bn", "closed_form", "float32", True)])
    batch_norm = keras_bn.ops.batch_norm
    original_run = gpu_check.run_case
    original_train = batch_norm.normalize_with_batch_statistics

    def broken_train(x, gamma, beta, axes, epsilon, *args, **kwargs):
        return original_train(x, gamma, beta, axes, 1.5 * epsilon, *args, **kwargs)

    def run_case(kind, path, policy, training, device, mode):
        if device != DEVICE:
            return original_run(kind, path, policy, training, device, mode)
        with monkeypatch.context() as patch:
            patch.setattr(batch_norm, "normalize_with_batch_statistics", broken_train)
            return original_run(kind, path, policy, training, device, mode)

    monkeypatch.setattr(gpu_check, "run_case", run_case)
    checks = gpu_check.check_numerics(DEVICE, REFERENCE, ["eager"], True, 0.0)
    assert [c.passed for c in checks] == [False]
    assert "y" in over_the_bound(checks[0])


def test_a_broken_kernel_gradient_sum_on_the_device_fails(monkeypatch):
    """The device's large-vocabulary fast gradient adds each block's kernel
    gradient 0.1% short (eagerly by rows, in a graph by oneDNN's fused add
    where oneDNN is on): only `dkernel` is over the bound."""
    from keras_bn.ops import linear_cross_entropy_uniform as fast

    small_cases(monkeypatch, [("ce", "linear_mean", "float32", None)])
    original_run = gpu_check.run_case

    def run_case(kind, path, policy, training, device, mode):
        if device != DEVICE:
            return original_run(kind, path, policy, training, device, mode)
        with monkeypatch.context() as patch:
            for name in ("_add_fused", "_add_rows"):
                add = getattr(fast, name)
                patch.setattr(fast, name, lambda g, *a, add=add: add(g * 0.999, *a))
            return original_run(kind, path, policy, training, device, mode)

    monkeypatch.setattr(gpu_check, "run_case", run_case)
    modes = ["eager", "tf.function"]
    checks = gpu_check.check_numerics(DEVICE, REFERENCE, modes, True, 0.0)
    assert [c.passed for c in checks] == [False, False]
    assert [over_the_bound(c) for c in checks] == [{"dkernel"}] * 2


def test_error_fraction_follows_the_dtype_rounding():
    want = np.linspace(-2.0, 2.0, 101).astype("float32")
    one_ulp = np.nextafter(want, np.float32(np.inf))
    assert gpu_check.error_fraction(one_ulp, want, terms=1) <= 1.0
    assert gpu_check.error_fraction(want * np.float32(1.001), want, terms=1) > 1.0
    assert gpu_check.error_fraction(want + np.nan, want, terms=1) == np.inf


def test_placement_problems_name_what_left_the_device():
    target = "/job:localhost/replica:0/task:0/device:GPU:0"
    host = "/job:localhost/replica:0/task:0/device:CPU:0"
    nodes = [
        ("FusedBatchNormV3", target, {"float32"}),
        ("Mul", host, {"float32"}),
        ("Shape", host, {"int32"}),  # shape arithmetic may stay on the host
        ("_Send", target, {"float32"}),
        ("EagerPyFunc", target, {"float32"}),
    ]
    problems = gpu_check.placement_problems(nodes, target, ["FusedBatchNormGradV3"])
    assert problems == [
        "FusedBatchNormGradV3 did not run on the device",
        f"Mul on {host}",
        "Python callback EagerPyFunc",
        "transfer _Send ['float32']",
    ]
    assert gpu_check.placement_problems(nodes[:1], target, ["FusedBatchNormV3"]) == []


@pytest.mark.slow
def test_quick_cpu_against_cpu_run_passes_every_section(tmp_path):
    """The script end to end (placement logs, XLA, speed), in a subprocess."""
    out = tmp_path / "checks.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_check.py"),
            "--device",
            DEVICE,
            "--quick",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    checks = json.loads(out.read_text())
    assert {c["section"] for c in checks} == set(gpu_check.SECTIONS)
    placement = {c["name"]: c for c in checks if c["section"] == "placement"}
    # The fused kernels and the sparse kernel ran on the device, eagerly and
    # in a graph; XLA compiled every case.
    assert (
        "FusedBatchNormGradV3" in placement["bn fused train float32 [eager]"]["detail"]
    )
    assert (
        "FusedBatchNormV3"
        in placement["bn fused train float32 [tf.function]"]["detail"]
    )
    assert all(c["passed"] for c in placement.values())
    assert any(c["section"] == "xla" and c["passed"] for c in checks)
    speed = [c for c in checks if c["section"] == "speed"]
    assert speed and all("keras_bn/" in c["detail"] for c in speed)


def test_recorded_graph_nodes_on_another_device_fail():
    """The run metadata of a real step placed on CPU:0, judged for CPU:1:
    every floating op is off the device, and the fused kernels did not run
    there."""

    def make_step():
        with tf.device(REFERENCE):
            return gpu_check.bn_placement_step("float32", True, "tf.function")

    nodes = gpu_check.executed_graph_nodes(make_step)
    expected = ["FusedBatchNormV3", "FusedBatchNormGradV3"]
    on_reference = gpu_check.placement_problems(
        nodes, gpu_check.full_name(REFERENCE), expected
    )
    assert on_reference == []
    elsewhere = gpu_check.placement_problems(
        nodes, gpu_check.full_name(DEVICE), expected
    )
    assert "FusedBatchNormV3 did not run on the device" in elsewhere
    assert any(p.startswith("Mul on ") and p.endswith("CPU:0") for p in elsewhere)


def test_host_reads_are_recorded_and_floats_off_the_host_fail():
    with tf.device(DEVICE):
        values = tf.constant([1.0, 2.0])
    with gpu_check.host_reads() as reads:
        values.numpy()
        bool(values[0] > 0)
    assert [r[:2] for r in reads] == [("float32", (2,)), ("bool", ())]
    gpu = "/job:localhost/replica:0/task:0/device:GPU:0"
    problems, notes = gpu_check.host_read_problems(
        [("float32", (8,), gpu), ("int64", (32,), gpu), ("float32", (8,), reads[0][2])]
    )
    assert problems == ["host read of float32 [8]"]
    assert notes == ["host read of int64 [32]", "host read of float32 [8]"]
