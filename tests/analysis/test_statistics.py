"""``modelscape.analysis`` against synthetic sweeps with known answers, and on a real sweep.

The synthetic Datasets have the shape of ``Result.to_xarray()``: one dimension per axis, with
``timekeys`` (a ``threshold`` dimension), ``status`` and ``steps`` per job.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from sweeps import monomial_sweep

from modelscape import analysis

SIZES = np.array([16.0, 32, 64, 128, 256, 512])


def power_law_sweeps(reps: int, trials: int, exponents, sigma=0.5, seed=1) -> xr.Dataset:
    """``reps`` independent sweeps (a ``rep`` axis) of ``y = 3 N^exponent`` times lognormal
    noise, one per exponent of ``exponents`` (a ``GAMMA`` axis)."""
    rng = np.random.default_rng(seed)
    a = np.asarray(exponents, dtype=float)
    noise = np.exp(sigma * rng.standard_normal((reps, len(a), len(SIZES), trials)))
    y = 3 * SIZES[None, None, :, None] ** a[None, :, None, None] * noise
    dims = ("rep", "GAMMA", "ntrain", "trial")
    coords = {"rep": np.arange(reps), "GAMMA": a, "ntrain": SIZES, "trial": np.arange(trials)}
    return xr.Dataset({"test_loss": (dims, y)}, coords=coords)


@pytest.mark.parametrize(
    "trials, lowest, highest",
    # a percentile bootstrap of 4 trials under-states the spread (each x resamples 4 values):
    # its 95% interval covers about 87%; with 16 trials it is close to nominal
    [(4, 0.82, 0.93), (16, 0.91, 0.98)],
)
def test_exponent_interval_covers_the_true_exponent_at_about_its_nominal_rate(
    trials, lowest, highest
):
    reps = 300
    ds = power_law_sweeps(reps, trials, [-0.5]).isel(GAMMA=0)
    fit = analysis.fit_power_law(ds, x="N_SAMPLES", y="test_loss", hue="rep", ci=0.95)
    covered = (fit["exponent_low"] <= -0.5) & (fit["exponent_high"] >= -0.5)
    rate = float(covered.mean())
    assert lowest <= rate <= highest, rate  # binomial s.e. of the rate over 300 sweeps: 0.013
    assert float(fit["exponent"].mean()) == pytest.approx(-0.5, abs=0.01)  # unbiased
    width = fit["exponent_high"] - fit["exponent_low"]
    assert 0.1 < float(width.median()) < 0.6


def test_a_hue_axis_gives_one_exponent_per_value():
    ds = power_law_sweeps(1, 8, [-0.25, -0.5, -1.0], sigma=0.05).isel(rep=0)
    fit = analysis.fit_power_law(ds, x="ntrain", y="test_loss", hue="GAMMA")
    assert fit["exponent"].dims == ("GAMMA",)
    np.testing.assert_allclose(fit["exponent"], [-0.25, -0.5, -1.0], atol=0.02)
    np.testing.assert_allclose(fit["prefactor"], 3, rtol=0.1)
    assert (fit["exponent_low"] < fit["exponent"]).all()
    assert (fit["exponent"] < fit["exponent_high"]).all()
    assert (fit["x_min"] == 16).all() and (fit["x_max"] == 512).all()
    with pytest.raises(ValueError, match="GAMMA"):  # another axis with several values
        analysis.fit_power_law(ds, x="ntrain", y="test_loss")


def test_the_bootstrap_is_seeded_and_needs_three_trials():
    ds = power_law_sweeps(1, 3, [-0.5]).isel(rep=0, GAMMA=0)
    first = analysis.fit_power_law(ds, x="ntrain", y="test_loss")
    again = analysis.fit_power_law(ds, x="ntrain", y="test_loss")
    other = analysis.fit_power_law(ds, x="ntrain", y="test_loss", seed=1)
    assert float(first["exponent_low"]) == float(again["exponent_low"])
    assert float(first["exponent_low"]) != float(other["exponent_low"])
    two = analysis.fit_power_law(ds.isel(trial=[0, 1]), x="ntrain", y="test_loss")
    assert np.isfinite(two["exponent"]) and np.isnan(two["exponent_low"])
    assert np.isnan(two["exponent_high"]) and "fewer than 3 trials" in two.attrs["note"]
    s = analysis.summarize(ds.isel(trial=[0, 1]), "test_loss")
    assert np.isfinite(s["center"]).all() and s["low"].isnull().all()


def censored_sweep(medians, trials, stop, seed=0) -> xr.Dataset:
    """Exponential times to threshold with the given medians (an ``ntrain`` axis), in whole
    steps; a job that has not reached the threshold by step ``stop`` stops there (censored)."""
    rng = np.random.default_rng(seed)
    scale = np.asarray(medians, dtype=float) / np.log(2)
    t = np.floor(rng.exponential(scale[:, None], (len(medians), trials)))
    reached = t <= stop
    dims = ("ntrain", "trial")
    return xr.Dataset(
        {
            "timekeys": (dims + ("threshold",), np.where(reached, t, np.nan)[..., None]),
            "status": (dims, np.full(t.shape, "ok", dtype=object)),
            "steps": (dims, np.where(reached, t, stop) + 1),
        },
        coords={"ntrain": np.arange(len(medians)), "trial": np.arange(trials), "threshold": [0.1]},
    )


def test_the_censored_median_recovers_the_median_where_survivors_alone_are_biased():
    medians = np.array([200.0, 400.0, 800.0])
    stop = 1200  # about 35% of the slowest point's jobs never reach the threshold
    ds = censored_sweep(medians, 2000, stop)  # the median's s.e.: about 3%
    tt = analysis.time_to_threshold(ds, 0.1, n_boot=200)
    assert float(tt["reached"].min()) < 0.7
    np.testing.assert_allclose(tt["median"], medians, rtol=0.1)  # about 3 s.e.
    assert (tt["low"] < medians).all() and (medians < tt["high"]).all()
    survivors = ds["timekeys"].sel(threshold=0.1).median("trial")  # the jobs that reached it
    assert float(survivors[-1] / medians[-1]) < 0.8  # biased low, more so when fewer reached
    assert float(tt["mean_reached"][-1]) < 0.6 * medians[-1] / np.log(2)  # vs the true mean
    assert (tt["censored_at"] == stop).all() and not tt["median_censored"].any()


def test_where_fewer_than_half_reached_the_median_is_at_least_the_stop():
    ds = censored_sweep([5000.0], 50, stop=1000)
    tt = analysis.time_to_threshold(ds, 0.1).isel(ntrain=0)
    assert float(tt["reached"]) < 0.5
    assert np.isnan(tt["median"]) and bool(tt["median_censored"])
    assert float(tt["censored_at"]) == 1000 and np.isnan(tt["high"])


def test_diverged_jobs_never_reach_and_failed_or_missing_jobs_are_counted_out():
    # 6 trials: reached at 10 and 20, two diverged at steps 5 and 6 before reaching it,
    # one failed and one missing
    times = [10.0, 20.0, np.nan, np.nan, np.nan, np.nan]
    status = ["ok", "ok", "diverged", "diverged", "failed", "missing"]
    ds = xr.Dataset(
        {
            "timekeys": (("trial", "threshold"), np.array(times)[:, None]),
            "status": ("trial", np.array(status, dtype=object)),
            "steps": ("trial", [11, 21, 6, 7, 0, 0]),
        },
        coords={"trial": np.arange(6), "threshold": [0.5]},
    )
    tt = analysis.time_to_threshold(ds, 0.5)
    # at infinity, the diverged jobs stay at risk: S(10) = 3/4, S(20) = 1/2. Censored at their
    # stops they would leave the risk set first and make the median 10.
    assert float(tt["median"]) == 20
    assert float(tt["reached"]) == 0.5  # 2 of the 4 counted jobs
    assert (int(tt["n_ok"]), int(tt["n_diverged"])) == (2, 2)
    assert (int(tt["n_failed"]), int(tt["n_missing"])) == (1, 1)
    assert np.isnan(tt["censored_at"])  # no job was censored


def test_summarize_statistics():
    rng = np.random.default_rng(3)
    y = np.exp(rng.normal(0, 2, (2, 9)))  # spread over orders of magnitude
    ds = xr.Dataset({"test_loss": (("ntrain", "trial"), y)}, coords={"ntrain": [8, 16]})
    med = analysis.summarize(ds, "test_loss")
    np.testing.assert_allclose(med["center"], np.median(y, 1))
    assert (med["low"] <= med["center"]).all() and (med["center"] <= med["high"]).all()
    assert "bootstrap" in med.attrs["label"]
    gm = analysis.summarize(ds, "test_loss", stat="gmean")
    np.testing.assert_allclose(gm["center"], np.exp(np.log(y).mean(1)))
    assert (gm["low"] > 0).all()  # an interval in log space
    mean = analysis.summarize(ds, "test_loss", stat="mean")
    se = y.std(1, ddof=1) / 3
    np.testing.assert_allclose(mean["high"] - mean["center"], se)
    with pytest.raises(ValueError, match="median, gmean, mean"):
        analysis.summarize(ds, "test_loss", stat="average")


def test_a_diverged_job_counts_as_infinite_in_the_median():
    y = np.array([[1.0, 2.0, 3.0, np.nan, np.nan]])
    status = np.array([["ok", "ok", "ok", "diverged", "failed"]], dtype=object)
    ds = xr.Dataset(
        {"test_loss": (("ntrain", "trial"), y), "status": (("ntrain", "trial"), status)},
        coords={"ntrain": [8]},
    )
    s = analysis.summarize(ds, "test_loss").isel(ntrain=0)
    assert float(s["center"]) == 2.5 and int(s["n"]) == 4  # median of 1, 2, 3, inf


def test_a_diverged_jobs_curve_counts_as_infinite_only_from_its_divergence_on():
    """Before it diverged a job's curve is a measurement like any other: the median at the
    early steps is that of all three jobs' values, not pulled up by a later divergence."""
    nan = np.nan
    curve = np.array([[1.0] * 5, [3.0] * 5, [2.0, 2.0, nan, nan, nan]])  # trial x step
    ds = xr.Dataset(
        {
            "test_loss": (("trial", "step"), curve),
            "status": ("trial", np.array(["ok", "ok", "diverged"], dtype=object)),
            "steps": ("trial", [5, 5, 3]),  # the third diverged at step 2
        },
        coords={"step": range(5)},
    )
    center = analysis.summarize(ds, "test_loss")["center"].values
    np.testing.assert_array_equal(center, [2.0, 2.0, 3.0, 3.0, 3.0])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("runs") / "curves"
    axes = {"target": ["x0", "x0*x1"], "ntrain": [8, 32], "trial": range(3)}
    return folder, monomial_sweep(axes, str(folder), ONLYTHRESHOLDS=False)


def test_a_result_its_run_folder_and_its_dataset_give_the_same_analysis(sweep):
    folder, result = sweep
    from_result = analysis.time_to_threshold(result, 0.5)
    xr.testing.assert_identical(from_result, analysis.time_to_threshold(folder, 0.5))
    xr.testing.assert_identical(from_result, analysis.time_to_threshold(result.to_xarray(), 0.5))
    ds = result.to_xarray()
    tk = ds["timekeys"].sel(threshold=0.5)
    assert (tk.notnull() | (ds["steps"] == 40)).all()  # the unreached ran to MAX_ITER
    both = analysis.time_to_threshold(result)  # every threshold
    assert both.sizes["threshold"] == 2


def test_curves_are_taken_only_where_they_were_measured(sweep):
    from modelscape.analysis.curves import taken

    _, result = sweep
    ds = result.to_xarray()
    assert ds.attrs["EVAL_EVERY"] == 10
    for job in result.records:
        at = dict(zip(result.axes, job.key))
        train = taken(ds, "train_loss").sel(at).values
        test = taken(ds, "test_loss").sel(at).values
        last = job.steps - 1
        assert np.isfinite(train[: last + 1]).all() and np.isnan(train[last + 1 :]).all()
        expected = sorted({s for s in range(0, last + 1, 10)} | {last})
        np.testing.assert_array_equal(np.flatnonzero(np.isfinite(test)), expected)
        np.testing.assert_allclose(test[last], job.test_loss, rtol=1e-6)
