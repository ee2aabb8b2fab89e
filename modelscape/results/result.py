"""The ``Result`` a sweep returns, built from one ``JobRecord`` per job (``records.py``).

``Result`` is dict-like with the original's keys (``jobs``, ``var_axes``, ``losses``,
``train_losses``, ``timekeys``, ``extras``, ``errors``); each trace is in expt-core's serialized
form, so ``ExptTrace.deserialize(result["losses"])`` works. ``to_xarray()`` gives labelled
N-dimensional arrays (one dimension per iterator) and ``to_dataframe()`` a tidy table.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from modelscape.results.records import FIELDS, PER_JOB, JobRecord, Status
from modelscape.results.trace import ExptTrace
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import axis_target, hashable, trace_key, trace_value

__all__ = ["JobRecord", "Result", "Status", "trace_key"]


def _nan_like(shape: tuple[int, ...] | None) -> Any:
    if shape is None or shape == ():
        return float("nan")
    return np.full(shape, np.nan)


class Result(Mapping):
    """The outcome of a sweep, in job order, with expt-core-compatible traces."""

    def __init__(
        self,
        axes: Iterable[str],
        axis_values: Iterable[Iterable[Any]],
        records: Iterable[JobRecord],
        *,
        only_thresholds: bool = True,
        config: Mapping[str, Any] | None = None,
        grab_names: Iterable[str] = (),
    ):
        self.grab_names = list(grab_names)
        self.axes = list(axes)
        self.axis_values = [list(v) for v in axis_values]
        self.records = list(records)
        self.only_thresholds = only_thresholds
        self.config = dict(config or {})
        self._by_key = {trace_key(r.key): r for r in self.records}
        self._data = self._build()

    def _build(self) -> dict[str, Any]:
        def trace(pick) -> dict[str, Any]:
            t = ExptTrace(self.axes)
            shape = None
            for r in self.records:
                if r.status != "failed":
                    v = pick(r)
                    if v is not None:
                        shape = np.shape(v)
                        break
            for r in self.records:
                v = pick(r) if r.status != "failed" else None
                t[trace_key(r.key)] = _nan_like(shape) if v is None else v
            return t.serialize()

        # jobs with different MAX_ITER: shorter curves are padded with their last value, as
        # every curve is after its job's exit
        length = max((len(c) for r in self.records for c in (r.curves or {}).values()), default=0)

        def curve(r: JobRecord, name: str) -> np.ndarray | None:
            c = (r.curves or {}).get(name)
            if c is None or len(c) == length:
                return c
            return np.concatenate([c, np.repeat(c[-1:], length - len(c), axis=0)])

        if self.only_thresholds:
            losses = trace(lambda r: r.test_loss)
            train = trace(lambda r: r.train_loss)
        else:
            losses = trace(lambda r: curve(r, "test_loss"))
            train = trace(lambda r: curve(r, "train_loss"))
        grab_names = sorted({g for r in self.records for g in r.grabs} | set(self.grab_names))
        if not self.only_thresholds:
            grab_names = sorted(
                {g for r in self.records for g in (r.curves or {})} - {"train_loss", "test_loss"}
                | set(self.grab_names)
            )

        def grab_value(r: JobRecord, name: str):
            return scalar_grab(r.grabs.get(name)) if self.only_thresholds else curve(r, name)

        extras = {g: trace(lambda r, g=g: grab_value(r, g)) for g in grab_names}
        errors = {
            trace_key(r.key): {"message": r.error, "traceback": r.traceback}
            for r in self.records
            if r.status == "failed"
        }
        return {
            "jobs": [trace_key(r.key) for r in self.records],
            "var_axes": list(self.axes),
            "losses": losses,
            "train_losses": train,
            "timekeys": trace(lambda r: r.timekeys if r.timekeys.size else None),
            "extras": extras,
            "errors": errors,
            "status": {trace_key(r.key): r.status for r in self.records},
        }

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def record(self, *key: Any) -> JobRecord:
        """The record of the job with these iterator values."""
        return self._by_key[trace_key(tuple(key))]

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status == "failed"]

    def trace(self, name: str) -> ExptTrace:
        """An ``ExptTrace`` of ``losses``, ``train_losses``, ``timekeys`` or a grab's name."""
        data = self._data[name] if name in self._data else self._data["extras"][name]
        return ExptTrace.deserialize(data)

    def to_xarray(self):
        """An ``xarray.Dataset`` with one dimension per iterator.

        Variables: ``test_loss``, ``train_loss``, ``timekeys`` (extra dim ``threshold``), one per
        grab, and each per-job field of ``JobRecord`` (``status`` is ``"missing"`` for a job with
        no record yet). With ONLYTHRESHOLDS=False the losses and grabs gain a ``step`` dim
        (padded after each job's exit; ``modelscape.analysis.curves`` says which steps were
        measured, from ``attrs["EVAL_EVERY"]``).
        """
        import xarray as xr

        coords = {a: _coord(v) for a, v in zip(self.axes, self.axis_values)}
        shape = [len(v) for v in self.axis_values]
        index = {
            a: {hashable(trace_value(x)): i for i, x in enumerate(v)}
            for a, v in zip(self.axes, self.axis_values)
        }

        def grid(name: str, inner_dims: list[str]) -> xr.DataArray:
            t = self.trace(name)
            inner = tuple(t.outcome_shape or ())
            arr = np.full(shape + list(inner), np.nan)
            for cfg, val in t.config2outcome.items():
                pos = tuple(index[a][hashable(x)] for a, x in zip(self.axes, cfg))
                arr[pos] = val
            dims = self.axes + inner_dims[: len(inner)]
            dims += [f"{name}_dim{i}" for i in range(len(dims), arr.ndim)]
            return xr.DataArray(arr, dims=dims)

        step = [] if self.only_thresholds else ["step"]
        data = {
            "test_loss": grid("losses", step),
            "train_loss": grid("train_losses", step),
        }
        if self.records and any(r.timekeys.size for r in self.records):
            data["timekeys"] = grid("timekeys", ["threshold"])
        for g in self._data["extras"]:
            data[g] = grid(g, step)
        for name in PER_JOB:
            if name not in data:
                data[name] = xr.DataArray(self._per_job_grid(name, shape, index), dims=self.axes)
        ds = xr.Dataset(data, coords=coords)
        thresholds = self.config.get("LOSS_CHECKPOINTS")
        if "timekeys" in ds and thresholds is not None:
            ds = ds.assign_coords(threshold=sorted(thresholds, reverse=True))
        ds.attrs.update(hparam_attrs(self.config, self.axes))
        if "EVAL_EVERY" in self.config:  # where the curves' test losses were evaluated
            ds.attrs["EVAL_EVERY"] = int(self.config["EVAL_EVERY"])
        return ds

    def _per_job_grid(self, name: str, shape: list[int], index: dict) -> np.ndarray:
        """One field of every record on the grid of axes. Where a job has no record: NaN for a
        float, "missing" for the status, None otherwise (an int grid is then of objects, as a
        float would round 63-bit seeds)."""
        kind = FIELDS[name].type
        complete = len(self.records) == int(np.prod(shape))
        if kind == "float":
            arr = np.full(shape, np.nan)
        elif kind == "int" and complete:
            arr = np.zeros(shape, dtype=np.int64)
        else:
            arr = np.full(shape, "missing" if name == "status" else None, dtype=object)
        for r in self.records:
            key = trace_key(r.key)
            arr[tuple(index[a][hashable(x)] for a, x in zip(self.axes, key))] = getattr(r, name)
        return arr

    def to_dataframe(self):
        """A tidy ``pandas.DataFrame``: one row per job with its axes, each per-job field of
        ``JobRecord`` (status, seed, losses, steps, seconds, error...), timekeys and scalar
        grabs."""
        import pandas as pd

        rows = []
        thresholds = sorted(self.config.get("LOSS_CHECKPOINTS", []), reverse=True)
        for r in self.records:
            row = {a: display(v) for a, v in zip(self.axes, r.key)}
            row.update((name, getattr(r, name)) for name in PER_JOB)
            for j, tk in enumerate(r.timekeys):
                name = f"timekey_{thresholds[j]:g}" if j < len(thresholds) else f"timekey_{j}"
                row[name] = tk
            for g, v in r.grabs.items():
                if np.ndim(v) == 0:
                    row[g] = float(v)
            rows.append(row)
        return pd.DataFrame(rows)

    @property
    def trained_by(self) -> Counter[str]:
        """How the jobs trained: ``{"stacked": 36, "single: <reason>": 4}`` (jobs whose record
        says nothing, such as ones that failed before training, are not counted)."""
        return Counter(r.trained_by for r in self.records if r.trained_by)

    def summary(self, rows: int | None = 40) -> str:
        """A short text table: status counts and median losses, its first ``rows`` rows (all
        with ``rows=None``), as ``modelscape show`` prints it."""
        df = self.to_dataframe()
        counts = df["status"].value_counts().to_dict() if len(df) else {}
        lines = [f"{len(df)} jobs: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
        if self.trained_by:
            how = self.trained_by.most_common()
            lines.append("trained: " + ", ".join(f"{n} {way}" for way, n in how))
        ok = df[df["status"] == "ok"] if len(df) else df
        if len(ok):
            cols = [
                c
                for c in ok.columns
                if c in ("train_loss", "test_loss") or c.startswith("timekey_")
            ]
            shown = ok if rows is None else ok.head(rows)
            lines.append(shown[self.axes + cols].to_string(index=False, float_format="%.4g"))
            if len(shown) < len(ok):
                lines.append(f"... {len(ok) - len(shown)} more rows (summary(rows=None) shows all)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        n_failed = len(self.failed)
        return f"Result(axes={self.axes}, jobs={len(self.records)}, failed={n_failed})"


def scalar_grab(value: Any) -> Any:
    """A 0-d grab value as a numpy scalar (hashable, as the original returned it)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def _coord(values: list) -> Any:
    if all(isinstance(v, (int, float, str, np.number)) for v in values):
        return np.asarray(values)
    return np.asarray([str(display(v)) for v in values], dtype=object)


def hparam_attrs(config: Mapping[str, Any], axes: Iterable[str] = ()) -> dict[str, Any]:
    """The sweep's hyperparameters that no axis sets, as ``attrs`` a netCDF file can hold:
    numbers and text as they are, lists of numbers as lists, anything else (booleans, None,
    classes, dicts) as text."""
    swept = {axis_target(a) for a in axes}
    attrs = {}
    for name in H.FIELDS:
        if name not in config or name in swept:
            continue
        value = config[name]
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        numbers = (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        attrs[name] = value if number or isinstance(value, str) or numbers else str(display(value))
    return attrs


def display(value: Any) -> Any:
    """A class or function by its qualified name (``SignSGD``, not ``<class '__main__.SignSGD'>``);
    any other value as it is."""
    if isinstance(value, type) or inspect.isfunction(value):
        return value.__qualname__
    return value
