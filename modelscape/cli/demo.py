"""``modelscape run``: the embedded demo sweep, a small real study on synthetic data.

Learning curves of a width-256 MLP on a quadratic target: test loss against sample size, over
trials and two richness values. Every hyperparameter flag of ``parse_args`` works here too
(``modelscape run --WIDTH 512 --MAX_ITER 2000``).
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence

import numpy as np
import torch

from modelscape.cli.args import build_parser, explicit_names, parse_with
from modelscape.errors import HParamError, RunFolderMismatch
from modelscape.runner import main as run_job_iterator

# the demo's own defaults: small enough for a laptop CPU, offline so N_SAMPLES is a training-set
# size; every flag still overrides them, and `modelscape run --help` shows them
DEMO_DEFAULTS = {
    "WIDTH": 256,
    "MAX_ITER": 1500,
    "LR": 0.2,
    "N_TEST": 2000,
    "LOSS_CHECKPOINTS": [0.5, 0.2],
    "NUM_TRIALS": 3,
    "ONLINE": False,
    "DEVICES": ["cpu"],
}
DEFAULT_OUT = "runs/demo"


def quadratic_bfn(bsz, gen, X=None, y=None, d=16, **kwargs):
    """Gaussian inputs in ``d`` dimensions, target ``x0 * x1`` (unit variance)."""

    def batch_fn(step):
        if X is not None:
            return X, y
        Xb = torch.randn(bsz, d, generator=gen, device=gen.device)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    # every flag goes on to run_parser(), which also answers --help
    sub.add_parser(
        name, help="run the demo sweep (any hyperparameter flag may follow)", add_help=False
    )


def run_parser() -> argparse.ArgumentParser:
    """``modelscape run``'s options: every hyperparameter at the demo's defaults, and its own."""
    parser = build_parser(
        defaults=DEMO_DEFAULTS,
        prog="modelscape run",
        description="Run the demo sweep: learning curves of an MLP on a quadratic target "
        "(sample size x trial x GAMMA). Every hyperparameter flag below works here, at the "
        "demo's defaults.",
    )
    own = parser.add_argument_group("the demo's own options")
    own.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"run folder for results and the plot (default: {DEFAULT_OUT})",
    )
    own.add_argument(
        "--detach",
        action="store_true",
        default=False,
        help="with --EXECUTOR slurm: submit and return (same as --DETACH True)",
    )
    return parser


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    parser = run_parser()
    argv = list(rest)
    hp = parse_with(parser, argv, defaults=DEMO_DEFAULTS, own=("out", "detach"))
    own, _ = parser.parse_known_args(argv)
    if own.detach:
        hp.DETACH = True
    if not hp.ONLYTHRESHOLDS:
        raise HParamError(
            "modelscape run tabulates final test losses, so it needs ONLYTHRESHOLDS=True; "
            "drop --ONLYTHRESHOLDS False (whole curves are for your own sweeps)."
        )
    hp.SAVE_DIR = hp.SAVE_DIR or own.out
    config = vars(hp)
    given = explicit_names(argv)
    # the demo's own axes take the values given on the command line, so no flag is dropped
    sizes = _axis(config, "N_SAMPLES", given, [32, 64, 128, 256, 512])
    gammas = _axis(config, "GAMMA", given, [1.0, 0.1])
    iterators = [sizes, range(hp.NUM_TRIALS), gammas]
    try:
        result = run_job_iterator(
            iterators, ["ntrain", "trial", "GAMMA"], config, {"base_bfn": quadratic_bfn, "d": 16}
        )
    except RunFolderMismatch as err:
        raise RunFolderMismatch(f"{err}\n{new_folder_hint(argv, hp.SAVE_DIR)}") from None
    if hp.DETACH:
        return 0  # the executor said where the jobs run and how to collect them
    print(learning_curve_table(result))
    from modelscape.results import plotting

    ax = plotting.learning_curve(result, x="N_SAMPLES", y="test_loss", hue="GAMMA")
    ax.set_title("MLP on x0*x1: test loss against sample size")
    figure = plotting.save(ax, f"{hp.SAVE_DIR}/learning_curve.png")
    print(f"results written to {hp.SAVE_DIR} (plot: {figure})")
    return 0


def new_folder_hint(argv: Sequence[str], save_dir: str) -> str:
    """The exact command that runs these flags into a folder of their own, named after them."""
    flags = list(argv)
    for option in ("--out", "--SAVE_DIR"):  # the folder given is replaced, with its value
        if option in flags:
            i = flags.index(option)
            del flags[i : i + 2]
    pieces = []  # one per flag: its name and values, "WIDTH64"
    for item in flags:
        if item.startswith("--") or not pieces:
            pieces.append("")
        pieces[-1] += re.sub(r"[^A-Za-z0-9._]+", "", item)
    tag = "-".join(p for p in pieces if p)
    folder = f"{save_dir.rstrip('/')}-{tag}" if tag else f"{save_dir.rstrip('/')}-2"
    command = shlex.join(["modelscape", "run", *flags, "--out", folder])
    return f"To keep both sweeps, run the new one in a folder of its own:\n  {command}"


def _axis(config: dict, name: str, given: set[str], default: list) -> list:
    """The values of one of the demo's axes: the command line's if given, else the demo's."""
    value = config.pop(name)
    if name not in given:
        return default
    return list(value) if isinstance(value, list) else [value]


def learning_curve_table(result) -> str:
    """Test loss (median over trials [95% bootstrap CI]) against sample size, one column per
    GAMMA."""
    from modelscape.analysis import summarize

    ds = result.to_xarray()
    s = summarize(ds, "test_loss")
    cells = [
        f"{c:.3f} [{lo:.3f}, {hi:.3f}]"
        for c, lo, hi in zip(*(s[v].values.ravel() for v in ("center", "low", "high")))
    ]
    table = s["center"].to_pandas().astype(object)
    table[:] = np.reshape(cells, table.shape)
    table.columns = [f"GAMMA={g:g}" for g in table.columns]
    counts = ds.status.to_series().value_counts().to_dict()
    head = ", ".join(f"{n} {status}" for status, n in counts.items())
    return (
        f"{len(ds.status.values.ravel())} jobs ({head}). Test loss by sample size, median over "
        f"trials [95% bootstrap CI; nan with fewer than 3 trials]:\n{table}"
    )
