"""The examples run end to end (`--quick`), validate their input, and report honestly.

Each example's `--quick` run is called in this process (`main(parse_args(...))`
from a temporary working directory), which saves a TensorFlow start-up per
example; `distributed_fit.py`, which makes its own MirroredStrategy, runs as
a user runs it, `python examples/distributed_fit.py` in a subprocess from
another working directory. Those runs are marked slow (deselect with
`-m "not slow"`); each checks that the CSV records the numbers the run
printed. One more subprocess checks that `--help` and argument errors answer
before TensorFlow is imported. The data loader, argument types, verdict
rules, the quick runs' labels and output folder, and the `--out` checks have
fast tests.
"""

import argparse
import builtins
import csv
import importlib
import os
import pathlib
import re
import runpy
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from helpers import EXAMPLES
from helpers import run_command_lines

sys.path.insert(0, str(EXAMPLES))

import _common

SCRIPTS = sorted(
    path.stem for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")
)


def example(name):
    return importlib.import_module(name)


def read_csv(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def floats(rows, column):
    return np.array([float(row[column]) for row in rows])


def printed_table(stdout, first_column):
    """The rows of the table printed under a header that starts `first_column`."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.split()[:1] == [first_column]
    )
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows


def same_number(printed, value):
    """Whether a number printed with 4 significant digits is `value`."""
    return float(printed) == pytest.approx(float(value), rel=1e-3, abs=1e-6)


def at_rate(rows, column, value, printed_rate):
    """The rows whose `column` is `value`, at a learning rate as printed."""
    return [
        row
        for row in rows
        if row[column] == value and same_number(printed_rate, row["learning_rate"])
    ]


def check_accuracies(rows, *columns):
    for column in columns:
        values = floats(rows, column)
        assert np.all((values >= 0) & (values <= 1)), column


def check_covariate_shift(out, stdout):
    _, rows = read_csv(out / "covariate_shift.csv")
    assert {row["model"] for row in rows} == {"without BN", "with BN"}
    # The last record of each model is the final accuracy it printed.
    for printed in printed_table(stdout, "model"):
        last = [row for row in rows if row["model"] == printed["model"]][-1]
        assert same_number(printed["final_accuracy"], last["test_accuracy"])
    # --quick: 100 steps, a record every 20, and one at step 0.
    assert sorted({int(row["step"]) for row in rows}) == list(range(0, 101, 20))
    check_accuracies(rows, "test_accuracy")
    p15, p50, p85 = (floats(rows, f"p{level}") for level in (15, 50, 85))
    assert np.all(np.isfinite(p50)) and np.all((p15 <= p50) & (p50 <= p85))
    assert "[2/2] with BN" in stdout


def check_bn_vs_plain(out, stdout):
    _, rows = read_csv(out / "bn_vs_plain.csv")
    assert {row["model"] for row in rows} == {"plain", "BN"}
    # Each model's last epoch at each rate is the final accuracy it printed.
    for printed in printed_table(stdout, "learning_rate"):
        for model in ("plain", "BN"):
            runs = at_rate(rows, "model", model, printed["learning_rate"])
            assert same_number(printed[model], runs[-1]["test_accuracy"])
    assert len({row["learning_rate"] for row in rows}) >= 1
    check_accuracies(rows, "test_accuracy")
    assert np.all(floats(rows, "train_loss") >= 0)


def check_batch_size_tradeoff(out, stdout):
    _, rows = read_csv(out / "batch_size_tradeoff.csv")
    # The printed accuracies are the means over the seeds' runs.
    for printed in printed_table(stdout, "batch_size"):
        runs = [r for r in rows if r["batch_size"] == printed["batch_size"]]
        assert same_number(
            printed["test_accuracy"], floats(runs, "test_accuracy").mean()
        )
    assert len({int(row["batch_size"]) for row in rows}) >= 2
    assert np.all(floats(rows, "seconds_per_epoch") > 0)
    check_accuracies(rows, "train_accuracy", "test_accuracy")
    train, test = floats(rows, "train_accuracy"), floats(rows, "test_accuracy")
    np.testing.assert_allclose(floats(rows, "accuracy_gap"), train - test, atol=1e-6)


def check_cnn_save_load(out, stdout):
    _, rows = read_csv(out / "cnn_save_load.csv")
    numbers = {row["quantity"]: float(row["value"]) for row in rows}
    printed = printed_table(stdout, "quantity")
    assert [row["quantity"] for row in printed] == list(numbers)
    assert all(same_number(row["value"], numbers[row["quantity"]]) for row in printed)
    assert numbers["reload_identical_predictions"] == 1
    assert numbers["reload_max_abs_logit_difference"] == 0
    assert numbers["reloaded_test_accuracy"] == pytest.approx(numbers["test_accuracy"])
    assert numbers["inference_logit_change_alone_vs_batch"] < 1e-4
    assert numbers["training_logit_change_other_batch"] > 0
    for key in ("test_accuracy", "training_mode_accuracy_batch_4"):
        assert 0 <= numbers[key] <= 1
    _, history = read_csv(out / "history.csv")
    # One row an epoch; the last one's test accuracy is the model's.
    assert [int(row["epoch"]) for row in history] == list(range(1, len(history) + 1))
    assert same_number(history[-1]["val_accuracy"], numbers["test_accuracy"])
    assert (out / "digits_cnn.keras").is_file()


def check_distributed_fit(out, stdout):
    _, rows = read_csv(out / "distributed_fit.csv")
    for printed, row in zip(printed_table(stdout, "synchronized"), rows, strict=True):
        assert printed["synchronized"] == row["synchronized"]
        assert same_number(printed["test_accuracy"], row["test_accuracy"])
    synchronized, per_replica = rows
    assert synchronized["synchronized"] == "True"
    assert float(synchronized["replica_disagreement"]) == 0
    assert float(per_replica["replica_disagreement"]) > 0
    assert "moving statistics are identical" in stdout


def check_backward_walk(out, stdout):
    _, rows = read_csv(out / "backward_walk.csv")
    # One row for each check the walk printed.
    assert len(rows) == stdout.count(" -> agrees") + stdout.count(" -> DIFFERS")
    gradients = {(row["graph"], row["gradient"]) for row in rows}
    for name in ("keras_bn dx", "keras_bn dgamma", "keras_bn dbeta", "1. dx"):
        assert ("batch norm", name) in gradients
    for name in ("keras_bn dz", "dz closed form", "2. dm"):
        assert ("cross-entropy", name) in gradients
    assert all(row["agrees"] == "True" for row in rows)
    assert np.all(floats(rows, "max_abs_difference") <= floats(rows, "tolerance"))
    assert f"All {len(rows)} checks agree" in stdout
    page_folder = out.parents[1] / "page"  # --markdown page/walk.md, not in --out
    page = (page_folder / "walk.md").read_text()
    assert page.startswith("# A walk through the backward pass")
    assert "dx = dxc + dmu / N" in page and "p - y" in page
    # The page shows its figure from beside it.
    assert "![The two graphs and their checks](walk.png)" in page
    assert (page_folder / "walk.png").read_bytes()[:4] == b"\x89PNG"


def check_vanishing_gradients(out, stdout):
    _, rows = read_csv(out / "vanishing_gradients.csv")
    assert {row["model"] for row in rows} == {"plain", "BN"}
    # --quick: 6 layers, records at steps 0, 5, 10, for 2 networks x 2 models.
    assert len(rows) == 2 * 2 * 3 * 6
    norms = floats(rows, "gradient_norm")
    assert np.all(np.isfinite(norms) & (norms >= 0))
    at_init = {
        (row["network"], row["model"], int(row["layer"])): float(row["gradient_norm"])
        for row in rows
        if row["step"] == "0"
    }
    # Six sigmoid layers already shrink the first layer's gradient 100-fold.
    assert at_init[("sigmoid", "plain", 1)] < 0.01 * at_init[("sigmoid", "plain", 6)]
    # The printed ratio is the first layer's norm over the last one's.
    for printed in printed_table(stdout, "network"):
        network = printed["network"]
        ratio = at_init[(network, "plain", 1)] / at_init[(network, "plain", 6)]
        assert same_number(printed["plain_ratio_at_init"], ratio)
    assert stdout.count("The claim held") + stdout.count("did NOT hold") == 2


def check_bn_placement(out, stdout):
    _, rows = read_csv(out / "bn_placement.csv")
    assert {row["placement"] for row in rows} == {"before", "after"}
    # The printed accuracies are the means over seeds, at each rate.
    for printed in printed_table(stdout, "learning_rate"):
        for placement in ("before", "after"):
            runs = at_rate(rows, "placement", placement, printed["learning_rate"])
            mean = floats(runs, "test_accuracy").mean()
            assert same_number(printed[f"{placement}_test_accuracy"], mean)
            assert np.all(floats(runs, "epochs_to_target") >= 1)
    check_accuracies(rows, "test_accuracy", "active_fraction_1")
    assert "final test accuracy: the claim" in stdout


def check_gamma_beta(out, stdout):
    _, rows = read_csv(out / "gamma_beta.csv")
    for printed, row in zip(printed_table(stdout, "variant"), rows, strict=True):
        assert (printed["variant"], printed["seed"]) == (row["variant"], row["seed"])
        assert same_number(printed["train_loss"], row["train_loss"])
    by_variant = {row["variant"]: row for row in rows}
    reduced = by_variant["center=False, scale=False"]
    # Without gamma and beta the layer's scale is 1 and its offset 0.
    assert float(reduced["gamma_1_mean"]) == 1 and float(reduced["beta_1_std"]) == 0
    check_accuracies(rows, "test_accuracy", "saturating_fraction_1")
    assert "The claim held" in stdout or "The claim did NOT hold" in stdout


def check_bn_regularization(out, stdout):
    _, rows = read_csv(out / "bn_regularization.csv")
    # The printed gaps are the means over seeds of the last epoch's.
    last = max(int(row["epoch"]) for row in rows)
    for printed in printed_table(stdout, "variant"):
        runs = [r for r in rows if r["variant"] == printed["variant"]]
        gaps = floats([r for r in runs if int(r["epoch"]) == last], "accuracy_gap")
        assert same_number(printed["accuracy_gap"], gaps.mean())
    assert {row["variant"] for row in rows} == {
        "BN, no dropout",
        "dropout, no BN",
        "plain",
    }
    check_accuracies(rows, "train_accuracy", "test_accuracy")
    gap = floats(rows, "train_accuracy") - floats(rows, "test_accuracy")
    np.testing.assert_allclose(floats(rows, "accuracy_gap"), gap, atol=1e-6)
    assert "The claim held" in stdout or "The claim did NOT hold" in stdout


def check_softmax_classifier(out, stdout):
    _, rows = read_csv(out / "softmax_classifier.csv")
    assert len(rows) == 4
    # The CSV holds the verdicts the run printed.
    held = [row["claim"] for row in rows if row["held"] == "True"]
    lines = [line.removeprefix(_common.QUICK_LABEL) for line in stdout.splitlines()]
    printed = [line.split(": held (")[0] for line in lines if ": held (" in line]
    assert sorted(held) == sorted(printed)
    hardmax = next(row for row in rows if "hardmax" in row["claim"])
    # Measured on fixed logits, so it holds even in a quick run.
    assert hardmax["held"] == "True"
    assert stdout.count(": held (") + stdout.count(": did NOT hold (") == 4


def check_large_vocabulary(out, stdout):
    _, rows = read_csv(out / "large_vocabulary.csv")
    assert {r["head"] for r in rows} == {"dense", "fused"}
    # Each measured peak is the one printed, in whole MiB.
    for row in rows:
        line = f"{row['head']} head, V={int(row['vocabulary']):>6}: "
        assert f"{line}{float(row['peak_mib']):>8.0f} MiB" in stdout
    assert "held-out perplexity" in stdout and "verdict:" in stdout


CHECKS = {
    "covariate_shift": check_covariate_shift,
    "bn_vs_plain": check_bn_vs_plain,
    "batch_size_tradeoff": check_batch_size_tradeoff,
    "cnn_save_load": check_cnn_save_load,
    "distributed_fit": check_distributed_fit,
    "backward_walk": check_backward_walk,
    "vanishing_gradients": check_vanishing_gradients,
    "bn_placement": check_bn_placement,
    "gamma_beta": check_gamma_beta,
    "bn_regularization": check_bn_regularization,
    "softmax_classifier": check_softmax_classifier,
    "large_vocabulary": check_large_vocabulary,
}
EXTRA_ARGS = {"backward_walk": ["--markdown", "page/walk.md"]}
# A second MirroredStrategy over the test process's two logical CPUs would
# break the collectives of the one its tests share (conftest.py).
OWN_PROCESS = {"distributed_fit"}
# Written by another part of the project, with their own tests.
OTHER_SCRIPTS = {
    name for name in SCRIPTS if name == "ema_recompute" or name.startswith("fold_")
}


def test_every_example_has_a_check():
    assert set(SCRIPTS) - OTHER_SCRIPTS == set(CHECKS)


# Whose --quick runs the whole computation (it takes seconds): its verdict
# is a result.
QUICK_IS_FULL_RUN = {"backward_walk"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_example_runs_quick(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--quick", "--out", "out", *EXTRA_ARGS.get(name, [])]
    if name in OWN_PROCESS:
        result = run_script(name, *argv, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        stdout = result.stdout
    else:
        keras.backend.clear_session()
        module = example(name)
        module.main(module.parse_args(argv))
        stdout = capsys.readouterr().out
    # Apart from a full run's outputs, which would be in out/ itself.
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["quick"]
    out = tmp_path / "out" / "quick"
    (wall_time,) = [line for line in stdout.splitlines() if "wall time" in line]
    assert wall_time.endswith(f"CSV in {pathlib.Path('out', 'quick')}")
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    CHECKS[name](out, stdout)
    check_quick_verdicts_are_labelled(name, stdout)


# A phrase of each script's verdict, printed by every run.
VERDICT_PHRASES = {
    "covariate_shift": "The sigmoid input's median moved",
    "bn_vs_plain": "best final test accuracy",
    "batch_size_tradeoff": "An epoch at batch size",
    "cnn_save_load": "Inference mode: an image's logits change",
    "distributed_fit": "With synchronized=True the replicas",
    "backward_walk": "checks agree",
    "vanishing_gradients": "without BN the gradients",
    "bn_placement": "by learning rate: ",
    "gamma_beta": "Test accuracy with gamma and beta",
    "bn_regularization": "The claim",
    "softmax_classifier": "rule: ",
    "large_vocabulary": "the fused head peaks at",
}


def check_quick_verdicts_are_labelled(name, stdout):
    lines = stdout.splitlines()
    verdicts = [line for line in lines if VERDICT_PHRASES[name] in line]
    labelled = [line.startswith(_common.QUICK_LABEL) for line in verdicts]
    if name in QUICK_IS_FULL_RUN:
        assert verdicts and not any(labelled) and "not a result" not in stdout
        return
    assert verdicts and all(labelled), verdicts
    notice = lines.index(next(line for line in lines if "a smoke test" in line))
    assert lines[notice].startswith("quick run: ") and "not results" in lines[notice]
    assert notice < lines.index(verdicts[0])
    assert lines[-1].startswith("quick run: its numbers and verdicts are not results")


def run_script(name, *args, cwd):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_backward_walk_page_beside_its_own_figure(tmp_path, capsys):
    module = example("backward_walk")
    out = tmp_path / "out"
    # The page's figure is the figure of --out itself: nothing to copy.
    page = out / "backward_walk.md"
    module.main(module.parse_args(["--out", str(out), "--markdown", str(page)]))
    assert "checks agree" in capsys.readouterr().out
    assert "](backward_walk.png)" in page.read_text()
    assert (out / "backward_walk.png").is_file()


@pytest.mark.slow
def test_help_and_bad_arguments_answer_before_tensorflow_loads(tmp_path):
    text_file = tmp_path / "mnist.npz"
    text_file.write_text("not an archive")
    cases = [(str(EXAMPLES / f"{name}.py"), ["--help"]) for name in CHECKS]
    cases += [
        (str(EXAMPLES / "bn_vs_plain.py"), ["--epochs", "-1"]),
        (str(EXAMPLES / "bn_vs_plain.py"), ["--epochs", "0"]),
        (str(EXAMPLES / "covariate_shift.py"), ["--steps", "30"]),
        (str(EXAMPLES / "covariate_shift.py"), ["--data", str(text_file)]),
        (str(EXAMPLES / "covariate_shift.py"), ["--quick", "--out", f"{text_file}/r"]),
    ]
    codes, tensorflow_loaded, stderr = run_command_lines(cases, cwd=tmp_path)
    assert codes == [0] * len(CHECKS) + [2] * 5
    assert tensorflow_loaded is False
    assert "expected a whole number >= 1, got -1" in stderr
    assert "expected a whole number >= 1, got 0" in stderr
    assert "--steps (30) must be a multiple of --eval-every (50)" in stderr
    assert f"{text_file} is not an .npz archive" in stderr
    assert f"--out: cannot write to {text_file}/r/quick: {text_file} is a" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-3"], "--epochs: expected a whole number >= 1, got -3"),
        (["--epochs", "0"], "--epochs: expected a whole number >= 1, got 0"),
        (["--epochs", "2.5"], "--epochs: expected a whole number >= 1, got '2.5'"),
        (["--seeds", "-1"], "--seeds: expected a whole number >= 1, got -1"),
    ],
)
def test_counts_reject_values_below_one(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        example("batch_size_tradeoff").parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("covariate_shift", ["--steps", "-100"], "--steps: expected a whole number"),
        ("covariate_shift", ["--steps", "120"], "must be a multiple of --eval-every"),
        ("covariate_shift", ["--threshold", "1.5"], "expected a number in (0, 1]"),
        ("covariate_shift", ["--learning-rate", "0"], "expected a number > 0"),
        ("covariate_shift", ["--learning-rate", "nan"], "expected a finite number"),
        ("vanishing_gradients", ["--steps", "70"], "multiple of --record-every"),
        ("cnn_save_load", ["--bn-momentum", "-0.5"], "expected a number in (0, 1]"),
        ("bn_regularization", ["--dropout", "0"], "expected a number in (0, 1]"),
    ],
)
def test_examples_reject_bad_values_with_a_message(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        example(name).parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_runs_write_apart_from_full_runs():
    module = example("covariate_shift")
    full, quick = module.parse_args([]), module.parse_args(["--quick"])
    assert full.out == pathlib.Path("keras_bn_runs", "covariate_shift")
    assert quick.out == full.out / "quick"
    given = module.parse_args(["--quick", "--out", "runs"])
    assert given.out == pathlib.Path("runs", "quick")
    assert (full.smoke_test, quick.smoke_test) == (False, True)
    # Its --quick is the whole walk: apart, but a result.
    walk = example("backward_walk").parse_args(["--quick"])
    assert walk.out.name == "quick" and not walk.smoke_test


def test_a_quick_run_labels_every_verdict_line(capsys):
    quick = argparse.Namespace(smoke_test=True)
    with _common.verdicts(quick):
        print("The claim did NOT hold.\n")
        print("  The claim", end="")
        print(" held.")
        sys.stdout.write("A second\nand a third line.\n")
    label = _common.QUICK_LABEL
    assert capsys.readouterr().out.splitlines() == [
        f"{label}The claim did NOT hold.",
        "",
        f"{label}  The claim held.",
        f"{label}A second",
        f"{label}and a third line.",
    ]
    with _common.verdicts(argparse.Namespace(smoke_test=False)):
        print("The claim held.")
    assert capsys.readouterr().out == "The claim held.\n"


def test_the_closing_line_of_a_quick_run_says_it_is_not_a_result(capsys):
    out = pathlib.Path("runs", "quick")
    _common.print_wall_time(argparse.Namespace(smoke_test=True, out=out))
    wall_time, notice = capsys.readouterr().out.splitlines()
    assert wall_time.endswith(f"figure and CSV in {out}")
    assert notice.startswith("quick run: its numbers and verdicts are not results")
    _common.print_wall_time(argparse.Namespace(smoke_test=False, out=out))
    assert "not a result" not in capsys.readouterr().out


def test_wall_time_counts_from_the_scripts_start(monkeypatch, capsys):
    # As if the script had started 10,000 s ago.
    monkeypatch.setattr(_common, "STARTED", time.perf_counter() - 1e4)
    _common.print_wall_time(argparse.Namespace(smoke_test=False, out="runs"))
    seconds = capsys.readouterr().out.split("wall time: ")[1].split(" s ")[0]
    assert int(seconds) >= 10_000


def imports_while_running(path, heavy):
    """Runs `path` as a module (not as a script), noting each of its imports.

    Returns the names it imports, in order, and whether `STARTED` was set at
    its first import of one of `heavy`.
    """
    imported, started_first = [], []
    real_import = builtins.__import__

    def noting_import(name, globals=None, *args, **kwargs):
        if globals is not None and globals.get("__name__") == "noted":
            imported.append(name)
            if name.split(".")[0] in heavy and not started_first:
                started_first.append("STARTED" in globals)
        return real_import(name, globals, *args, **kwargs)

    builtins.__import__ = noting_import
    try:
        runpy.run_path(str(path), run_name="noted")
    finally:
        builtins.__import__ = real_import
    return imported, started_first[0]


HEAVY = {"tensorflow", "keras", "keras_bn", "matplotlib", "numpy"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_clock_starts_before_tensorflow_is_imported(name):
    # A script imports _common, which starts the clock, before any of HEAVY...
    imported, _ = imports_while_running(EXAMPLES / f"{name}.py", HEAVY)
    heavy = [i for i, module in enumerate(imported) if module.split(".")[0] in HEAVY]
    assert heavy and "_common" in imported[: heavy[0]]


def test_common_starts_the_clock_before_its_own_imports():
    # ... before any third-party import of its own.
    imported, started_first = imports_while_running(EXAMPLES / "_common.py", HEAVY)
    assert started_first and {"matplotlib", "numpy"} <= set(imported)


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_an_unusable_out_stops_while_parsing_naming_it(quick, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    out = a_file / "runs"
    with pytest.raises(SystemExit) as exit:
        example("covariate_shift").parse_args(["--out", str(out), *quick])
    assert exit.value.code == 2
    folder = out / "quick" if quick else out
    error = capsys.readouterr().err
    assert f"argument --out: cannot write to {folder}: {a_file} is a file" in error


def test_a_read_only_out_stops_while_parsing(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if getattr(os, "geteuid", lambda: None)() == 0:
        # Root writes through permission bits: the folder reads as writable,
        # so the kernel's answer for another user is given here.
        access = os.access
        monkeypatch.setattr(
            _common.os,
            "access",
            lambda path, mode: access(path, mode) and pathlib.Path(path) != locked,
        )
    with pytest.raises(SystemExit) as exit:
        example("covariate_shift").parse_args(["--out", str(locked / "runs")])
    assert exit.value.code == 2
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_quick_changes_only_the_defaults_not_given_values():
    module = example("covariate_shift")
    assert module.parse_args([]).steps == 6000
    assert module.parse_args(["--quick"]).steps == 100
    quick = module.parse_args(["--quick", "--steps", "40", "--eval-every", "20"])
    assert (quick.steps, quick.eval_every) == (40, 20)
    assert example("bn_vs_plain").parse_args(["--epochs", "1"]).epochs == 1


def test_examples_without_digits_take_no_data_argument(capsys):
    with pytest.raises(SystemExit):
        example("softmax_classifier").parse_args(["--data", "mnist.npz"])
    assert "unrecognized arguments: --data" in capsys.readouterr().err


def test_a_missing_data_file_is_named_while_parsing(tmp_path, capsys):
    missing = tmp_path / "mnist.npz"
    with pytest.raises(SystemExit):
        example("covariate_shift").parse_args(["--data", str(missing)])
    assert f"argument --data: no file at {missing}" in capsys.readouterr().err


SIGNS = {"before": 1, "after": -1, "no clear difference": 0}


def placement_rule(first, second, floor=0.0):
    """bn_placement's rule on one metric at one rate: `(mean, error, sign)`."""
    rows = [
        {"learning_rate": 0.1, "seed": seed, "placement": placement, "metric": value}
        for placement, values in (("before", first), ("after", second))
        for seed, value in enumerate(values)
    ]
    module = example("bn_placement")
    better, mean, error = module.paired_verdict(rows, 0.1, "metric", True, floor)
    return mean, error, SIGNS[better]


def regularization_rule(first, second, floor=0.0):
    return example("bn_regularization").paired(np.subtract(first, second), floor)


def gamma_beta_rule(first, second):
    """gamma_beta's rule on log10 of the training loss (which has no floor)."""
    rows = [
        {"variant": variant, "seed": seed, "train_loss": 10.0**value}
        | {"test_accuracy": 0.5}
        for variant, values in zip(example("gamma_beta").VARIANTS, (first, second))
        for seed, value in enumerate(values)
    ]
    return example("gamma_beta").compare(rows, 450)["log10_train_loss"]


@pytest.mark.parametrize("rule", [placement_rule, regularization_rule, gamma_beta_rule])
def test_a_paired_difference_needs_a_margin_of_two_standard_errors(rule):
    mean, error, sign = rule([3.0, 3.1, 2.9], [1.0, 1.2, 1.1])
    assert sign == 1 and mean == pytest.approx(1.9) and error > 0
    assert rule([1.0, 3.0], [2.0, 1.0])[2] == 0  # +1 and -2
    assert rule([1.0, 2.0], [2.0, 3.0])[2] == -1  # no spread
    assert rule([1.0], [0.0])[2] == 0  # one pair is not enough
    assert rule([np.inf, 1.0], [0.0, 0.0])[2] == 0


@pytest.mark.parametrize("rule", [placement_rule, regularization_rule])
def test_the_test_sets_noise_is_the_smallest_error(rule):
    # One test image of 450 in every seed: consistent, but within the test
    # set's own sampling noise once that is the floor of the error.
    one_image = ([0.9844] * 3, [0.9822] * 3)
    assert rule(*one_image)[2] == 1
    floor = np.sqrt(2 * 0.98 * 0.02 / 450)
    mean, error, sign = rule(*one_image, floor=floor)
    assert sign == 0 and error == floor


@pytest.mark.parametrize(
    "recomputed, stale, clear",
    [
        ([0.95, 0.96, 0.97], [0.5, 0.52, 0.48], True),
        ([0.9844] * 3, [0.9822] * 3, False),
    ],
)
def test_ema_recompute_calls_a_gain_clear_beyond_the_test_sets_noise(
    recomputed, stale, clear, capsys
):
    summary = [{"weights": "raw", "statistics": "moving", "mean_test_accuracy": 0.9}]
    finals = [{"ema_moving": s, "ema_recomputed": r} for s, r in zip(stale, recomputed)]
    example("ema_recompute").report(summary, finals, 450)
    printed = capsys.readouterr().out
    assert ("restored the EMA model's accuracy" in printed) == clear
    assert ("No clear difference" in printed) != clear


def test_vanishing_gradient_verdict_follows_the_stated_rule():
    module = example("vanishing_gradients")

    def records(*ratios):
        return [
            {"step": i, "norms": np.array([r, 1.0]), "test_accuracy": 0.5}
            for i, r in enumerate(ratios)
        ]

    results = {
        ("sigmoid", "plain"): records(1e-5, 1e-5),
        ("sigmoid", "BN"): records(1.0, 9.0),
        ("tanh, large init", "plain"): records(5.0, 1e-3),
        ("tanh, large init", "BN"): records(1.0, 11.0),
    }
    sigmoid, tanh = module.verdicts(results)
    assert sigmoid["without_bn"] == "vanish" and sigmoid["claim_holds"]
    assert tanh["without_bn"] == "neither vanish nor explode"
    assert not tanh["bn_within_factor"] and not tanh["claim_holds"]


def test_backward_walk_flags_a_gradient_that_differs():
    walk = example("backward_walk").Walk()
    reference = np.array([1.0, -2.0, 3.0])
    walk.check("g", "ok", "f", reference + 1e-13, reference, "ref", 1e-12)
    walk.check("g", "off", "f", reference + 1e-9, reference, "ref", 1e-12)
    assert [row["agrees"] for row in walk.checks] == [True, False]
    verdict = example("backward_walk").report(walk.checks)
    assert verdict.startswith("1 of 2 gradients DIFFER: g off")


def test_softmax_example_data_is_as_described():
    module = example("softmax_classifier")
    rng = np.random.default_rng(0)
    x, y = module.separable_data(300, rng)
    scores = np.sort(x @ module.SEPARATING_WEIGHTS.T, axis=1)
    assert np.all(scores[:, -1] - scores[:, -2] > module.MARGIN)
    assert set(np.unique(y)) == {0, 1, 2}
    x, y = module.ring_data(300, rng)
    radius = np.linalg.norm(x, axis=1)
    assert np.all(radius[y == 0] <= 1) and np.all(radius[y == 1] >= 1.6)


def test_argument_types():
    assert _common.positive_int("3") == 3
    assert _common.unit_fraction("1") == 1.0
    for function, text in (
        (_common.positive_int, "0"),
        (_common.positive_int, "x"),
        (_common.positive_float, "-1e-3"),
        (_common.positive_float, "inf"),
        (_common.unit_fraction, "0"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            function(text)


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
    assert data.x_train.shape[1:] == (28, 28) and data.name == "mnist.npz (28x28)"
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
            r"has x_train of shape \(2, 16\)",
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
