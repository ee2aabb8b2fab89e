"""Plot helpers: each writes a non-empty PNG, and draws what ``modelscape.analysis`` returns."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from matplotlib.collections import PathCollection
from sweeps import monomial_sweep

from modelscape import analysis
from modelscape.results import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_sweep(only_thresholds: bool, **overrides):
    axes = {"target": ["x0", "x0*x1"], "ntrain": [8, 32], "trial": range(2)}
    return monomial_sweep(axes, ONLYTHRESHOLDS=only_thresholds, **overrides)


@pytest.fixture(scope="module")
def result():
    return tiny_sweep(True)


@pytest.fixture(scope="module")
def curves():
    return tiny_sweep(False)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_learning_curve_draws_the_median_and_its_interval(result, tmp_path):
    ax = plotting.learning_curve(result, x="N_SAMPLES", y="test_loss", hue="target")
    expected = result.to_xarray()["test_loss"].median("trial")
    data_lines = [container.lines[0] for container in ax.containers]  # errorbar: line, caps, bars
    assert len(data_lines) == 2
    for line, target in zip(data_lines, ["x0", "x0*x1"]):
        np.testing.assert_allclose(line.get_ydata(), expected.sel(target=target).values)
        np.testing.assert_allclose(line.get_xdata(), [8, 32])
    assert "median over trial" in ax.get_legend().get_title().get_text()
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["8", "32"]
    assert_png(plotting.save(ax, tmp_path / "sub" / "lc.png"))


def test_a_band_on_a_log_axis_stays_above_zero(result):
    ds = result.to_xarray()
    ds["test_loss"] = ds["test_loss"] * xr.DataArray([1.0, 1e-4], dims="trial")  # wide spread
    ax = plotting.learning_curve(ds.sel(target="x0"), x="ntrain", stat="mean")
    (bars,) = ax.containers[0].lines[2]
    lows = [seg[0][1] for seg in bars.get_segments()]
    assert min(lows) > 0


def test_learning_curve_refuses_an_unplotted_axis(result):
    with pytest.raises(ValueError, match="target"):
        plotting.learning_curve(result, x="ntrain")
    ds = result.to_xarray().sel(target="x0")
    assert plotting.learning_curve(ds, x="ntrain").lines


def test_time_to_threshold_draws_the_censored_median(result, tmp_path):
    ax = plotting.time_to_threshold(result, "ntrain", threshold=0.5, hue="target")
    tt = analysis.time_to_threshold(result, 0.5)
    np.testing.assert_allclose(
        ax.containers[0].lines[0].get_ydata(), tt["median"].sel(target="x0").values
    )
    assert "Kaplan-Meier" in ax.get_legend().get_title().get_text()
    assert_png(plotting.save(ax, tmp_path / "tk.png"))
    with pytest.raises(KeyError, match="0.3"):
        plotting.time_to_threshold(result, "ntrain", threshold=0.3, hue="target")


def test_time_to_threshold_marks_the_points_where_fewer_than_half_reached(result):
    ds = result.to_xarray()
    never = (ds["threshold"] == 0.5) & (ds["target"] == "x0*x1") & (ds["ntrain"] == 8)
    ds["timekeys"] = ds["timekeys"].where(~never)
    ds["steps"] = ds["steps"].where(~never.any("threshold"), 40)  # both trials ran to MAX_ITER
    ax = plotting.time_to_threshold(ds, "ntrain", threshold=0.5, hue="target")
    (censored,) = [
        c for c in ax.collections if isinstance(c, PathCollection) and c.get_offsets().size
    ]
    np.testing.assert_allclose(censored.get_offsets(), [[8, 39]])  # at least step 39
    reached = analysis.time_to_threshold(ds, 0.5)["reached"].sel(target="x0*x1")
    fractions = ax.child_axes[0].lines[1].get_ydata()  # the strip below: fraction reached
    np.testing.assert_allclose(fractions, reached.values)
    assert fractions[0] == 0


def test_time_to_threshold_says_when_no_job_reached_it(result):
    ds = result.to_xarray()
    ds["timekeys"] = ds["timekeys"].where(ds["threshold"] != 0.5)  # NaN: never reached
    with pytest.raises(ValueError, match="no job reached threshold 0.5"):
        plotting.time_to_threshold(ds, "ntrain", threshold=0.5, hue="target")
    assert plotting.time_to_threshold(ds, "ntrain", threshold=0.9, hue="target").containers


def test_power_law_fit_draws_the_fit_and_its_band(result, tmp_path):
    ds = result.to_xarray()
    ax, fit = plotting.power_law_fit(ds, x="N_SAMPLES", hue="target")
    assert fit["exponent"].dims == ("target",)
    label = ax.get_legend().get_texts()[0].get_text()
    assert label.startswith("target=x0: exponent") and f"{float(fit.exponent[0]):.2f}" in label
    assert len(ax.collections) >= 2  # one band per target
    assert_png(plotting.save(ax, tmp_path / "fit.png"))


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


def test_loss_vs_step_ends_each_curve_at_its_exit_step(curves, tmp_path):
    ds = curves.to_xarray().sel(ntrain=32)
    ax = plotting.loss_vs_step(ds, y="train_loss", hue="target")
    jobs = [line for line in ax.lines if line.get_linewidth() < 1 and len(line.get_xdata()) > 1]
    exits = sorted(int(line.get_xdata()[-1]) for line in jobs)
    assert exits == sorted(int(s) - 1 for s in ds["steps"].values.ravel())
    assert_png(plotting.save(ax, tmp_path / "steps.png"))
    ax = plotting.loss_vs_step(ds, y="test_loss", hue="target")
    for line in ax.lines:
        steps = line.get_xdata()
        assert all(s % 10 == 0 for s in steps[:-1])  # evaluations, and the exit step
    with pytest.raises(ValueError, match="ONLYTHRESHOLDS=False"):
        plotting.loss_vs_step(tiny_sweep(True, MAX_ITER=2).to_xarray().sel(ntrain=8))


def test_loglog_fit_recovers_a_power_law(tmp_path):
    x = np.geomspace(1, 100, 7)
    ax, slope = plotting.loglog_fit(x, 3 * x**0.7, labels=[f"p{i}" for i in range(7)])
    assert slope == pytest.approx(0.7)
    assert_png(plotting.save(ax, tmp_path / "fit.png"))


def test_legends_name_the_jobs_that_did_not_finish(result):
    ds = result.to_xarray().sel(target="x0")
    first = (ds["ntrain"] == 8) & (ds["trial"] == 0)
    ds["status"] = xr.where(first, "failed", ds["status"])
    ds["test_loss"] = ds["test_loss"].where(~first)
    ax = plotting.learning_curve(ds, x="ntrain")
    assert "1 failed (failed and missing left out)" in ax.get_legend().get_title().get_text()
    ax = plotting.time_to_threshold(ds, "ntrain")
    assert "1 failed" in ax.get_legend().get_title().get_text()
