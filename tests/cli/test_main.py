"""The ``modelscape`` command explains itself: help, version, one-line errors, a closed pipe."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from modelscape import RunFolderMismatch
from modelscape._version import VERSION
from modelscape.cli.demo import new_folder_hint
from modelscape.cli.main import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"modelscape {VERSION}\n"


def test_no_arguments_print_the_help_for_users(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: modelscape [-h] [--version] COMMAND")
    assert "modelscape run" in out and "show" in out and "export" in out
    assert "add_parser" not in out and "subparsers" not in out  # no developer notes


def test_python_dash_m_without_arguments_prints_the_help():
    out = subprocess.run(
        [sys.executable, "-m", "modelscape"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: modelscape"), out.stderr


def test_run_help_shows_its_own_options_and_the_demos_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: modelscape run [-h]")
    flat = " ".join(out.split())  # argparse wraps the help text
    assert "--out OUT" in out and "--detach" in out and "(default: runs/demo)" in flat
    # the demo's values, not the library's (WIDTH 8192, MAX_ITER 100000)
    assert "Width of every hidden layer. (default: 256)" in flat
    assert "optimizer steps per job. (default: 1500)" in flat


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--NUM_TRIALS", "2", "3"], "--NUM_TRIALS takes one value, so '3' is left over"),
        (["--OPTIMIZER_KWARGS", "{betas:1}"], "expected a JSON object such as"),
        (["--WIDHT", "3"], "unknown hyperparameter 'WIDHT'. Did you mean WIDTH?"),
        (["--LOSS", "CrossEntropy"], "Did you mean CrossEntropyLoss?"),
        (["--OPTIMIZER", "Adamm"], "Did you mean Adam?"),
    ],
)
def test_bad_flags_are_one_line_naming_the_fix(flags, message, capsys, tmp_path):
    argv = ["run", *flags, "--MAX_ITER", "1", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_:
        exit_code = main(argv)
        raise SystemExit(exit_code)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert "usage:" not in err and len(err.splitlines()) <= 2, err  # no 40-line usage block
    first = err.splitlines()[0]
    assert message in first
    if "LOSS" in flags:
        assert "Conv2d" not in err and "MSELoss" in err  # losses only, not every torch.nn layer


def test_a_changed_flag_names_the_difference_and_the_command_for_a_new_folder(tmp_path, capsys):
    small = ["--NUM_TRIALS", "1", "--MAX_ITER", "5", "--N_SAMPLES", "32", "--GAMMA", "1"]
    out = str(tmp_path / "demo")
    assert main(["run", *small, "--out", out]) == 0
    capsys.readouterr()
    assert main(["run", *small, "--WIDTH", "64", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "WIDTH: 256 in the run folder, 64 now" in err
    command = err.strip().splitlines()[-1].strip()
    expected = f"{out}-NUM_TRIALS1-MAX_ITER5-N_SAMPLES32-GAMMA1-WIDTH64"
    assert command == shlex.join(["modelscape", "run", *small, "--WIDTH", "64", "--out", expected])
    assert main(shlex.split(command)[1:]) == 0  # the printed command runs as given
    assert "jobs (1 ok)" in capsys.readouterr().out


def test_new_folder_hint_drops_the_folder_given():
    hint = new_folder_hint(["--WIDTH", "512", "--out", "runs/demo", "--LR", "0.1"], "runs/demo")
    assert hint.endswith("modelscape run --WIDTH 512 --LR 0.1 --out runs/demo-WIDTH512-LR0.1")
    assert issubclass(RunFolderMismatch, Exception)


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`modelscape show DIR | head -0`: the reader is gone before the first write."""
    small = ["--NUM_TRIALS", "1", "--MAX_ITER", "5", "--N_SAMPLES", "32", "--GAMMA", "1"]
    assert main(["run", *small, "--out", str(tmp_path)]) == 0
    for command in (["show", str(tmp_path)], ["run", "--help"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelscape", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) in (0, 141)  # 141 = 128 + SIGPIPE, as a shell reports
        assert err == "", err
