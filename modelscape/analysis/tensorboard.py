"""``export_tensorboard``: one TensorBoard run per job, for those who live in TensorBoard.

Each job becomes a folder named after its values (``target=x0,ntrain=8,trial=0``) holding one
event file with:

- its values, status and seed in TensorBoard's HParams plugin, with the final ``test_loss``
  and ``train_loss`` (and the steps taken) as its metrics;
- its curves as scalars when they were recorded (ONLYTHRESHOLDS=False): the train loss at every
  step the job took, the test loss and the grabs at the steps they were evaluated (never the
  padding after the job's exit).

The files are written with ``torch.utils.tensorboard``, which needs the ``tensorboard``
package: ``pip install 'modelscape-sweeps[tensorboard]'``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path

import numpy as np
import xarray as xr

from modelscape.analysis._data import Data, as_dataset
from modelscape.analysis.curves import taken
from modelscape.errors import require_extra
from modelscape.sweep.jobs import key_id

METRICS = ("test_loss", "train_loss", "steps")


def export_tensorboard(data: Data, out_dir: str | os.PathLike) -> list[Path]:
    """Write one TensorBoard run per job with a record under ``out_dir``; returns their folders."""
    require_extra("tensorboard", "tensorboard", "the TensorBoard export")
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    ds = as_dataset(data)
    axes = [d for d in ds["status"].dims]
    curves = [v for v in ds.data_vars if "step" in ds[v].dims]
    measured = {v: taken(ds, v) for v in curves}
    out = Path(out_dir)
    runs = []
    for position in itertools.product(*(range(ds.sizes[a]) for a in axes)):
        at = dict(zip(axes, position))
        job = ds.isel(at)
        status = str(job["status"].item())
        if status == "missing":
            continue
        values = {a: _hparam(job[a].item()) for a in axes}
        # named by its values as the checkpoints are, with a digest of the job's identity, so
        # two jobs whose values print alike (0.1 and 0.10000001, "a/b" and "a_b") stay apart
        digest = hashlib.sha256(key_id(tuple(job[a].item() for a in axes)).encode()).hexdigest()
        folder = out / (",".join(f"{a}={_safe(v)}" for a, v in values.items()) + f"--{digest[:8]}")
        writer = SummaryWriter(log_dir=str(folder))
        metrics = {f"final/{m}": _number(job[m]) for m in METRICS if m in job}
        hp = {**values, "status": status, "seed": str(job["seed"].item())}
        for summary in hparams(hp, metrics):
            writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            writer.add_scalar(name, value, 0)
        for name, curve in measured.items():
            points = curve.isel(at).values
            for step in np.flatnonzero(np.isfinite(points)):
                writer.add_scalar(name, float(points[step]), int(step))
        writer.close()
        runs.append(folder)
    return runs


def _hparam(value) -> str | float | int | bool:
    """A value the HParams plugin can hold: a number, a bool or text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


def _number(da: xr.DataArray) -> float:
    value = da.values
    if value.ndim:  # a curve: its final (padded) value is the job's final value
        value = value[-1]
    return float(value)


def _safe(value) -> str:
    return re.sub(
        r"[^A-Za-z0-9_.=+^*-]", "_", repr(value) if isinstance(value, float) else str(value)
    )
