"""Bad input fails before training with a message that names the value and the fix.

Equal keys, inert or dropped settings, grabs that misbehave, targets that do not fit the loss,
user code that exits, config files that do not parse. Every message is checked for the value
or file it is about and for the fix it names.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from modelscape import HParamError, SweepError, load, run_sweep
from modelscape.cli.args import base_args, parse_args

REPO = Path(__file__).resolve().parents[2]


def config(**overrides):
    hp = dict(WIDTH=16, MAX_ITER=40, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[1e-9], BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def regression_bfn(seen=None, fail_at=None):
    """x0 * x1 on 5 Gaussian inputs. ``seen`` collects the steps drawn; ``fail_at`` maps a
    trial to (step, exception) raised at that step of that trial's training."""

    def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
        def batch_fn(step):
            if seen is not None:
                seen.append(step)
            if fail_at and trial in fail_at and step == fail_at[trial][0]:
                raise fail_at[trial][1]
            Xb = torch.randn(bsz, 5, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]

        return batch_fn

    return bfn


def sweep(cfg, trials=(0, 1, 2), bfn=None, grabs=None, **kwargs):
    return run_sweep(
        [list(trials)],
        ["trial"],
        {**cfg, "otherreturns": grabs or {}},
        {"base_bfn": bfn or regression_bfn()},
        progress=False,
        **kwargs,
    )


def modelscape_cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "modelscape", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


# --- keys ---


@pytest.mark.parametrize(
    "values, shown",
    [
        ([1, 1.0], "1 and 1.0"),
        ([0, False], "0 and False"),
        ([np.float64(2.0), 2], "np.float64(2.0) and 2"),
    ],
)
def test_axis_values_that_compare_equal_are_refused_before_training(values, shown):
    seen = []
    with pytest.raises(SweepError) as err:
        run_sweep([values], ["trial"], config(), {"base_bfn": regression_bfn(seen)})
    text = str(err.value)
    assert "'trial'" in text and shown in text and "compare equal" in text
    assert "Keep one of them" in text
    assert seen == []  # refused before the batch function was called at all


def test_duplicate_values_given_on_the_command_line_or_as_a_list_are_refused(tmp_path):
    with pytest.raises(SweepError, match="'GAMMA' lists 0.1 twice.*give each value once"):
        sweep(config(GAMMA=[0.1, 0.1]))
    done = modelscape_cli("run", "--GAMMA", "0.1", "0.1", "--out", str(tmp_path / "demo"))
    assert done.returncode == 2, done.stderr
    assert "'GAMMA' lists 0.1 twice" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "demo").exists()


def test_a_misspelled_axis_name_is_never_silent():
    """``GAMA`` (a near miss of GAMMA) either maps to GAMMA or is refused, but never sweeps
    nothing without a word."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = run_sweep(
                [[1.0, 0.5]], ["GAMA"], config(MAX_ITER=5), {"base_bfn": regression_bfn()},
                progress=False,
            )  # fmt: skip
        except (SweepError, HParamError) as err:
            assert "GAMA" in str(err) and "GAMMA" in str(err)
            return
    said = [str(w.message) for w in caught if "GAMA" in str(w.message)]
    losses = {r.key: r.test_loss for r in result.records}
    # mapped onto GAMMA (the two jobs then differ), or warned about with the fix
    assert losses[(1.0,)] != losses[(0.5,)] or any("GAMMA" in s for s in said), said


def test_a_config_value_replaced_by_an_axis_is_reported():
    with pytest.warns(UserWarning, match=r"GAMMA=5.0 in the config is not used.*iterator 'GAMMA'"):
        run_sweep(
            [[1.0, 0.5]], ["GAMMA"], config(GAMMA=5.0, MAX_ITER=3), {"base_bfn": regression_bfn()},
            progress=False,
        )  # fmt: skip


# --- settings ---


def test_save_dir_empty_string_is_refused_with_the_fix():
    for value in ("", "  "):
        with pytest.raises(HParamError) as err:
            sweep(config(SAVE_DIR=value))
        text = str(err.value)
        assert "SAVE_DIR=" in text and "current one" in text and "None" in text


@pytest.mark.parametrize(
    "name, value, fix",
    [("MAX_RETRIES", -1, "0: no retry"), ("JOB_TIMEOUT", -2.0, "0: off")],
)
def test_reliability_settings_are_validated(name, value, fix):
    with pytest.raises(HParamError) as err:
        sweep(config(**{name: value}))
    assert name in str(err.value) and str(value) in str(err.value) and fix in str(err.value)


def test_reliability_settings_have_their_documented_defaults_and_flags():
    args = base_args()
    assert (args.MAX_RETRIES, args.JOB_TIMEOUT, args.RESUME_CHANGED_CODE) == (1, 0.0, False)
    flags = ["--MAX_RETRIES", "3", "--JOB_TIMEOUT", "30", "--RESUME_CHANGED_CODE", "True"]
    args = parse_args(flags)
    assert (args.MAX_RETRIES, args.JOB_TIMEOUT, args.RESUME_CHANGED_CODE) == (3, 30.0, True)


def test_cli_flags_the_demo_sets_itself_are_applied_not_dropped(tmp_path):
    out = tmp_path / "demo"
    flags = ["--GAMMA", "5", "--N_SAMPLES", "7", "--NUM_TRIALS", "1", "--WIDTH", "8",
             "--MAX_ITER", "5", "--N_TEST", "50", "--out", str(out)]  # fmt: skip
    done = modelscape_cli("run", *flags)
    assert done.returncode == 0, done.stderr
    result = load(out)
    assert result.axes == ["ntrain", "trial", "GAMMA"]
    assert result.axis_values == [[7], [0], [5.0]]
    assert [r.status for r in result.records] == ["ok"]
    assert "not used" not in done.stderr  # the demo applied them: nothing to warn about


def test_a_demo_flag_that_cannot_apply_is_refused_with_the_reason(tmp_path):
    done = modelscape_cli("run", "--ONLYTHRESHOLDS", "False", "--out", str(tmp_path / "d"))
    assert done.returncode == 2
    assert "ONLYTHRESHOLDS=True" in done.stderr and "drop --ONLYTHRESHOLDS False" in done.stderr


# --- config files ---


def test_a_yaml_config_with_tabs_names_the_file_line_and_fix(tmp_path):
    bad = tmp_path / "hp.yaml"
    bad.write_text("WIDTH: 16\nLOSS_CHECKPOINTS:\n\t- 0.1\n")
    with pytest.raises(HParamError) as err:
        parse_args(["--config", str(bad)])
    text = str(err.value)
    assert str(bad) in text and "line 3" in text and "indent with spaces" in text
    done = modelscape_cli("run", "--config", str(bad), "--out", str(tmp_path / "d"))
    assert done.returncode == 2 and str(bad) in done.stderr and "Traceback" not in done.stderr


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    done = modelscape_cli("run", "--config", str(missing), "--out", str(tmp_path / "d"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--config file {missing} does not exist" in done.stderr
    broken = tmp_path / "hp.json"
    broken.write_text('{"WIDTH": 16,}')
    with pytest.raises(HParamError) as err:
        parse_args(["--config", str(broken)])
    assert str(broken) in str(err.value) and "line 1" in str(err.value)
    assert "trailing commas" in str(err.value)


# --- grabs ---


def test_a_grab_that_raises_fails_before_training():
    seen = []

    def broken(model, **kw):
        raise ValueError("norm of what?")

    with pytest.raises(SweepError) as err:
        sweep(config(MAX_ITER=10_000), bfn=regression_bfn(seen), grabs={"broken": broken})
    text = str(err.value)
    assert "grab 'broken'" in text and "ValueError: norm of what?" in text
    assert "before training" in text
    assert max(seen) <= 0  # only the preflight's draws, no training step


@pytest.mark.parametrize("value, kind", [(None, "NoneType"), ("0.5", "str")])
def test_a_grab_returning_a_non_number_fails_before_training(value, kind):
    seen = []
    with pytest.raises(SweepError) as err:
        sweep(config(MAX_ITER=10_000), bfn=regression_bfn(seen), grabs={"odd": lambda **kw: value})
    text = str(err.value)
    assert "grab 'odd'" in text and kind in text and "numbers or arrays" in text
    assert max(seen) <= 0


def test_a_ragged_grab_fails_its_job_at_the_first_call_and_the_folder_stays_readable(tmp_path):
    run = tmp_path / "run"

    def ragged(trial, **kw):
        return np.arange(3 if trial == 1 else 2, dtype=float)

    result = sweep(config(SAVE_DIR=str(run)), grabs={"ragged": ragged})
    status = {r.key: r.status for r in result.records}
    assert status == {(0,): "ok", (1,): "failed", (2,): "ok"}
    error = result.record(1).error
    assert "grab 'ragged' returned shape (3,)" in error and "(2,)" in error
    assert "pad to a fixed size" in error
    loaded = load(run)
    np.testing.assert_array_equal(loaded.record(0).grabs["ragged"], [0.0, 1.0])
    assert loaded.to_xarray()["ragged"].shape == (3, 2)
    shown = modelscape_cli("show", str(run))
    assert shown.returncode == 0, shown.stderr


# --- targets that do not fit the loss ---


def classes_bfn(kind):
    def bfn(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            Xb = torch.randn(bsz, 4, generator=gen)
            logits = Xb[:, :3]
            if kind == "raw_float":
                return Xb, logits  # scores, not probabilities
            if kind == "probabilities":
                return Xb, torch.softmax(logits, dim=1)
            return Xb, logits.argmax(dim=1)  # integer labels

        return batch_fn

    return bfn


def test_cross_entropy_with_float_targets_that_are_not_probabilities_is_refused():
    cfg = config(LOSS="CrossEntropyLoss", MAX_ITER=5)
    with pytest.raises(SweepError) as err:
        sweep(cfg, bfn=classes_bfn("raw_float"))
    text = str(err.value)
    assert "LOSS=CrossEntropyLoss" in text and "probabilities" in text
    assert "is negative" in text or "sums to" in text
    assert "y.long()" in text and "MSELoss" in text
    # rows that are probabilities train, with a non-negative loss
    ok = sweep(cfg, bfn=classes_bfn("probabilities"))
    assert all(r.status == "ok" and r.test_loss > 0 for r in ok.records)


def test_integer_labels_under_mse_with_one_output_are_refused():
    cfg = {**config(MAX_ITER=5), "D_OUT": 1}
    with pytest.raises(SweepError) as err:
        sweep(cfg, bfn=classes_bfn("labels"))
    text = str(err.value)
    assert "integer class labels" in text and "LOSS=MSELoss" in text and "D_OUT=1" in text
    assert "y.float()" in text and "CrossEntropyLoss" in text
    fixed = {**config(MAX_ITER=5, LOSS="CrossEntropyLoss"), "D_OUT": 3}
    assert all(r.status == "ok" for r in sweep(fixed, bfn=classes_bfn("labels")).records)


# --- failures inside a job ---


@pytest.mark.parametrize("batched", ["off", "auto"])
def test_a_failed_record_has_the_step_it_failed_at(batched):
    bfn = regression_bfn(fail_at={1: (7, RuntimeError("bad batch"))})
    result = sweep(config(BATCHED=batched), bfn=bfn)
    failed = result.record(1)
    assert failed.status == "failed" and "bad batch" in failed.error
    assert failed.steps == 7  # steps 0..6 trained, step 7 raised
    assert "at step 7" in failed.error
    if batched == "off":
        assert [result.record(t).steps for t in (0, 2)] == [40, 40]
    else:  # a stack that fails fails all its jobs (the engine never reruns them one by one)
        assert {(r.status, r.steps) for r in result.records} == {("failed", 7)}


@pytest.mark.parametrize("use_mp", [False, True])
def test_system_exit_and_keyboard_interrupt_in_user_code_fail_only_their_job(use_mp):
    bfn = regression_bfn(fail_at={1: (3, SystemExit(3)), 2: (4, KeyboardInterrupt())})
    result = sweep(config(), trials=(0, 1, 2, 3), bfn=bfn, use_mp=use_mp)
    status = {r.key[0]: r.status for r in result.records}
    assert status == {0: "ok", 1: "failed", 2: "failed", 3: "ok"}
    exited, interrupted = result.record(1).error, result.record(2).error
    assert "SystemExit" in exited and "your code" in exited and "at step 3" in exited
    assert "KeyboardInterrupt" in interrupted and "at step 4" in interrupted
