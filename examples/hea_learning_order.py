"""HEA learning order: a feature-learning MLP learns Hermite monomials in HEA order.

Karkada, Turnbull, Liu & Simon (ICLR 2026, arXiv:2510.14878) find that MLPs in the rich regime
learn the Hermite monomials of the data's principal coordinates in the order of their HEA
eigenvalues ``lambda = c_degree * prod_i gamma_i^alpha_i``. This example trains one MLP per
target monomial (an iterator axis) with online SGD, muP and a large GAMMA on power-law Gaussian
data, records the step at which the EMA train loss first falls below LOSS_CHECKPOINTS, and plots
that time against 1/lambda on log-log axes: the Kaplan-Meier median over trials (a trial that
stopped at MAX_ITER is censored, not dropped), with the fitted power law, its exponent and the
exponent's bootstrap interval (NUM_TRIALS >= 3), and prints the Spearman correlation.

    python examples/hea_learning_order.py                       # CPU, well under 2 minutes
    python examples/hea_learning_order.py --WIDTH 1024 --N_TARGETS 14 --NUM_TRIALS 4 --DEVICES 0

Targets are chosen automatically (degree <= MAX_DEGREE, spread evenly in log eigenvalue over a
factor SPREAD below the top mode) unless --TARGETS "x0,x0^2,x1*x2" lists them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from modelscape import analysis, parse_args, run_sweep
from modelscape.data import (
    Monomial,
    hea_eigenvalues,
    monomial_bfn,
    powerlaw_eigenvalues,
    relu_ntk_level_coefficients,
    top_hea_monomials,
)
from modelscape.results import plotting

INVERSE = "inverse_eigenvalue"  # the axis of targets, as 1/HEA eigenvalue

DEFAULTS = {  # this script's defaults: every flag overrides them, --help shows them
    "PARAMETRIZATION": "mup",
    "GAMMA": 10.0,
    "LR": 0.05,
    "WIDTH": 128,
    "DEPTH": 2,
    "BIAS": True,
    "ONLINE": True,
    "N_SAMPLES": 256,
    "N_TEST": 2000,
    "MAX_ITER": 5000,
    "LOSS_CHECKPOINTS": [0.5],
    "NUM_TRIALS": 3,
    "DEVICES": ["cpu"],
}

EXTRA = {
    "D": (64, "input dimension d of the power-law Gaussian data"),
    "ALPHA": (1.7, "covariance eigenvalues decay like (i + OFFSET)^-ALPHA"),
    "OFFSET": (6.0, "offset of the power law"),
    "N_TARGETS": (9, "number of target monomials chosen automatically"),
    "MAX_DEGREE": (2, "largest degree of the automatically chosen targets"),
    "SPREAD": (64.0, "ratio between the largest and smallest HEA eigenvalue of the targets"),
    "TARGETS": ("", "comma-separated target monomials, e.g. 'x0,x0^2,x1*x2' (overrides)"),
    "KERNEL_DEPTH": (1, "hidden layers of the ReLU NTK whose HEA eigenvalues rank the targets"),
    "BIAS_VARIANCE": (1.0, "bias variance of that NTK (0 for a bias-free network)"),
    "OUT": ("runs/hea_learning_order.png", "where to save the plot"),
}


def choose_targets(
    gamma: np.ndarray, coeffs: np.ndarray, n: int, max_degree: int, spread: float
) -> list[Monomial]:
    """``n`` monomials of degree 1..max_degree (taken in turn), whose HEA eigenvalues are spread
    evenly in log over a factor ``spread`` below the largest."""
    monomials, values = top_hea_monomials(gamma, 400, coeffs)
    top = max(v for m, v in zip(monomials, values) if m.degree >= 1)
    pool = [(m, v) for m, v in zip(monomials, values) if 1 <= m.degree <= max_degree]
    pool = [(m, v) for m, v in pool if v >= top / spread]
    chosen: list[Monomial] = []
    for i, goal in enumerate(np.geomspace(top, top / spread, n)):
        free = [(m, v) for m, v in pool if m not in chosen]
        same_degree = [(m, v) for m, v in free if m.degree == 1 + i % max_degree]
        candidates = same_degree or free
        if not candidates:
            break
        chosen.append(min(candidates, key=lambda mv: abs(np.log(mv[1] / goal)))[0])
    return chosen


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv, extra=EXTRA, defaults=DEFAULTS)
    gamma = powerlaw_eigenvalues(args.D, args.ALPHA, args.OFFSET).numpy()
    coeffs = relu_ntk_level_coefficients(
        gamma, args.MAX_DEGREE + 2, depth=args.KERNEL_DEPTH, bias_variance=args.BIAS_VARIANCE
    )
    if args.TARGETS:
        targets = [Monomial(t) for t in args.TARGETS.split(",")]
    else:
        targets = choose_targets(gamma, coeffs, args.N_TARGETS, args.MAX_DEGREE, args.SPREAD)
    bfn_config = {
        "base_bfn": monomial_bfn,
        "d": args.D,
        "alpha": args.ALPHA,
        "offset": args.OFFSET,
    }
    result = run_sweep([targets, range(args.NUM_TRIALS)], ["target", "trial"], args, bfn_config)

    eigvals = hea_eigenvalues(targets, gamma, coeffs)
    threshold = max(args.LOSS_CHECKPOINTS)
    # the targets as a numeric axis, 1/eigenvalue, so that times can be fitted against it
    ds = result.to_xarray().assign_coords(target=1 / eigvals).rename(target=INVERSE)
    tt = analysis.time_to_threshold(ds, threshold)
    print_times(targets, eigvals, tt, threshold, args.MAX_ITER)
    reached = tt["median"].notnull().values
    rho = spearman(1 / eigvals[reached], tt["median"].values[reached])

    # the fit takes the targets every trial reached: a target some trials missed would enter
    # with its fastest trials only (the time of one that stopped is only a lower bound)
    complete = (tt["reached"] == 1).values
    _, ax = plt.subplots(figsize=(5.6, 5), constrained_layout=True)
    fit = None
    if complete.sum() >= 2:
        times = ds.assign(time=ds["timekeys"].sel(threshold=threshold)).isel({INVERSE: complete})
        fit = analysis.fit_power_law(times, x=INVERSE, y="time")
        plotting.draw_fit(ax, fit, color="gray", label=f"fit on {complete.sum()} targets: ")
    plotting.time_to_threshold(ds, INVERSE, threshold=threshold, ax=ax, xlabel="1 / HEA eigenvalue")
    for m, x, t in zip(targets, 1 / eigvals, tt["median"].fillna(tt["censored_at"]).values):
        ax.annotate(str(m), (x, t), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_title(f"{args.PARAMETRIZATION}, GAMMA={args.GAMMA:g}: Spearman {rho:.3f}")
    path = plotting.save(ax, args.OUT)
    print(f"Spearman correlation (time vs 1/eigenvalue) over {reached.sum()} monomials: {rho:.3f}")
    if fit is not None:
        low, high = float(fit["exponent_low"]), float(fit["exponent_high"])
        note = " (nan: fewer than 3 trials)" if np.isnan(low) else ""
        print(
            f"log-log slope over the {complete.sum()} targets every trial reached: "
            f"{float(fit['exponent']):.2f}, 95% bootstrap CI [{low:.2f}, {high:.2f}]{note}"
        )
    else:
        print("fewer than two targets were reached by every trial: no slope is fitted")
    print(f"plot saved to {path}")
    return rho


def print_times(targets, eigvals, tt, threshold: float, max_iter: int) -> None:
    """Per target: the censored (Kaplan-Meier) median steps to the threshold with its interval,
    the fraction of trials that reached it, and the mean over the trials that reached it alone
    (biased low where some did not)."""
    head = f"steps to loss < {threshold:g}"
    print(
        f"{'target':>10} {'HEA eigenvalue':>15} {head + ' (KM median [95% CI])':>40} "
        f"{'reached':>8} {'survivors-only mean':>20}"
    )
    for i, (m, lam) in enumerate(zip(targets, eigvals)):
        row = tt.isel({INVERSE: i})
        median = f"{float(row['median']):.0f}"
        if bool(row["median_censored"]):
            median = f">= {float(row['censored_at']):.0f}"
        cell = f"{median} [{float(row['low']):.0f}, {float(row['high']):.0f}]"
        print(
            f"{str(m):>10} {lam:15.4g} {cell:>40} {float(row['reached']):8.2f} "
            f"{float(row['mean_reached']):20.0f}"
        )
    if bool(tt["median_censored"].any()):
        print(f">= : fewer than half of the trials reached it within MAX_ITER={max_iter}")


if __name__ == "__main__":
    main()
