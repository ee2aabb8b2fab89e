"""``modelscape show | plot | fit | export``: look at a run folder from the shell.

Each command reads a run folder (the ``SAVE_DIR`` of a sweep, through ``modelscape.store.load``)
or a pickled ``Result`` file (``pickle.dump(result, f)``), so it works while a sweep is still
writing and on results saved by hand:

    modelscape show runs/demo
    modelscape plot runs/demo --x N_SAMPLES --y test_loss --hue GAMMA -o fig.png
    modelscape plot runs/demo --x ntrain --y timekeys --threshold 0.2 -o t.png
    modelscape fit runs/demo --x N_SAMPLES --y test_loss [--hue GAMMA]
    modelscape export runs/demo --format netcdf|csv|parquet [-o out.nc]
    modelscape export runs/demo --format tensorboard -o tb/

netcdf, parquet and tensorboard need the extras of those names (or `all`).
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelscape.errors import require_extra
from modelscape.results.result import Result, display

FORMATS = {"netcdf": ".nc", "csv": ".csv", "parquet": ".parquet", "tensorboard": ".tensorboard"}


def load_result(path: str | Path) -> Result:
    """A run folder (``SAVE_DIR``) or a pickled ``Result`` file.

    A run folder's records written by detached SLURM tasks are stored first.
    """
    path = Path(path)
    if path.is_dir():
        from modelscape import store
        from modelscape.execution import REGISTRY, executor_class

        for name in REGISTRY:  # records that executors left in the folder without a sweep
            note = executor_class(name).collect(path)
            if note:
                print(note, file=sys.stderr)
        return store.load(path)
    if path.is_file():
        with open(path, "rb") as f:
            result = pickle.load(f)
        if not isinstance(result, Result):
            raise SystemExit(f"{path} holds a {type(result).__name__}, not a modelscape Result.")
        return result
    raise SystemExit(f"{path} does not exist; give a run folder (SAVE_DIR) or a Result pickle.")


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    """Register ``show``, ``plot``, ``fit`` or ``export`` (this module serves all four)."""
    if name == "show":
        p = sub.add_parser(name, help="jobs done/failed/missing, the axes and a summary table")
        p.add_argument("run", help="run folder (SAVE_DIR) or pickled Result")
        p.add_argument("--rows", type=int, default=40, help="rows of the summary table to print")
    elif name == "plot":
        p = sub.add_parser(name, help="plot a variable of a run against an axis")
        p.add_argument("run", help="run folder (SAVE_DIR) or pickled Result")
        p.add_argument("--x", required=True, help="axis for the x axis (or 'step' for curves)")
        p.add_argument(
            "--y", default="test_loss", help="test_loss, train_loss, timekeys or a grab's name"
        )
        p.add_argument("--hue", default=None, help="axis drawn as separate lines")
        p.add_argument("--threshold", type=float, default=None, help="timekeys threshold")
        p.add_argument(
            "--sel",
            action="append",
            default=[],
            metavar="AXIS=VALUE",
            help="fix another axis to one value (repeatable)",
        )
        p.add_argument("--linear", action="store_true", help="linear instead of log axes")
        p.add_argument("-o", "--out", default="plot.png", help="output image (png, pdf, svg)")
    elif name == "fit":
        p = sub.add_parser(name, help="fit y = prefactor * x^exponent with bootstrap intervals")
        p.add_argument("run", help="run folder (SAVE_DIR) or pickled Result")
        p.add_argument("--x", required=True, help="the axis of the power law (e.g. N_SAMPLES)")
        p.add_argument("--y", default="test_loss", help="test_loss, train_loss or a grab's name")
        p.add_argument("--hue", default=None, help="one fit per value of this axis")
        p.add_argument("--over", default="trial", help="the axis of the trials resampled")
        p.add_argument("--ci", type=float, default=0.95, help="coverage of the interval")
        p.add_argument("--sel", action="append", default=[], metavar="AXIS=VALUE")
    elif name == "export":
        p = sub.add_parser(
            name, help="write a run's results as netcdf, csv, parquet or TensorBoard event files"
        )
        p.add_argument("run", help="run folder (SAVE_DIR) or pickled Result")
        p.add_argument("--format", choices=list(FORMATS), default="csv")
        p.add_argument(
            "-o", "--out", default=None, help="output file or folder (default: next to the run)"
        )
    else:
        raise ValueError(f"analysis_cli serves show, plot, fit and export, not {name!r}.")
    p.set_defaults(analysis=name)


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise SystemExit(f"modelscape {args.analysis}: unrecognized arguments {' '.join(rest)}")
    result = load_result(args.run)
    commands = {"show": show, "plot": plot, "fit": fit, "export": export}
    return commands[args.analysis](result, args)


def show(result: Result, args: argparse.Namespace) -> int:
    """Print job counts, the axes and the summary table."""
    total = math.prod(len(v) for v in result.axis_values)
    statuses = [r.status for r in result.records]
    counts = {s: statuses.count(s) for s in ("ok", "diverged", "failed")}
    missing = total - len(result.records)
    print(f"run: {args.run}")
    print(
        f"jobs: {total} total, {len(result.records)} done ({counts['ok']} ok, "
        f"{counts['diverged']} diverged, {counts['failed']} failed), {missing} missing"
    )
    print("axes:")
    for axis, values in zip(result.axes, result.axis_values):
        shown = ", ".join(str(display(v)) for v in values[:8]) + (
            ", ..." if len(values) > 8 else ""
        )
        print(f"  {axis} ({len(values)}): {shown}")
    thresholds = result.config.get("LOSS_CHECKPOINTS")
    if thresholds:
        print(f"thresholds: {', '.join(f'{t:g}' for t in sorted(thresholds, reverse=True))}")
    lines = result.summary(rows=None).splitlines()[1:]
    if lines:
        print("\n".join(lines[: args.rows + 1]))
        if len(lines) > args.rows + 1:
            print(f"... {len(lines) - args.rows - 1} more rows (--rows N to show more)")
    for r in result.failed[:5]:
        print(f"failed {dict(zip(result.axes, r.key))}: {r.error}")
    return 0


def _select(ds, selections: Sequence[str]):
    from modelscape.analysis import resolve_dim

    for item in selections:
        if "=" not in item:
            raise ValueError(f"--sel takes AXIS=VALUE, got {item!r}.")
        name, text = item.split("=", 1)
        dim = resolve_dim(ds, name)
        values = ds[dim].values
        matches = [i for i, v in enumerate(values) if str(v) == text or _same_number(v, text)]
        if not matches:
            raise ValueError(f"--sel {item}: {dim} has values {', '.join(map(str, values))}.")
        ds = ds.isel({dim: matches[0]})
    return ds


def _same_number(value, text: str) -> bool:
    try:
        return bool(np.isclose(float(value), float(text)))
    except (TypeError, ValueError):
        return False


def plot(result: Result, args: argparse.Namespace) -> int:
    """Draw ``--y`` against ``--x`` (learning curve, time to threshold, or curve vs step).

    A bad axis, variable, selection or threshold exits with status 2 and the message alone.
    """
    from modelscape.results import plotting

    log = not args.linear
    try:
        ds = _select(result.to_xarray(), args.sel)
        if args.x == "step":
            ax = plotting.loss_vs_step(ds, y=args.y, hue=args.hue, logy=log)
        elif args.y in ("timekeys", "timekey") or args.y.startswith("timekey_"):
            threshold = args.threshold
            if threshold is None and args.y.startswith("timekey_"):
                threshold = float(args.y.split("_", 1)[1])
            ax = plotting.time_to_threshold(
                ds, args.x, threshold=threshold, hue=args.hue, logx=log, logy=log
            )
        else:
            ax = plotting.learning_curve(ds, x=args.x, y=args.y, hue=args.hue, logx=log, logy=log)
        # saving draws the figure, which is where matplotlib rejects what it cannot show
        path = plotting.save(ax, args.out)
    except (KeyError, ValueError) as err:
        print(f"modelscape plot: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def fit(result: Result, args: argparse.Namespace) -> int:
    """Print the power-law fit of ``--y`` against ``--x`` (one row per ``--hue`` value)."""
    from modelscape.analysis import fit_power_law

    try:
        ds = _select(result.to_xarray(), args.sel)
        f = fit_power_law(ds, x=args.x, y=args.y, over=args.over, hue=args.hue, ci=args.ci)
    except (KeyError, ValueError) as err:
        print(f"modelscape fit: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"{f.attrs['y']} = prefactor * {f.attrs['x']}^exponent ({f.attrs['fit']})")
    print(f"interval: {f.attrs['interval']}")
    hdim = next(iter(f["exponent"].dims), None)  # the hue's axis, when a hue was given
    rows = [f] if hdim is None else [f.isel({hdim: i}) for i in range(f.sizes[hdim])]
    head = [hdim] if hdim else []
    head += ["exponent", f"{args.ci:.0%} CI", "prefactor", f"{args.ci:.0%} CI", "x range"]
    table = [head + ["points", "trials"]]
    for row in rows:
        cells = [str(row[hdim].item())] if hdim else []
        cells += [
            f"{row['exponent'].item():.3f}",
            _interval(row, "exponent", ".3f"),
            f"{row['prefactor'].item():.4g}",
            _interval(row, "prefactor", ".4g"),
            f"{row['x_min'].item():g}..{row['x_max'].item():g}",
            str(row["n_points"].item()),
            str(row["min_trials"].item()),
        ]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if np.isnan(f["exponent_low"].values).any():
        print(f"nan: {f.attrs['note']}")
    return 0


def _interval(row, name: str, fmt: str) -> str:
    low, high = row[f"{name}_low"].item(), row[f"{name}_high"].item()
    return f"[{low:{fmt}}, {high:{fmt}}]"


def export(result: Result, args: argparse.Namespace) -> int:
    """Write the xarray Dataset (netcdf), the tidy DataFrame (csv, parquet) or one TensorBoard
    run per job (tensorboard, a folder)."""
    run = Path(args.run)
    default = (run / "results" if run.is_dir() else run.with_suffix("")).with_suffix(
        FORMATS[args.format]
    )
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"modelscape export --format {args.format}"
    needs = {"netcdf": ("scipy", "netcdf"), "parquet": ("pyarrow", "parquet")}
    needs["tensorboard"] = ("tensorboard", "tensorboard")
    if args.format in needs:
        require_extra(*needs[args.format], what)
    if args.format == "tensorboard":
        from modelscape.analysis import export_tensorboard

        runs = export_tensorboard(result, out)
        print(f"wrote {len(runs)} TensorBoard runs to {out} (tensorboard --logdir {out})")
        return 0
    if args.format == "netcdf":
        ds = result.to_xarray()
        for name in list(ds.variables):
            if ds[name].dtype == object:  # netCDF stores text, not Python objects
                ds[name] = ds[name].astype(str)
            elif ds[name].dtype == np.int64:  # netCDF3 has no 64-bit ints
                fits = np.abs(ds[name].values).max(initial=0) < 2**31
                ds[name] = ds[name].astype(np.int32 if fits else str)  # a seed stays exact
        ds.to_netcdf(out)
    else:
        df = result.to_dataframe()
        for col in df.columns:
            if df[col].dtype == object and col != "error":
                df[col] = df[col].map(str)  # iterator values such as Monomials become text
        if args.format == "csv":
            df.to_csv(out, index=False)
        else:
            df.to_parquet(out, index=False)
    print(f"wrote {out}", file=sys.stdout)
    return 0
