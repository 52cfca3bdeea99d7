""".ci/run, run with stand-ins for python, pip and ruff: what it runs, in which
environment, under which oneDNN setting, and its exit status.

The stand-ins record each call and install nothing, so a run takes a second
and needs neither TensorFlow nor a network.
"""

import configparser
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts a bash process
SEPARATOR = "\x1f"

# `python3 -m venv DIR` makes DIR/bin/activate and the stand-ins; any other
# python3 call (.ci/floors.py) runs the real interpreter.
PYTHON3 = r"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf '_OLD_PATH="$PATH"\nPATH="%s/bin:$PATH"\n' "$3" >"$3/bin/activate"
    printf 'deactivate() { PATH="$_OLD_PATH"; }\n' >>"$3/bin/activate"
    for tool in python pip ruff; do ln -s "$CI_STUB" "$3/bin/$tool"; done
    exit 0
fi
exec "$CI_REAL_PYTHON" "$@"
"""
# One line per call: tool, environment, TF_ENABLE_ONEDNN_OPTS, arguments, and
# for `pip -c FILE` the constraints in FILE.
STUB = r"""#!/usr/bin/env bash
env_name="$(basename "$(dirname "$(dirname "$0")")")"
line="$(basename "$0")$S$env_name$S${TF_ENABLE_ONEDNN_OPTS-unset}"
for arg in "$@"; do line="$line$S$arg"; done
previous=""
for arg in "$@"; do
    if [ "$previous" = "-c" ]; then
        line="$line${S}constraints:$(tr '\n' ' ' <"$arg")"
    fi
    previous="$arg"
done
echo "$line" >>"$CI_LOG"
case "$(basename "$0") $*" in
    "python -m pytest"*) exit "$CI_PYTEST_STATUS" ;;
    "ruff "*) exit "$CI_RUFF_STATUS" ;;
esac
exit 0
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_ci(tmp_path, pytest_status=0, ruff_status=0):
    """Runs .ci/run with the stand-ins: (exit status, recorded calls)."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    _executable(stubs / "python3", PYTHON3)
    _executable(tmp_path / "stub", STUB)
    log = tmp_path / "calls.log"
    env = dict(
        os.environ,
        PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}",
        TMPDIR=str(tmp_path),
        S=SEPARATOR,
        CI_STUB=str(tmp_path / "stub"),
        CI_REAL_PYTHON=sys.executable,
        CI_LOG=str(log),
        CI_PYTEST_STATUS=str(pytest_status),
        CI_RUFF_STATUS=str(ruff_status),
    )
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    completed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [line.split(SEPARATOR) for line in log.read_text().splitlines()]
    return completed.returncode, calls


def readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(
        r'^pip install "\.\[test[^\n]*python -m pytest$', readme, re.M
    )
    assert len(commands) == 1, f"README.md's test command not found once: {commands}"
    install, test = commands[0].split(" && ")
    return shlex.split(install), shlex.split(test)


def floor_pins():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    pins = []
    for line in config["options"]["install_requires"].split("\n"):
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([\d.]+)\s*", line)
        if match:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def _pytest_runs(calls):
    """(environment, TF_ENABLE_ONEDNN_OPTS) of each suite run, in order."""
    return [
        (env, onednn)
        for tool, env, onednn, *args in calls
        if args[:2] == ["-m", "pytest"]
    ]


def test_ci_lints_then_runs_the_readme_command_under_both_onednn_settings(tmp_path):
    status, calls = run_ci(tmp_path)
    assert status == 0
    install, test = readme_test_command()
    commands = [[tool, *args] for tool, _, _, *args in calls]
    first_test = commands.index(test)
    assert commands.index(["ruff", "check", "."]) < first_test
    assert commands.index(["ruff", "format", "--check", "."]) < first_test
    # The README's command in the first environment: its install, then the
    # suite as it is, once with oneDNN off and once on.
    newest = [c for c in calls if c[1] == "venv"]
    assert [[tool, *args] for tool, _, _, *args in newest][-3:] == [
        install,
        test,
        test,
    ]
    assert [onednn for _, _, onednn, *_ in newest[-2:]] == ["0", "1"]
    assert _pytest_runs(calls) == [("venv", "0"), ("venv", "1"), ("venv-floors", "0")]


def test_ci_tests_again_at_the_floors_setup_cfg_declares(tmp_path):
    _, calls = run_ci(tmp_path)
    floors = [c for c in calls if c[1] == "venv-floors"]
    installs = [args for tool, _, _, *args in floors if tool == "pip" and "-c" in args]
    assert len(installs) == 1
    assert ".[test,export]" in installs[0]
    pinned = installs[0][-1].removeprefix("constraints:").split()
    assert pinned == floor_pins()
    for package in ("tensorflow", "keras", "numpy"):
        assert any(p.startswith(f"{package}==") for p in pinned), pinned


@pytest.mark.parametrize(
    "pytest_status, ruff_status, expected", [(3, 0, 3), (0, 1, 1), (2, 1, 2)]
)
def test_ci_runs_every_step_and_exits_with_the_first_failure(
    tmp_path, pytest_status, ruff_status, expected
):
    status, calls = run_ci(tmp_path, pytest_status, ruff_status)
    assert status == expected
    assert len(_pytest_runs(calls)) == 3
