"""Plot helpers: each writes a non-empty PNG, and what it draws is the trial mean of the data."""

from __future__ import annotations

import numpy as np
import pytest

from modelscape import base_args, run_sweep
from modelscape.data import monomial_bfn
from modelscape.results import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_sweep(only_thresholds: bool, **overrides):
    settings = dict(
        WIDTH=16,
        DEPTH=1,
        LR=0.2,
        ONLINE=False,
        MAX_ITER=40,
        N_TEST=200,
        LOSS_CHECKPOINTS=[0.9, 0.5],
        ONLYTHRESHOLDS=only_thresholds,
        EVAL_EVERY=10,
        DEVICES=["cpu"],
    )
    args = base_args(**{**settings, **overrides})
    return run_sweep(
        [["x0", "x0*x1"], [8, 32], range(2)],
        ["target", "ntrain", "trial"],
        args,
        {"base_bfn": monomial_bfn, "d": 4, "alpha": 1.0},
        progress=False,
    )


@pytest.fixture(scope="module")
def result():
    return tiny_sweep(True)


@pytest.fixture(scope="module")
def curves():
    return tiny_sweep(False)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_learning_curve_draws_trial_means(result, tmp_path):
    ax = plotting.learning_curve(result, x="N_SAMPLES", y="test_loss", hue="target")
    expected = result.to_xarray()["test_loss"].mean("trial")
    data_lines = [container.lines[0] for container in ax.containers]  # errorbar: line, caps, bars
    assert len(data_lines) == 2
    for line, target in zip(data_lines, ["x0", "x0*x1"]):
        np.testing.assert_allclose(line.get_ydata(), expected.sel(target=target).values)
        np.testing.assert_allclose(line.get_xdata(), [8, 32])
    assert_png(plotting.save(ax, tmp_path / "sub" / "lc.png"))


def test_learning_curve_refuses_an_unplotted_axis(result):
    with pytest.raises(ValueError, match="target"):
        plotting.learning_curve(result, x="ntrain")
    ds = result.to_xarray().sel(target="x0")
    assert plotting.learning_curve(ds, x="ntrain").lines


def test_time_to_threshold(result, tmp_path):
    ax = plotting.time_to_threshold(result, "ntrain", threshold=0.5, hue="target")
    tk = result.to_xarray()["timekeys"].sel(threshold=0.5).mean("trial")
    np.testing.assert_allclose(ax.containers[0].lines[0].get_ydata(), tk.sel(target="x0").values)
    assert_png(plotting.save(ax, tmp_path / "tk.png"))
    with pytest.raises(KeyError, match="0.3"):
        plotting.time_to_threshold(result, "ntrain", threshold=0.3, hue="target")


def test_time_to_threshold_says_when_no_job_reached_it(result):
    ds = result.to_xarray()
    ds["timekeys"] = ds["timekeys"].where(ds["threshold"] != 0.5)  # NaN: never reached
    with pytest.raises(ValueError, match="no job reached threshold 0.5"):
        plotting.time_to_threshold(ds, "ntrain", threshold=0.5, hue="target")
    assert plotting.time_to_threshold(ds, "ntrain", threshold=0.9, hue="target").containers


def test_the_averaged_trial_axis_is_refused_as_x_or_hue(result, curves):
    ds = result.to_xarray().sel(target="x0")
    averaged = "trials are averaged for error bars; choose another axis"
    with pytest.raises(ValueError, match=averaged):
        plotting.learning_curve(ds, x="ntrain", hue="trial")
    with pytest.raises(ValueError, match=averaged):
        plotting.learning_curve(ds.sel(ntrain=8), x="trial")
    with pytest.raises(ValueError, match=averaged):
        plotting.time_to_threshold(ds, "ntrain", hue="trial")
    with pytest.raises(ValueError, match=averaged):
        plotting.loss_vs_step(curves.to_xarray().sel(target="x0", ntrain=8), hue="trial")


def test_loss_vs_step(curves, tmp_path):
    ds = curves.to_xarray().sel(ntrain=32)
    ax = plotting.loss_vs_step(ds, y="train_loss", hue="target")
    assert len(ax.lines) == 2 and len(ax.lines[0].get_ydata()) == 40
    np.testing.assert_allclose(
        ax.lines[1].get_ydata(), ds["train_loss"].sel(target="x0*x1").mean("trial").values
    )
    assert_png(plotting.save(ax, tmp_path / "steps.png"))
    with pytest.raises(ValueError, match="ONLYTHRESHOLDS=False"):
        plotting.loss_vs_step(tiny_sweep(True, MAX_ITER=2).to_xarray().sel(ntrain=8))


def test_loglog_fit_recovers_a_power_law(tmp_path):
    x = np.geomspace(1, 100, 7)
    ax, slope = plotting.loglog_fit(x, 3 * x**0.7, labels=[f"p{i}" for i in range(7)])
    assert slope == pytest.approx(0.7)
    assert_png(plotting.save(ax, tmp_path / "fit.png"))
