"""benchmarks/run.py --quick runs, and the memory measurement and analysis.

Nothing here asserts on speed: timings on shared machines are too noisy.
Memory is asserted only where it is fixed by what the step returns (the
gradient to `x` is input-sized) or by the arithmetic of the analysis.
"""

import json
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
def test_quick_run_measures_every_section(quick_results):
    """The quick run completes. Its memory steps each keep at least the
    input-sized gradient they return, and their analysis is the slope of
    those peaks; the timing ratios are the medians' ratios."""
    results, _ = quick_results
    section = results["sections"]["memory"]
    depths = section["depths"]
    for row in section["rows"]:
        assert "error" not in row, row
        unit, peaks = row["input_bytes"], row["allocator_peak_bytes"]
        assert all(p >= unit for p in peaks), row
        slope = (peaks[-1] - peaks[-2]) / (depths[-1] - depths[-2])
        assert row["kept_per_layer"] == pytest.approx(slope / unit)
    for name in ("bn", "ce", "fit"):
        for entry in results["sections"][name]:
            medians = entry["medians_ms"]
            for ratio_name, ratio in entry["ratios"].items():
                a, b = ratio_name.split("/")
                assert ratio == pytest.approx(medians[a] / medians[b]), ratio_name


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
