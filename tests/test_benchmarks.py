"""benchmarks/run.py --quick: runs every section and writes well-formed results.

Nothing here asserts on speed: timings on shared machines are too noisy.
Memory is asserted only where it is fixed by what the step returns (the
gradient to `x` is input-sized) or by the arithmetic of the analysis.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
SCRIPT = BENCHMARKS / "run.py"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import memory  # noqa: E402
import torch_peer  # noqa: E402

TIMED_MODES = {"eager", "tf.function", "xla"}
BN_IMPLS = {"keras_bn", "keras_bn_closed_form", "keras", "tf_fused"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks") / "r.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow
def test_quick_run_covers_every_section(quick_results):
    results, _ = quick_results
    assert set(results["sections"]) == {"bn", "ce", "fit", "memory", "torch"}
    for section in ("bn", "ce", "fit"):
        assert results["sections"][section], f"no entries in section {section}"
    bn = results["sections"]["bn"]
    assert {(e["case"]["kind"], e["mode"]) for e in bn} == {
        (kind, mode) for kind in ("train", "inference") for mode in TIMED_MODES
    }
    assert {len(e["case"]["shape"]) for e in bn} == {2, 4}
    assert {e["case"]["dtype"] for e in bn} == {"float32", "float16"}
    ce = results["sections"]["ce"]
    assert {(e["case"]["kind"], e["case"]["dtype"]) for e in ce} == {
        (kind, dtype)
        for kind in ("sparse", "dense")
        for dtype in ("float32", "float16")
    }
    fit = results["sections"]["fit"]
    assert {e["case"]["kind"] for e in fit} == {"cnn", "mlp"}


@pytest.mark.slow
def test_quick_run_times_every_case_in_every_mode(quick_results):
    results, _ = quick_results
    for section in ("bn", "ce"):
        modes = {}
        for e in results["sections"][section]:
            modes.setdefault(e["label"], set()).add(e["mode"])
        for label, seen in modes.items():
            assert seen == TIMED_MODES, (section, label)


@pytest.mark.slow
def test_quick_run_medians_are_positive_and_finite(quick_results):
    results, _ = quick_results
    expected_impls = {
        "bn": BN_IMPLS,
        "ce": {"keras_bn", "keras", "tf_nn"},
        "fit": {"keras_bn", "keras"},
    }
    for section, impls in expected_impls.items():
        for entry in results["sections"][section]:
            medians = entry["medians_ms"]
            assert set(medians) == impls, entry["label"]
            for impl, median in medians.items():
                assert isinstance(median, float), (entry["label"], impl)
                assert math.isfinite(median) and median > 0, (entry["label"], impl)
            for ratio in entry["ratios"].values():
                assert math.isfinite(ratio) and ratio > 0, entry["label"]


@pytest.mark.slow
def test_quick_run_summarizes_every_eager_row(quick_results):
    results, stdout = quick_results
    summary = results["eager_summary"]
    eager = [
        (section, e["label"], e["ratios"]["keras_bn/keras"])
        for section in ("bn", "ce")
        for e in results["sections"][section]
        if e["mode"] == "eager"
    ]
    assert [
        (r["section"], r["label"], r["keras_bn/keras"]) for r in summary["rows"]
    ] == (eager)
    worst = summary["worst_keras_bn/keras"]
    assert worst["keras_bn/keras"] == max(ratio for _, _, ratio in eager)
    assert "Eager mode, all bn and ce cases" in stdout


@pytest.mark.slow
def test_quick_run_measures_memory_of_every_case(quick_results):
    results, stdout = quick_results
    section = results["sections"]["memory"]
    shape, depths = section["shape"], section["depths"]
    assert len(depths) >= 2
    elements = math.prod(shape)
    assert section["input_bytes"] == {"float32": 4 * elements, "float16": 2 * elements}
    assert len(section["cases"]) == len(BN_IMPLS) * 2 * 2 * len(depths)
    rows = section["rows"]
    assert {(r["impl"], r["mode"], r["dtype"]) for r in rows} == {
        (impl, mode, dtype)
        for impl in BN_IMPLS
        for mode in ("eager", "tf.function")
        for dtype in ("float32", "float16")
    }
    for row in rows:
        assert "error" not in row, row
        assert row["depths"] == depths
        unit = section["input_bytes"][row["dtype"]]
        assert row["input_bytes"] == unit
        peaks = row["allocator_peak_bytes"]
        # Every step returns the gradient to x, an input-sized tensor.
        assert all(p >= unit for p in peaks), row
        assert row["allocator_peak_inputs"] == [p / unit for p in peaks]
        slope = (peaks[-1] - peaks[-2]) / (depths[-1] - depths[-2])
        assert row["kept_per_layer"] == pytest.approx(slope / unit)
        assert row["kept_for_backward"] == pytest.approx(slope / unit - 1.0)
        # One process for all quick cases: no resident-set peak of its own.
        assert row["rss_kept_per_layer"] is None
    assert "Memory: peak of one BN training step" in stdout


@pytest.mark.slow
def test_quick_run_has_the_torch_peer_or_says_why_not(quick_results):
    results, stdout = quick_results
    section = results["sections"]["torch"]
    if importlib.util.find_spec("torch") is None:
        assert "not importable" in section["skipped"]
        assert "PyTorch peer: skipped" in stdout
        return
    assert "skipped" not in section and "error" not in section
    assert section["threads"] == results["settings"]["tensorflow_threads"]
    kinds = {e["kind"] for e in section["entries"]}
    assert kinds == {"train", "sparse", "dense"}
    assert {len(e["shape"]) for e in section["entries"] if e["kind"] == "train"} == {
        2,
        4,
    }
    for entry in section["entries"]:
        assert math.isfinite(entry["median_ms"]) and entry["median_ms"] > 0
    assert f"PyTorch {section['torch']} peer" in stdout


@pytest.mark.slow
def test_quick_run_records_the_machine(quick_results):
    results, stdout = quick_results
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "tensorflow", "keras", "onednn"):
        assert machine[key] is not None, key
    assert results["settings"]["quick"] is True
    assert results["settings"]["repetitions"] == 3
    assert "Batch normalization" in stdout
    assert "model.fit" in stdout


def test_torch_peer_skips_cleanly_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    out = tmp_path / "torch.json"
    torch_peer.main(
        ["--cases", "[]", "--threads", "1", "--repetitions", "1"]
        + ["--target-seconds", "0.01", "--out", str(out)]
    )
    section = json.loads(out.read_text())
    assert set(section) == {"skipped"}
    assert "torch is not importable" in section["skipped"]
    table = torch_peer.format_torch_table(section, {})
    assert table.startswith("PyTorch peer: skipped, torch is not importable")


# Run as the memory section's workers run: a fresh process whose environment
# (memory.worker_environment) selects the allocator that keeps statistics,
# whatever the oneDNN setting.
ALLOCATOR_CHECK = textwrap.dedent(
    """
    import json, memory, tensorflow as tf
    pool = memory.grow_allocator_pool(2**28)
    mib = 2**20
    fresh = memory.measure_peak(
        lambda: tf.fill([49 * 2**18], 1.0), pool, rss=False
    )
    x = tf.fill([mib // 4], 1.0)  # before the step: not counted

    def step():
        a = x * 2.0  # 1 MiB
        b = a * 3.0  # 1 MiB, while `a` is alive
        del a
        return b + 1.0  # 1 MiB, while `b` is alive; `b` freed on return

    alive = memory.measure_peak(step, pool, rss=False)
    print(json.dumps({"fresh": fresh, "alive": alive}))
    """
)
# The allocator rounds every buffer up to 256 bytes and counts the small
# ones too: a step's scalar operands add at most a few such buffers.
SMALL_BUFFERS = 4 * 256


@pytest.fixture(scope="module")
def allocator_measures():
    completed = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_CHECK],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=300,
        env=memory.worker_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.splitlines()[-1])


@pytest.mark.slow
def test_allocator_peak_counts_the_tensors_alive_at_once(allocator_measures):
    measured = allocator_measures["alive"]
    mib = 2**20
    assert 2 * mib <= measured["allocator_peak_bytes"] <= 2 * mib + SMALL_BUFFERS
    assert measured["allocator_retained_bytes"] == 0


@pytest.mark.slow
def test_allocator_pool_makes_the_peak_count_tensor_bytes(allocator_measures):
    # Without the pool, a 49 MiB tensor gets a fresh 64 MiB region whole, and
    # counts 64 MiB.
    peak = allocator_measures["fresh"]["allocator_peak_bytes"]
    assert 49 * 2**20 <= peak <= 49 * 2**20 + SMALL_BUFFERS


def test_a_process_without_allocator_statistics_gets_a_clear_error(monkeypatch):
    def no_statistics(device):
        raise ValueError(f"Cannot reset memory stats for device '{device}'")

    monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", no_statistics)
    with pytest.raises(RuntimeError, match="TF_CPU_ALLOCATOR_USE_BFC=true"):
        memory.measure_peak(lambda: None, 2**28, rss=False)


def test_memory_summary_takes_the_slope_between_the_deepest_stacks():
    unit = 1000
    peaks = {1: 2 * unit, 4: 6 * unit, 16: 18 * unit}
    cases = [
        {
            "impl": "keras_bn",
            "mode": "eager",
            "dtype": "float32",
            "depth": depth,
            "allocator_peak_bytes": peak,
            "allocator_retained_bytes": 0,
            "first_step_rss_peak_bytes": peak - unit,
        }
        for depth, peak in reversed(peaks.items())
    ]
    row = memory.summary_row(cases, unit)
    assert row["depths"] == [1, 4, 16]
    assert row["allocator_peak_inputs"] == [2.0, 6.0, 18.0]
    assert row["kept_per_layer"] == pytest.approx(1.0)  # (18 - 6) / 12
    assert row["kept_for_backward"] == pytest.approx(0.0)
    assert row["rss_kept_per_layer"] == pytest.approx(1.0)
    # Least squares over all three: sum((L - 7) * (peak - mean)) / 126.
    assert row["least_squares_kept_per_layer"] == pytest.approx(132 / 126)


def test_memory_summary_reports_a_failed_case():
    cases = [
        {"impl": "keras", "mode": "eager", "dtype": "float16", "depth": 1},
        {"impl": "keras", "mode": "eager", "dtype": "float16", "depth": 4},
    ]
    cases[1]["error"] = "exit status -9: killed"
    row = memory.summary_row(cases, 100)
    assert row["error"] == "exit status -9: killed"
    assert "kept_per_layer" not in row
    section = {
        "shape": [1, 1, 1, 50],
        "depths": [1, 4],
        "input_bytes": {"float32": 200, "float16": 100},
        "rows": [row],
    }
    assert memory.failed_rows(section) == [row]
    assert "FAILED: exit status -9: killed" in memory.format_memory_table(section)


def test_memory_section_needs_two_depths():
    with pytest.raises(ValueError, match="two or more"):
        memory.run_memory_section([8, 8], [4, 4], False, timeout=1)
