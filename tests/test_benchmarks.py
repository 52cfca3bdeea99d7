"""benchmarks/run.py --quick: runs every section and writes well-formed results.

Nothing here asserts on speed: timings on shared machines are too noisy.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks") / "r.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow
def test_quick_run_covers_every_section(quick_results):
    results, _ = quick_results
    assert set(results["sections"]) == {"bn", "ce", "fit"}
    for section, entries in results["sections"].items():
        assert entries, f"no entries in section {section}"
    bn = results["sections"]["bn"]
    assert {(e["case"]["kind"], e["mode"]) for e in bn} == {
        (kind, mode)
        for kind in ("train", "inference")
        for mode in ("eager", "tf.function", "xla")
    }
    assert {len(e["case"]["shape"]) for e in bn} == {2, 4}
    assert {e["case"]["dtype"] for e in bn} == {"float32", "float16"}
    ce = results["sections"]["ce"]
    assert {e["case"]["kind"] for e in ce} == {"sparse", "dense"}
    fit = results["sections"]["fit"]
    assert {e["case"]["kind"] for e in fit} == {"cnn", "mlp"}


@pytest.mark.slow
def test_quick_run_medians_are_positive_and_finite(quick_results):
    results, _ = quick_results
    expected_impls = {
        "bn": {"keras_bn", "keras_bn_closed_form", "keras", "tf_fused"},
        "ce": {"keras_bn", "keras", "tf_nn"},
        "fit": {"keras_bn", "keras"},
    }
    for section, entries in results["sections"].items():
        for entry in entries:
            medians = entry["medians_ms"]
            assert set(medians) == expected_impls[section], entry["label"]
            for impl, median in medians.items():
                assert isinstance(median, float), (entry["label"], impl)
                assert math.isfinite(median) and median > 0, (entry["label"], impl)
            for ratio in entry["ratios"].values():
                assert math.isfinite(ratio) and ratio > 0, entry["label"]


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
