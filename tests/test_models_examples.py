"""The keras_bn.models examples run (`--quick`) and write consistent files.

As in test_examples.py, each `--quick` run is called in this process
(`main(parse_args(...))` from a temporary working directory), which saves a
TensorFlow start-up; those runs are marked slow. The command lines answer
`--help` and bad values before TensorFlow is imported.
"""

import csv
import importlib
import sys

import keras
import numpy as np
import pytest
from helpers import EXAMPLES
from helpers import run_command_lines

sys.path.insert(0, str(EXAMPLES))
SCRIPTS = ("ema_recompute", "fold_speedup")


def read_rows(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def column(rows, name):
    return np.array([float(row[name]) for row in rows])


def check_ema_recompute(out, stdout):
    columns, rows = read_rows(out / "ema_recompute.csv")
    assert columns == ["seed", "epoch", "weights", "statistics", "test_accuracy"]
    assert {int(row["epoch"]) for row in rows} == {1, 2}
    assert len(rows) == 2 * 2 * 2  # 2 epochs x {raw, EMA} x {moving, recomputed}
    accuracy = column(rows, "test_accuracy")
    assert np.all((accuracy >= 0) & (accuracy <= 1))
    columns, after_fit = read_rows(out / "after_fit.csv")
    assert columns == ["seed", "ema_moving", "ema_recomputed"]
    last = {
        row["statistics"]: float(row["test_accuracy"])
        for row in rows
        if row["weights"] == "EMA" and int(row["epoch"]) == 2
    }
    # The model after fit holds what the last probe evaluated on its copy:
    # the EMA weights with the raw weights' statistics, then recomputed ones.
    assert float(after_fit[0]["ema_moving"]) == pytest.approx(last["moving"])
    assert float(after_fit[0]["ema_recomputed"]) == pytest.approx(last["recomputed"])
    columns, summary = read_rows(out / "final.csv")
    assert columns[:2] == ["weights", "statistics"] and len(summary) == 4
    assert "after recompute_statistics" in stdout


def check_fold_speedup(out, stdout):
    columns, rows = read_rows(out / "latency.csv")
    assert columns == ["model", "batch_size", "unfolded_ms", "folded_ms", "ratio"]
    assert len({row["model"] for row in rows}) == 2
    unfolded, folded = column(rows, "unfolded_ms"), column(rows, "folded_ms")
    assert np.all(unfolded > 0) and np.all(folded > 0)
    np.testing.assert_allclose(column(rows, "ratio"), folded / unfolded, rtol=1e-6)
    _, rows = read_rows(out / "fold_speedup.csv")
    numbers = {row["quantity"]: float(row["value"]) for row in rows}
    # float32 rounding of the folded kernels, relative to the logits' size
    assert numbers["max_abs_logit_difference"] <= 1e-5 * numbers["max_abs_logit"]
    assert numbers["same_predicted_class"] >= 0.99
    assert numbers["reloaded_without_keras_bn_max_abs_difference"] == 0
    assert abs(numbers["test_accuracy"] - numbers["folded_test_accuracy"]) <= 0.01
    assert (out / "folded.keras").is_file()


CHECKS = {"ema_recompute": check_ema_recompute, "fold_speedup": check_fold_speedup}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_model_tools_example_runs_quick(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    module = importlib.import_module(name)
    module.main(module.parse_args(["--quick", "--out", "out"]))
    stdout = capsys.readouterr().out
    out = tmp_path / "out" / "quick"  # apart from a full run's outputs
    assert "wall time" in stdout
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    CHECKS[name](out, stdout)
    # A quick run's verdict is labelled as not a result.
    verdicts = [line for line in stdout.splitlines() if VERDICTS[name] in line]
    assert verdicts and all(v.startswith("quick run, not a result: ") for v in verdicts)


VERDICTS = {
    "ema_recompute": "after recompute_statistics",
    "fold_speedup": "The folded model's logits differ",
}


def test_help_and_bad_values_answer_before_tensorflow_loads(tmp_path):
    cases = [(str(EXAMPLES / f"{name}.py"), ["--help"]) for name in SCRIPTS]
    cases += [
        (str(EXAMPLES / "ema_recompute.py"), ["--ema-momentum", "1.5"]),
        (str(EXAMPLES / "fold_speedup.py"), ["--repetitions", "0"]),
    ]
    codes, tensorflow_loaded, stderr = run_command_lines(cases, cwd=tmp_path)
    assert codes == [0, 0, 2, 2]
    assert tensorflow_loaded is False
    assert "--ema-momentum: expected a number in (0, 1], got 1.5" in stderr
    assert "--repetitions: expected a whole number >= 1, got 0" in stderr
