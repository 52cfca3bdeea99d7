"""The examples run end to end (`--quick`), and their data loader validates input.

Each example runs as a subprocess, as a user would run it, from a working
directory other than the repository. Those runs take about a minute in all,
so they are marked slow (deselect with `-m "not slow"`); the data loader's
tests are fast.
"""

import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402


def read_csv(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def floats(rows, column):
    return np.array([float(row[column]) for row in rows])


def check_covariate_shift(out):
    columns, rows = read_csv(out / "covariate_shift.csv")
    assert columns == ["model", "step", "test_accuracy", "p15", "p50", "p85"]
    assert {row["model"] for row in rows} == {"without BN", "with BN"}
    accuracy = floats(rows, "test_accuracy")
    assert np.all((accuracy >= 0) & (accuracy <= 1))
    p15, p50, p85 = (floats(rows, f"p{level}") for level in (15, 50, 85))
    assert np.all(np.isfinite(p50)) and np.all((p15 <= p50) & (p50 <= p85))


def check_bn_vs_plain(out):
    columns, rows = read_csv(out / "bn_vs_plain.csv")
    assert columns == [
        "model",
        "learning_rate",
        "epoch",
        "train_loss",
        "test_loss",
        "test_accuracy",
    ]
    assert {row["model"] for row in rows} == {"plain", "BN"}
    assert len({row["learning_rate"] for row in rows}) >= 2
    accuracy = floats(rows, "test_accuracy")
    assert np.all((accuracy >= 0) & (accuracy <= 1))
    assert np.all(floats(rows, "train_loss") >= 0)


def check_batch_size_tradeoff(out):
    columns, rows = read_csv(out / "batch_size_tradeoff.csv")
    assert columns == [
        "batch_size",
        "seed",
        "learning_rate",
        "epochs",
        "seconds_per_epoch",
        "train_accuracy",
        "test_accuracy",
        "accuracy_gap",
        "train_loss",
        "test_loss",
    ]
    assert {int(row["batch_size"]) for row in rows} >= {8, 512}
    assert np.all(floats(rows, "seconds_per_epoch") > 0)
    train, test = floats(rows, "train_accuracy"), floats(rows, "test_accuracy")
    assert np.all((train >= 0) & (train <= 1) & (test >= 0) & (test <= 1))
    np.testing.assert_allclose(floats(rows, "accuracy_gap"), train - test, atol=1e-6)


def check_cnn_save_load(out):
    columns, rows = read_csv(out / "cnn_save_load.csv")
    assert columns == ["quantity", "value"]
    numbers = {row["quantity"]: float(row["value"]) for row in rows}
    assert numbers["reload_identical_predictions"] == 1
    assert numbers["reload_max_abs_logit_difference"] == 0
    assert numbers["reloaded_test_accuracy"] == pytest.approx(numbers["test_accuracy"])
    assert numbers["inference_logit_change_alone_vs_batch"] < 1e-4
    assert numbers["training_logit_change_other_batch"] > 0
    for key in ("test_accuracy", "training_mode_accuracy_batch_4"):
        assert 0 <= numbers[key] <= 1
    columns, rows = read_csv(out / "history.csv")
    assert columns[0] == "epoch"
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(columns)
    assert (out / "digits_cnn.keras").is_file()


CHECKS = {
    "covariate_shift": check_covariate_shift,
    "bn_vs_plain": check_bn_vs_plain,
    "batch_size_tradeoff": check_batch_size_tradeoff,
    "cnn_save_load": check_cnn_save_load,
}


def run_example(name, *args, cwd):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_example_runs_quick(name, tmp_path):
    out = tmp_path / "out"
    result = run_example(name, "--quick", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wall time" in result.stdout
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    CHECKS[name](out)


@pytest.mark.slow
def test_example_reports_a_missing_data_file(tmp_path):
    missing = tmp_path / "mnist.npz"
    result = run_example(
        "covariate_shift", "--quick", "--data", str(missing), cwd=tmp_path
    )
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_bundled_digits_split_is_fixed():
    first, second = _common.load_data(), _common.load_data()
    assert first.x_train.shape == (1347, 8, 8) and first.x_test.shape == (450, 8, 8)
    np.testing.assert_array_equal(first.x_test, second.x_test)
    np.testing.assert_array_equal(first.y_train, second.y_train)
    assert first.x_train.min() == 0 and first.x_train.max() == 1
    assert set(np.unique(first.y_test)) == set(range(10))


def test_loads_an_mnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 20, dtype=np.uint8),
        x_test=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 6, dtype=np.uint8),
    )
    data = _common.load_data(path)
    assert data.image_shape == (28, 28)
    assert data.x_train.dtype == np.float32 and data.x_train.max() <= 1
    assert data.flat()[0].shape == (20, 784)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((2, 4, 4))}, "lacks y_train, x_test, y_test"),
        (
            {
                "x_train": np.zeros((2, 16)),
                "y_train": np.zeros(2, int),
                "x_test": np.zeros((2, 4, 4)),
                "y_test": np.zeros(2, int),
            },
            r"x_train has shape \(2, 16\)",
        ),
        (
            {
                "x_train": np.zeros((2, 4, 4)),
                "y_train": np.array([0, 12]),
                "x_test": np.zeros((2, 4, 4)),
                "y_test": np.zeros(2, int),
            },
            "outside 0..9",
        ),
    ],
)
def test_malformed_npz_raises_naming_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as error:
        _common.load_data(path)
    assert str(path) in str(error.value)


def test_text_file_is_named_as_not_an_npz_archive(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_text("not an archive")
    with pytest.raises(ValueError, match="is not an .npz archive") as error:
        _common.load_data(path)
    assert str(path) in str(error.value)


def test_missing_file_raises_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        _common.load_data(tmp_path / "absent.npz")
