"""The sweep runner (the original's API): ``main(iterators, iterator_names, global_config, ...)``.

It validates every job before any trains, trains them all, and returns a ``Result`` whose keys
are the original's (``jobs``, ``var_axes``, ``losses``, ``train_losses``, ``timekeys``,
``extras``, ``errors``), each trace in expt-core's serialized form.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from modelscape import hparams as H
from modelscape.engine import resolve_device
from modelscape.executors import Executor, InProcessExecutor
from modelscape.jobs import Job, SweepError, axis_target, build_jobs, materialize
from modelscape.results import JobRecord, Result
from modelscape.store import MemoryStore
from modelscape.sweep import SweepSpec, check_batch


def _as_dict(config: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    if isinstance(config, argparse.Namespace):
        return dict(vars(config))
    if not isinstance(config, Mapping):
        raise SweepError(
            f"global_config must be a dict or the namespace from parse_args(), "
            f"got {type(config).__name__}."
        )
    return dict(config)


def _list_valued_axes(hps: dict[str, Any], names: Sequence[str]) -> list[tuple[str, list]]:
    """Job hyperparameters given several values (``--GAMMA 0.1 1 10``) become sweep axes."""
    covered = {axis_target(n) for n in names}
    axes = []
    for name, value in list(hps.items()):
        scalar_job_hp = H.FIELDS[name].metadata["scope"] == "job" and H.kind_of(name) != "list"
        if scalar_job_hp and isinstance(value, (list, tuple)) and name not in covered:
            axes.append((name, list(value)))
            del hps[name]
        elif scalar_job_hp and isinstance(value, (list, tuple)):
            del hps[name]  # the explicit iterator wins
    return axes


def _preflight(job: Job, spec: SweepSpec) -> None:
    """Call the batch function once, before training, so a broken one fails the sweep early."""
    gen = torch.Generator().manual_seed(0)
    try:
        fn = spec.make_batch_fn(
            bsz=job.hp.N_SAMPLES, gen=gen, X=None, y=None, job_values=job.values
        )
        X, y = fn(job.trial)
    except SweepError:
        raise
    except Exception as err:
        raise SweepError(
            f"the batch function failed on the first job ({job.label()}): "
            f"{type(err).__name__}: {err}"
        ) from err
    check_batch(X, y, job.hp.N_SAMPLES, f"batch function, first job ({job.label()})")


def plan(
    iterators: Sequence[Iterable],
    iterator_names: Sequence[str],
    global_config: Mapping[str, Any] | argparse.Namespace,
    bfn_config: Mapping[str, Any] | None,
) -> tuple[list[str], list[list], list[Job], SweepSpec]:
    """Resolve and validate the whole sweep: (axes, axis values, jobs, shared spec)."""
    hps, user = H.split_config(_as_dict(global_config))
    names = list(iterator_names)
    values = materialize(iterators, names)
    for name, extra_values in _list_valued_axes(hps, names):
        names.append(name)
        values.append(extra_values)
    jobs = build_jobs(values, names, hps)
    spec = SweepSpec.from_configs(bfn_config, user)
    _preflight(jobs[0], spec)
    return names, values, jobs, spec


def main(
    iterators: Sequence[Iterable],
    iterator_names: Sequence[str],
    global_config: Mapping[str, Any] | argparse.Namespace,
    bfn_config: Mapping[str, Any] | None = None,
    *,
    use_mp: bool | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> Result:
    """Train the cartesian product of ``iterators`` and return the labelled result.

    ``global_config``: hyperparameters (see ``modelscape.HParams``) plus your own keys, which
    reach batch functions and grabs; ``otherreturns`` holds grabs, ``X_te``/``y_te`` a fixed test
    set. ``bfn_config``: ``{"base_bfn": fn, **static_kwargs}`` or ``{"bfn_file", "bfn_name"}``.
    ``use_mp=False`` (the original's flag) trains in this process.
    """
    names, values, jobs, spec = plan(iterators, iterator_names, global_config, bfn_config)
    sweep_hp = jobs[0].hp
    device = resolve_device(sweep_hp.DEVICES[0])
    if sweep_hp.DEVICES[0] != "cpu" and device.type == "cpu":
        print(
            f"modelscape: CUDA is not available; DEVICES={sweep_hp.DEVICES} runs on the CPU.",
            file=sys.stderr,
        )
    if executor is None:
        executor = InProcessExecutor(device)
    store = MemoryStore()
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress, dynamic_ncols=True)
    failures = 0

    def on_record(record: JobRecord) -> None:
        nonlocal failures
        store.add(record)
        failures += record.status == "failed"
        bar.update(1)
        bar.set_postfix(
            failed=failures,
            train=f"{record.train_loss:.3g}",
            test=f"{record.test_loss:.3g}",
            refresh=False,
        )

    try:
        executor.run([[job] for job in jobs], spec, on_record)
    finally:
        bar.close()
    records = [store.get(job.key) for job in jobs]
    result = Result(
        names,
        values,
        [r for r in records if r is not None],
        only_thresholds=sweep_hp.ONLYTHRESHOLDS,
        config={"LOSS_CHECKPOINTS": sweep_hp.LOSS_CHECKPOINTS},
    )
    _report_failures(result)
    return result


def _report_failures(result: Result) -> None:
    failed = result.failed
    if not failed:
        return
    lines = [f"modelscape: {len(failed)} of {len(result.records)} jobs failed:"]
    for r in failed[:10]:
        lines.append(f"  {dict(zip(result.axes, r.key))}: {r.error}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more (see result['errors']).")
    print("\n".join(lines), file=sys.stderr)
