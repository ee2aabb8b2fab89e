"""Learning curves on synthetic power-law data with Hermite monomial targets.

Inputs are Gaussian with covariance eigenvalues ``(i + OFFSET)^-ALPHA``; each target is one
normalized Hermite monomial of the principal coordinates (unit variance, so predicting zero costs
1). An MLP is trained on a fixed training set of N_SAMPLES points (offline, full batch) until its
EMA train loss is below LOSS_CHECKPOINTS or MAX_ITER steps, and the test loss is plotted against
N_SAMPLES, one curve per target: the geometric mean over trials with its bootstrap interval, and
the fitted power law with its exponent's bootstrap interval (printed; NUM_TRIALS >= 3 for an
interval). Monomials with larger HEA eigenvalues (printed) need fewer samples.

    python examples/powerlaw_monomials.py                         # CPU, about a minute
    python examples/powerlaw_monomials.py --WIDTH 1024 --NUM_TRIALS 5 --DEVICES 0 \\
        --SIZES 16 32 64 128 256 512 1024 2048 4096 --TARGETS x0 x3 x0^2 x0*x1 x0^3
"""

from __future__ import annotations

from modelscape import parse_args, run_sweep
from modelscape.data import (
    Monomial,
    hea_eigenvalues,
    monomial_bfn,
    powerlaw_eigenvalues,
    relu_ntk_level_coefficients,
)
from modelscape.results import plotting

DEFAULTS = {  # this script's defaults: every flag overrides them, --help shows them
    "ONLINE": False,
    "WIDTH": 128,
    "DEPTH": 2,
    "BIAS": True,
    "LR": 0.2,
    "MAX_ITER": 1500,
    "LOSS_CHECKPOINTS": [0.01],
    "N_TEST": 2000,
    "NUM_TRIALS": 3,
    "DEVICES": ["cpu"],
}

EXTRA = {
    "D": (16, "input dimension d"),
    "ALPHA": (1.5, "covariance eigenvalues decay like (i + OFFSET)^-ALPHA"),
    "OFFSET": (1.0, "offset of the power law"),
    "TARGETS": (["x0", "x0^2", "x0*x1"], "target monomials (one learning curve each)"),
    "SIZES": ([16, 64, 256, 1024], "training-set sizes N_SAMPLES"),
    "OUT": ("runs/powerlaw_monomials.png", "where to save the plot"),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, extra=EXTRA, defaults=DEFAULTS)
    targets = [Monomial(t) for t in args.TARGETS]
    gamma = powerlaw_eigenvalues(args.D, args.ALPHA, args.OFFSET)
    max_degree = max(t.degree for t in targets)
    bias_variance = 1.0 if args.BIAS else 0.0
    coeffs = relu_ntk_level_coefficients(
        gamma, max_degree, depth=args.DEPTH, bias_variance=bias_variance
    )
    for t, lam in zip(targets, hea_eigenvalues(targets, gamma, coeffs)):
        print(f"target {t}: HEA eigenvalue {lam:.3g}")

    bfn_config = {
        "base_bfn": monomial_bfn,
        "d": args.D,
        "alpha": args.ALPHA,
        "offset": args.OFFSET,
    }
    result = run_sweep(
        [targets, args.SIZES, range(args.NUM_TRIALS)],
        ["target", "ntrain", "trial"],
        args,
        bfn_config,
    )
    print(result.summary())
    ax, fit = plotting.power_law_fit(result, x="N_SAMPLES", y="test_loss", hue="target")
    for target in fit["target"].values:
        f = fit.sel(target=target)
        print(
            f"target {target}: test loss ~ N^{float(f.exponent):.2f}, 95% bootstrap CI "
            f"[{float(f.exponent_low):.2f}, {float(f.exponent_high):.2f}] over N = "
            f"{float(f.x_min):g}..{float(f.x_max):g}"
        )
    ax.set_title(f"MLP width {args.WIDTH}, power-law data (alpha={args.ALPHA:g})")
    print(f"plot saved to {plotting.save(ax, args.OUT)}")


if __name__ == "__main__":
    main()
