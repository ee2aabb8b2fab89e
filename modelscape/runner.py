"""The orchestrator of a sweep: ``main(iterators, iterator_names, global_config, ...)``.

A sweep flows: ``plan`` (resolve every job's hyperparameters and validate them, then a
preflight that calls the batch function and builds each distinct model once) -> open the store
(resuming SAVE_DIR) -> group the unfinished jobs for stacking and balance the groups over the
workers -> the executor trains them, streaming each record into the store and the progress bar
-> a ``Result`` whose keys are the original's (``jobs``, ``var_axes``, ``losses``,
``train_losses``, ``timekeys``, ``extras``, ``errors``), each trace in expt-core's serialized
form. Failures and jobs that could not train stacked are reported once, at the end.

``modelscape.backend.job_iterator.main`` (the original's API) and ``modelscape.run_sweep`` are
this ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from modelscape import preflight
from modelscape.engine import group_jobs
from modelscape.errors import StoreError, SweepError
from modelscape.execution.base import Executor, executor_for
from modelscape.execution.local import one_at_a_time, workers_hint, workers_per_device
from modelscape.execution.progress import Progress, notice, placement_text
from modelscape.results.records import TrainedBy
from modelscape.results.result import JobRecord, Result
from modelscape.store import MemoryStore, RunStore, Store, describe_sweep, key_id
from modelscape.store.describe import CODE_SECTION
from modelscape.sweep import hparams as H
from modelscape.sweep.code_identity import describe_code
from modelscape.sweep.jobs import Job, axis_target, build_jobs, lookalike_axis, materialize
from modelscape.sweep.legacy_names import LEGACY_AXES
from modelscape.sweep.spec import SweepSpec


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
    """Job hyperparameters given several values (``--GAMMA 0.1 1 10``) become sweep axes;
    one value in a list (the original's ``N_SAMPLES=[1024]``) is that value."""
    covered = {axis_target(n) for n in names}
    axes = []
    for name, value in list(hps.items()):
        scalar_job_hp = H.FIELDS[name].metadata["scope"] == "job" and H.kind_of(name) != "list"
        if scalar_job_hp and isinstance(value, (list, tuple)) and len(value) == 1:
            hps[name] = value[0]
        elif scalar_job_hp and isinstance(value, (list, tuple)) and name not in covered:
            axes.append((name, list(value)))
            del hps[name]
        # a list for a hyperparameter an iterator sets stays: build_jobs reports it as unused
    return axes


def _check_lookalike_axes(names: Sequence[str], spec: SweepSpec) -> None:
    """An axis named like a hyperparameter but not exactly (``lr``, ``GAMA``) would set nothing:
    refuse it, naming the hyperparameter, unless the batch function takes it by name."""
    listed = spec.listed_parameters() - {"bsz", "gen", "X", "y"}  # what every batch fn takes
    for name in names:
        if name in LEGACY_AXES and name not in listed:
            raise SweepError(
                f"iterator name {name!r} was the original modelscape's name of the "
                f"{LEGACY_AXES[name]!r} axis, and here it would set nothing: name the axis "
                f"{LEGACY_AXES[name]!r}."
            )
        target = lookalike_axis(name)
        if target is None:
            continue
        if name in listed:
            notice(f"axis {name!r} is your batch function's parameter; it does not set {target}.")
            continue
        raise SweepError(
            f"iterator name {name!r} is not a hyperparameter, but looks like {target}, so this "
            f"axis would set nothing: name the axis {target} to sweep it, or, for an axis of "
            f"your own, take {name!r} as a parameter of your batch function."
        )


def plan(
    iterators: Sequence[Iterable],
    iterator_names: Sequence[str],
    global_config: Mapping[str, Any] | argparse.Namespace,
    bfn_config: Mapping[str, Any] | None,
) -> tuple[list[str], list[list], list[Job], SweepSpec]:
    """Resolve and validate the whole sweep: (axes, axis values, jobs, shared spec)."""
    hps, user = H.split_config(_as_dict(global_config))
    spec = SweepSpec.from_configs(bfn_config, user)
    names = list(iterator_names)
    values = materialize(iterators, names)
    _check_lookalike_axes(names, spec)
    for name, extra_values in _list_valued_axes(hps, names):
        names.append(name)
        values.append(extra_values)
    jobs = build_jobs(values, names, hps)
    spec.sample_shapes = preflight.check_sweep(jobs, spec)
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

    Where jobs run follows EXECUTOR, DEVICES and WORKERS_PER_DEVICE: one worker in total trains
    in this process, several are worker processes (or Ray tasks). ``use_mp=False`` (the
    original's flag) forces this process, ``use_mp=True`` worker processes.

    With SAVE_DIR set, every finished job is stored there as it completes; rerunning the same
    sweep skips finished jobs (and failed ones unless RETRY_FAILED) and continues killed jobs
    from their checkpoints. The returned result holds every job of this sweep.
    """
    names, values, jobs, spec = plan(iterators, iterator_names, global_config, bfn_config)
    hp = jobs[0].hp
    store = _open_store(hp, names, values, jobs, spec)
    trained_by: Counter[str] = Counter()
    hint = None
    try:
        if spec.grabs:  # once the run folder exists: a grab may read it
            spec.grab_shapes = preflight.grab_shapes(jobs[0], spec)
        todo = _unfinished(jobs, store, hp.RETRY_FAILED)
        if todo:
            groups = group_jobs(todo, spec=spec) if hp.BATCHED != "off" else [[j] for j in todo]
            if executor is None:
                workers = workers_per_device(hp, groups, spec)  # "auto" decided here
                hp_run = dataclasses.replace(hp, WORKERS_PER_DEVICE=workers)
                executor = executor_for(hp_run, use_mp=use_mp, checkpoints=store.checkpoints)
                hint = workers_hint(hp, groups, spec) if use_mp is None else None
            trained_by = _train(groups, spec, hp, executor, store, len(todo), len(jobs), progress)
        records = [store.get(job.key) for job in jobs]
    finally:
        store.close()
    result = Result(
        names,
        values,
        [r for r in records if r is not None],
        only_thresholds=hp.ONLYTHRESHOLDS,
        config={"LOSS_CHECKPOINTS": hp.LOSS_CHECKPOINTS, "EVAL_EVERY": hp.EVAL_EVERY},
        grab_names=list(spec.grabs),
    )
    if hp.BATCHED != "off":
        _report_unstacked(trained_by)
    if hint:
        notice(hint)
    _report_failures(result)
    return result


def _train(
    groups: list[list[Job]],
    spec: SweepSpec,
    hp: H.HParams,
    executor: Executor,
    store: Store,
    todo: int,
    total: int,
    progress: bool,
) -> Counter[str]:
    """Train ``groups`` (``todo`` jobs) on ``executor``, storing each record as it arrives; how
    the jobs trained (``JobRecord.trained_by`` counts)."""
    placement = executor.placement()
    if executor.shares_out_pairs:
        groups = balance(groups, len(placement), lambda g: one_at_a_time(g, hp, spec))
    else:
        groups = balance(groups, len(placement))
    bar = Progress(total, total - todo, placement_text(placement), enabled=progress)
    trained_by: Counter[str] = Counter()

    def on_record(record: JobRecord) -> None:
        store.add(record)  # then clears the job's checkpoint
        trained_by[record.trained_by] += 1
        bar.update(record)

    try:
        executor.run(groups, spec, on_record)
    except KeyboardInterrupt:
        bar.close()
        where = (
            f"stored in SAVE_DIR={hp.SAVE_DIR}; rerun the same sweep to continue"
            if hp.SAVE_DIR is not None
            else "lost (set SAVE_DIR to keep results across interruptions)"
        )
        print(f"\nmodelscape: interrupted; the jobs finished so far are {where}.", file=sys.stderr)
        raise
    except StoreError as err:
        if not isinstance(store, RunStore) or not store.in_place():
            raise
        raise StoreError(f"{err}\nThe sweep stopped: {_stored(store)}.") from err
    finally:
        bar.close()
    return trained_by


def _stored(store: RunStore) -> str:
    """How many finished jobs a run folder holds, for the message of a sweep that stopped."""
    try:
        return f"{store.count()} finished jobs are stored in {store.run_dir}"
    except StoreError:
        return f"the jobs stored in {store.run_dir} so far are kept"


def balance(
    groups: list[list[Job]],
    n_workers: int,
    alone: Callable[[list[Job]], bool] = lambda group: False,
) -> list[list[Job]]:
    """Split the largest groups until every worker has one (a group trains on one worker), and
    none holds more than a worker's share of the jobs (a REFILL group is a whole stream).

    Halves keep at least two jobs: a job alone trains in the one-job loop, whose rounding differs
    from the stacked engine's, so splitting off a single job would make results depend on the
    number of workers. A group that trains one job at a time anyway (``alone``) is split into
    pairs, so that workers share them out as they finish (a pair, not a single job, still says
    why its jobs did not stack).
    """
    if n_workers > 1:
        groups = [part for g in groups for part in (_pairs(g) if alone(g) else [g])]
    groups = [list(g) for g in groups]
    share = -(-sum(map(len, groups)) // max(1, n_workers))
    while n_workers > 1:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]), default=None)
        if largest is None or len(groups[largest]) < 4:
            break
        if len(groups) >= n_workers and len(groups[largest]) <= share:
            break
        group = groups.pop(largest)
        half = (len(group) + 1) // 2
        groups[largest:largest] = [group[:half], group[half:]]
    return groups


def _pairs(group: list[Job]) -> list[list[Job]]:
    """``group`` in consecutive pairs, the last three when it has an odd number (>= 2) of jobs."""
    if len(group) < 4:
        return [group]
    parts = [group[i : i + 2] for i in range(0, len(group) - len(group) % 2, 2)]
    if len(group) % 2:
        parts[-1].append(group[-1])
    return parts


def _open_store(
    hp: H.HParams, names: list[str], values: list[list], jobs: list[Job], spec: SweepSpec
) -> Store:
    if hp.SAVE_DIR is None:
        return MemoryStore()
    description = {**describe_sweep(names, jobs, spec), CODE_SECTION: describe_code(spec, jobs)}
    return RunStore.open(hp.SAVE_DIR, description, jobs, values, hp.CHECKPOINT_EVERY)


def _unfinished(jobs: list[Job], store: Store, retry_failed: bool) -> list[Job]:
    """The jobs the store has no record of, and under RETRY_FAILED those that failed."""
    statuses = store.statuses()
    todo = []
    for job in jobs:
        status = statuses.get(key_id(job.key))
        if status is None or (status == "failed" and retry_failed):
            todo.append(job)
    return todo


def _report_unstacked(trained_by: Counter[str]) -> None:
    """Say once per sweep how many of the jobs it trained could not stack, and why."""
    total = sum(trained_by.values())
    for way, n in trained_by.most_common():
        reason = TrainedBy.of(way).reason
        if reason is not None:
            notice(f"{n} of {total} jobs trained one at a time: {reason}")


def _report_failures(result: Result) -> None:
    failed = result.failed
    if not failed:
        return
    lines = [f"{len(failed)} of {len(result.records)} jobs failed:"]
    for r in failed[:10]:
        lines.append(f"  {dict(zip(result.axes, r.key))}: {r.error}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more (see result['errors']).")
    notice("\n".join(lines))
