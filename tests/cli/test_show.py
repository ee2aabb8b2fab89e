"""``modelscape show | plot | export`` on a real run folder written by a sweep."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sweeps import monomial_sweep

from modelscape.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "monomials"
    axes = {"target": ["x0", "x0^2"], "ntrain": [8, 32], "GAMMA": [1.0, 0.5], "trial": range(2)}
    return folder, monomial_sweep(axes, str(folder), MAX_ITER=30)


def test_show_counts_jobs_and_lists_axes(run_dir, capsys):
    folder, result = run_dir
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "jobs: 16 total, 16 done (16 ok, 0 diverged, 0 failed), 0 missing" in out
    assert "target (2): x0, x0^2" in out and "GAMMA (2): 1.0, 0.5" in out
    assert "thresholds: 0.9, 0.5" in out
    first = result.records[0]
    assert f"{first.test_loss:.4g}" in out  # the summary table


def test_show_reports_missing_jobs_of_a_partial_run(run_dir, tmp_path, capsys):
    _, result = run_dir
    partial = type(result)(result.axes, result.axis_values, result.records[:5])
    path = tmp_path / "partial.pkl"
    path.write_bytes(pickle.dumps(partial))
    assert main(["show", str(path)]) == 0
    assert "16 total, 5 done (5 ok, 0 diverged, 0 failed), 11 missing" in capsys.readouterr().out


def test_plot_writes_png(run_dir, tmp_path):
    folder, _ = run_dir
    out = tmp_path / "fig.png"
    argv = ["plot", str(folder), "--x", "N_SAMPLES", "--y", "test_loss", "--hue", "GAMMA"]
    assert main(argv + ["--sel", "target=x0^2", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
    out2 = tmp_path / "tk.png"
    argv = ["plot", str(folder), "--x", "ntrain", "--y", "timekeys", "--threshold", "0.9"]
    assert main(argv + ["--sel", "target=x0", "--sel", "GAMMA=1", "-o", str(out2)]) == 0
    assert out2.read_bytes().startswith(PNG_MAGIC)


def plot_error(argv, capsys):
    """What ``modelscape plot`` prints for bad input; it exits 2 without a traceback."""
    assert main(["plot", *argv]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not captured.out
    return captured.err


def test_plot_names_the_axis_to_select(run_dir, tmp_path, capsys):
    folder, _ = run_dir
    out = tmp_path / "x.png"
    err = plot_error([str(folder), "--x", "ntrain", "--hue", "target", "-o", str(out)], capsys)
    assert err.startswith("modelscape plot: ") and "GAMMA" in err
    err = plot_error([str(folder), "--x", "ntrain", "--sel", "GAMMA=7", "-o", str(out)], capsys)
    assert "GAMMA has values 1.0, 0.5" in err
    assert not out.exists()


@pytest.mark.parametrize("axis", ["--hue", "--x"])
def test_plot_refuses_the_averaged_trial_axis(run_dir, tmp_path, capsys, axis):
    folder, _ = run_dir
    argv = [str(folder), "--x", "ntrain", "--sel", "target=x0", "--sel", "GAMMA=1"]
    argv = argv + ([axis, "trial"] if axis == "--hue" else ["--x", "trial", "--sel", "ntrain=8"])
    err = plot_error(argv + ["-o", str(tmp_path / "x.png")], capsys)
    assert "trials are averaged for error bars; choose another axis" in err


def test_plot_timekeys_says_when_no_job_reached_the_threshold(run_dir, tmp_path, capsys):
    _, result = run_dir
    never = [
        dataclasses.replace(r, timekeys=np.full_like(r.timekeys, np.nan)) for r in result.records
    ]
    path = tmp_path / "never.pkl"
    path.write_bytes(pickle.dumps(type(result)(result.axes, result.axis_values, never)))
    argv = [str(path), "--x", "ntrain", "--y", "timekeys", "--sel", "target=x0", "--sel", "GAMMA=1"]
    err = plot_error(argv + ["--threshold", "0.5", "-o", str(tmp_path / "tk.png")], capsys)
    assert "no job reached threshold 0.5" in err


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_table(run_dir, tmp_path, fmt):
    folder, result = run_dir
    out = tmp_path / f"results.{fmt}"
    assert main(["export", str(folder), "--format", fmt, "-o", str(out)]) == 0
    df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    assert len(df) == 16
    assert set(df["target"]) == {"x0", "x0^2"}
    np.testing.assert_allclose(df["test_loss"], [r.test_loss for r in result.records])
    assert "timekey_0.9" in df.columns


def test_export_netcdf_next_to_the_run(run_dir):
    folder, result = run_dir
    assert main(["export", str(folder), "--format", "netcdf"]) == 0
    with xr.open_dataset(folder / "results.nc") as ds:
        assert dict(ds.sizes) == {"target": 2, "ntrain": 2, "GAMMA": 2, "trial": 2, "threshold": 2}
        expected = result.to_xarray()["test_loss"]
        np.testing.assert_allclose(ds["test_loss"].values, expected.values)


def test_the_modelscape_command_runs_show(run_dir):
    folder, _ = run_dir
    proc = subprocess.run(
        [sys.executable, "-m", "modelscape", "show", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "16 done" in proc.stdout


def test_fit_prints_one_row_per_hue_value(run_dir, capsys):
    folder, result = run_dir
    argv = ["fit", str(folder), "--x", "N_SAMPLES", "--y", "test_loss", "--hue", "GAMMA"]
    assert main(argv + ["--sel", "target=x0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test_loss = prefactor * ntrain^exponent")
    assert "bootstrap percentile interval" in out[1]
    header, rows = out[2].split(), out[3:5]
    assert header[:3] == ["GAMMA", "exponent", "95%"]
    from modelscape.analysis import fit_power_law

    fit = fit_power_law(result.to_xarray().sel(target="x0"), "ntrain", "test_loss", hue="GAMMA")
    for row, gamma in zip(rows, [1.0, 0.5]):
        cells = row.split()
        assert float(cells[0]) == gamma
        assert float(cells[1]) == pytest.approx(float(fit.exponent.sel(GAMMA=gamma)), abs=1e-3)
    # two trials: no interval, and the table says why
    assert "[nan, nan]" in rows[0] and "fewer than 3 trials" in out[-1]


def test_fit_without_a_hue_prints_one_row(run_dir, capsys):
    """The issue's own example, ``modelscape fit SAVE_DIR --x N_SAMPLES --y test_loss``: one
    exponent over every remaining value (its bootstrap draws are not a hue axis)."""
    folder, result = run_dir
    argv = ["fit", str(folder), "--x", "N_SAMPLES", "--y", "test_loss"]
    assert main(argv + ["--sel", "target=x0", "--sel", "GAMMA=1.0"]) == 0
    out = capsys.readouterr().out.splitlines()
    header, row = out[2].split(), out[3].split()
    assert header[0] == "exponent"
    from modelscape.analysis import fit_power_law

    fit = fit_power_law(result.to_xarray().sel(target="x0", GAMMA=1.0), "ntrain", "test_loss")
    assert float(row[0]) == pytest.approx(float(fit.exponent), abs=1e-3)


def test_fit_names_the_axis_to_select(run_dir, capsys):
    folder, _ = run_dir
    assert main(["fit", str(folder), "--x", "N_SAMPLES"]) == 2
    assert "target" in capsys.readouterr().err


@pytest.fixture(scope="module")
def curves_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "curves"
    axes = {"target": ["x0", "x0^2"], "ntrain": [8, 32], "trial": range(2)}
    settings = dict(MAX_ITER=30, N_TEST=100, LOSS_CHECKPOINTS=[0.5], ONLYTHRESHOLDS=False)
    return folder, monomial_sweep(axes, str(folder), **settings)


def test_export_tensorboard_round_trips_through_tensorboards_reader(curves_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder, result = curves_dir
    out = tmp_path / "tb"
    assert main(["export", str(folder), "--format", "tensorboard", "-o", str(out)]) == 0
    runs = {p.name.rsplit("--", 1)[0]: p for p in out.iterdir()}  # values--digest
    assert len(runs) == 8 and "target=x0^2,ntrain=32,trial=1" in runs
    for record in result.records:
        values = dict(zip(result.axes, record.key))
        name = ",".join(f"{a}={v}" for a, v in values.items())
        events = EventAccumulator(str(runs[name]))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["target"].string_value == values["target"]
        assert hparams["ntrain"].number_value == values["ntrain"]
        assert hparams["status"].string_value == record.status
        final = events.Scalars("final/test_loss")
        assert final[0].value == pytest.approx(record.test_loss, rel=1e-6)
        train = events.Scalars("train_loss")
        assert [e.step for e in train] == list(range(record.steps))  # never the padding
        np.testing.assert_allclose(
            [e.value for e in train], record.curves["train_loss"][: record.steps], rtol=1e-6
        )
        last = record.steps - 1
        evaluated = sorted(set(range(0, last + 1, 10)) | {last})
        assert [e.step for e in events.Scalars("test_loss")] == evaluated


def test_tensorboard_runs_of_values_that_print_alike_stay_apart(tmp_path):
    """0.1 and 0.10000001 are two jobs; their runs are two folders, not one merged run."""
    from modelscape.analysis import export_tensorboard

    axes = {"target": ["x0"], "LR": [0.1, 0.10000001], "trial": [0]}
    runs = export_tensorboard(monomial_sweep(axes, MAX_ITER=3), tmp_path / "tb")
    names = sorted(r.name.rsplit("--", 1)[0] for r in runs)
    assert names == ["target=x0,LR=0.1,trial=0", "target=x0,LR=0.10000001,trial=0"]
