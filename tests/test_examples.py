"""The examples run end to end (`--quick`), validate their input, and report honestly.

Each example's `--quick` run is called in this process (`main(parse_args(...))`
from a temporary working directory), which saves a TensorFlow start-up per
example; `distributed_fit.py`, which makes its own MirroredStrategy, runs as
a user runs it, `python examples/distributed_fit.py` in a subprocess from
another working directory. Those runs are marked slow (deselect with
`-m "not slow"`). One more subprocess checks that `--help` and argument
errors answer before TensorFlow is imported. The data loader,
argument types, verdict rules, the quick runs' labels and output folder, and
the `--out` checks have fast tests.
"""

import argparse
import ast
import csv
import importlib
import os
import pathlib
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


def check_accuracies(rows, *columns):
    for column in columns:
        values = floats(rows, column)
        assert np.all((values >= 0) & (values <= 1)), column


def check_covariate_shift(out, stdout):
    columns, rows = read_csv(out / "covariate_shift.csv")
    assert columns == ["model", "step", "test_accuracy", "p15", "p50", "p85"]
    assert {row["model"] for row in rows} == {"without BN", "with BN"}
    # --quick: 100 steps, a record every 20, and one at step 0.
    assert sorted({int(row["step"]) for row in rows}) == list(range(0, 101, 20))
    check_accuracies(rows, "test_accuracy")
    p15, p50, p85 = (floats(rows, f"p{level}") for level in (15, 50, 85))
    assert np.all(np.isfinite(p50)) and np.all((p15 <= p50) & (p50 <= p85))
    assert "[2/2] with BN" in stdout


def check_bn_vs_plain(out, stdout):
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
    assert len({row["learning_rate"] for row in rows}) >= 1
    check_accuracies(rows, "test_accuracy")
    assert np.all(floats(rows, "train_loss") >= 0)


def check_batch_size_tradeoff(out, stdout):
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
    assert len({int(row["batch_size"]) for row in rows}) >= 2
    assert np.all(floats(rows, "seconds_per_epoch") > 0)
    check_accuracies(rows, "train_accuracy", "test_accuracy")
    train, test = floats(rows, "train_accuracy"), floats(rows, "test_accuracy")
    np.testing.assert_allclose(floats(rows, "accuracy_gap"), train - test, atol=1e-6)


def check_cnn_save_load(out, stdout):
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


def check_distributed_fit(out, stdout):
    columns, rows = read_csv(out / "distributed_fit.csv")
    assert columns == ["synchronized", "test_accuracy", "replica_disagreement"]
    synchronized, per_replica = rows
    assert synchronized["synchronized"] == "True"
    assert float(synchronized["replica_disagreement"]) == 0
    assert float(per_replica["replica_disagreement"]) > 0
    assert "moving statistics are identical" in stdout


def check_backward_walk(out, stdout):
    columns, rows = read_csv(out / "backward_walk.csv")
    assert columns == [
        "graph",
        "gradient",
        "formula",
        "against",
        "max_abs_difference",
        "tolerance",
        "agrees",
    ]
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
    columns, rows = read_csv(out / "vanishing_gradients.csv")
    assert columns == [
        "network",
        "model",
        "step",
        "layer",
        "gradient_norm",
        "test_accuracy",
    ]
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
    assert stdout.count("The claim held") + stdout.count("did NOT hold") == 2


def check_bn_placement(out, stdout):
    columns, rows = read_csv(out / "bn_placement.csv")
    assert {"placement", "learning_rate", "seed", "test_accuracy"} <= set(columns)
    assert {"active_fraction_1", "epochs_to_target"} <= set(columns)
    assert {row["placement"] for row in rows} == {"before", "after"}
    check_accuracies(rows, "test_accuracy", "active_fraction_1")
    assert "final test accuracy: the claim" in stdout


def check_gamma_beta(out, stdout):
    columns, rows = read_csv(out / "gamma_beta.csv")
    assert {"variant", "train_loss", "test_accuracy", "gamma_1_mean"} <= set(columns)
    by_variant = {row["variant"]: row for row in rows}
    reduced = by_variant["center=False, scale=False"]
    # Without gamma and beta the layer's scale is 1 and its offset 0.
    assert float(reduced["gamma_1_mean"]) == 1 and float(reduced["beta_1_std"]) == 0
    check_accuracies(rows, "test_accuracy", "saturating_fraction_1")
    assert "The claim held" in stdout or "The claim did NOT hold" in stdout


def check_bn_regularization(out, stdout):
    columns, rows = read_csv(out / "bn_regularization.csv")
    assert {"variant", "epoch", "accuracy_gap", "loss_gap"} <= set(columns)
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
    columns, rows = read_csv(out / "softmax_classifier.csv")
    assert columns == ["claim", "measured", "rule", "held"]
    assert len(rows) == 4
    hardmax = next(row for row in rows if "hardmax" in row["claim"])
    # Measured on fixed logits, so it holds even in a quick run.
    assert hardmax["held"] == "True"
    assert stdout.count(": held (") + stdout.count(": did NOT hold (") == 4


def check_large_vocabulary(out, stdout):
    columns, rows = read_csv(out / "large_vocabulary.csv")
    assert {"head", "vocabulary", "peak_mib"} <= set(columns)
    assert {r["head"] for r in rows} == {"dense", "fused"}
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


def first_import(path, names):
    """Line of the first top-level import of one of `names` (or their submodules)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module]
        else:
            continue
        if any(m.split(".")[0] in names for m in modules):
            return node.lineno
    return None


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_clock_starts_before_tensorflow_is_imported(name):
    script = EXAMPLES / f"{name}.py"
    heavy = {"tensorflow", "keras", "keras_bn", "matplotlib", "numpy"}
    assert first_import(script, {"_common"}) < first_import(script, heavy)
    # In _common itself, STARTED is set before its first third-party import.
    module = ast.parse((EXAMPLES / "_common.py").read_text())
    started = next(
        node.lineno
        for node in module.body
        if isinstance(node, ast.Assign)
        and getattr(node.targets[0], "id", None) == "STARTED"
    )
    assert started < first_import(EXAMPLES / "_common.py", heavy)


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


def test_an_out_that_fails_later_exits_with_code_2_naming_it(tmp_path, capsys):
    # Made unusable after parsing: start_run stops before any training.
    args = example("covariate_shift").parse_args(["--out", str(tmp_path / "runs")])
    (tmp_path / "runs").write_text("")
    with pytest.raises(SystemExit) as exit:
        _common.start_run(args)
    assert exit.value.code == 2
    assert exit.value.__suppress_context__  # no traceback of the OSError
    error = capsys.readouterr().err
    assert error.startswith(f"error: --out: cannot write to {tmp_path / 'runs'}: ")


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


def test_paired_difference_needs_a_margin_of_two_standard_errors():
    mean, error, sign = _common.paired_difference([3.0, 3.1, 2.9], [1.0, 1.2, 1.1])
    assert sign == 1 and mean == pytest.approx(1.9) and error > 0
    assert _common.paired_difference([1.0, 3.0], [2.0, 1.0])[2] == 0  # +1 and -2
    assert _common.paired_difference([1.0, 2.0], [2.0, 3.0])[2] == -1  # no spread
    assert _common.paired_difference([1.0], [0.0])[2] == 0  # one pair is not enough
    assert _common.paired_difference([np.inf, 1.0], [0.0, 0.0])[2] == 0
    # One test image of 450 in every seed: consistent, but within the test
    # set's own sampling noise once that is the floor of the error.
    floor = _common.accuracy_difference_error(0.98, 450)
    assert floor == pytest.approx(np.sqrt(2 * 0.98 * 0.02 / 450))
    one_image = ([0.9844] * 3, [0.9822] * 3)
    assert _common.paired_difference(*one_image)[2] == 1
    mean, error, sign = _common.paired_difference(*one_image, floor=floor)
    assert sign == 0 and error == floor


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
