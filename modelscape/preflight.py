"""Everything a sweep checks before it trains, by building what the jobs will build.

``check_sweep`` runs before the run folder opens: the executor's own checks, one call of the
batch function (for the training batch and the test set), the targets against the loss, and
each distinct model, optimizer and parametrization built once (on the meta device). It returns
the shapes of one sample of the training batch, from which the stacked engine sizes stacks.
``grab_shapes`` runs once the run folder exists (a grab may read it): each grab is called once
on the first job's initial model, and its shape is what every job's grab must return.

The checks that need no model live with the sweep's definition (``sweep/checks.py``,
``sweep/spec.py``); these build models and jobs through the engine, so they sit above it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelscape.engine.optimizer import check_optimizer_lookalikes, optimizer_kwargs
from modelscape.engine.setup import (
    evaluate_grabs,
    job_config,
    kept_global_rngs,
    model_spec,
    output_dim,
    resolve_class,
    seeded_global_rng,
    setup_job,
    training_rng_seed,
)
from modelscape.errors import SweepError
from modelscape.execution import executor_class
from modelscape.models import parametrize
from modelscape.sweep.checks import check_finite, check_targets
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SampleShapes, SweepSpec, check_batch, check_input_dim


def check_sweep(jobs: Sequence[Job], spec: SweepSpec) -> SampleShapes:
    """Before training: the executor accepts the settings, the batch function runs once, and
    every distinct model, optimizer and parametrization of the sweep can be built, so that bad
    input fails before the first job starts. Returns one training sample's shapes (the first
    job's), for ``SweepSpec.sample_shapes``."""
    executor_class(jobs[0].hp.EXECUTOR).check(jobs[0].hp)
    gen = torch.Generator().manual_seed(0)
    # the probe must not move the caller's global RNGs (a batch function may draw from them)
    with kept_global_rngs(torch.device("cpu")):
        return _probe(jobs, spec, gen)


def _probe(jobs: Sequence[Job], spec: SweepSpec, gen: torch.Generator) -> SampleShapes:
    job = jobs[0]
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
    check_finite(X, y, f"the batch function's training batch, first job ({job.label()})")
    check_input_dim(job.hp.D_IN, X)
    if spec.X_te is None:
        X_te, y_te = spec.make_batch_fn(
            bsz=job.hp.N_TEST, gen=gen, X=None, y=None, job_values=job.values
        )(0)
        check_batch(
            X_te, y_te, job.hp.N_TEST,
            "the test set (the batch function with bsz=N_TEST): honour bsz, or give a fixed test "
            "set as X_te/y_te in global_config",
        )  # fmt: skip
        check_finite(X_te, y_te, f"the test set (bsz=N_TEST), first job ({job.label()})")
    else:
        check_finite(spec.X_te, spec.y_te, "the fixed test set X_te/y_te of global_config")
    seen = set()
    for job in jobs:
        hp = job.hp
        combo = (repr(hp.MODEL_CLASS), hp.PARAMETRIZATION, repr(hp.OPTIMIZER), repr(hp.LOSS))
        if combo not in seen:
            seen.add(combo)
            check_targets(hp.LOSS, y, f"the batch function, job ({job.label()})")
            check_model(job, spec, X, y)
    return SampleShapes.of(X, y)


def check_model(job: Job, spec: SweepSpec, X: torch.Tensor, y: torch.Tensor) -> None:
    """Before training: the model can be built and its parametrization applies.

    The model is built on the meta device (no memory, no random numbers). A constructor that
    cannot run there is left for the job itself to report.
    """
    config = job_config(job, spec)
    model_cls, kwargs = model_spec(job, config, tuple(X.shape[1:]), output_dim(y, job.hp.D_OUT)[0])
    opt_cls = resolve_class(job.hp.OPTIMIZER, torch.optim, "OPTIMIZER")
    optimizer_kwargs(opt_cls, job)
    check_optimizer_lookalikes(opt_cls, spec, model_cls)
    resolve_class(job.hp.LOSS, nn, "LOSS")
    _check_input_dtype(job, model_cls, kwargs, X)
    if job.hp.PARAMETRIZATION == "sp":
        return
    try:
        with torch.device("meta"):
            model = model_cls(**kwargs)
    except Exception:  # noqa: BLE001 - the job reports a real construction error itself
        return
    try:
        parametrize.check_applicable(model, job.hp.PARAMETRIZATION, opt_cls)
    except parametrize.ParametrizationError as err:
        raise SweepError(f"job ({job.label()}): {err}") from None


def _check_input_dtype(job: Job, model_cls: type, kwargs: dict[str, Any], X: torch.Tensor) -> None:
    """Integer inputs reach the model as they are (only floating data takes DTYPE), and a model
    of float weights cannot take them. Only then is the model built for real, once, on the CPU,
    and run on two samples; an error that a float X does not raise is reported with the fix."""
    if X.is_floating_point() or X.is_complex():
        return
    dtype = getattr(torch, job.hp.DTYPE)
    with kept_global_rngs(torch.device("cpu")), torch.no_grad():
        try:
            model = model_cls(**kwargs).to(dtype)
            model(X[:2])
            return
        except Exception as err:  # noqa: BLE001 - reported below if the dtype is the cause
            error = f"{type(err).__name__}: {err}"
        try:
            model(X[:2].to(dtype))
        except Exception:  # noqa: BLE001 - not the dtype: the job reports its own error
            return
    raise SweepError(
        f"the batch function returns X of dtype {X.dtype}, but the model of job ({job.label()}) "
        f"computes in {job.hp.DTYPE} and fails on it ({error}). Return X.float() from the "
        "batch function (integer X is passed to the model as it is)."
    )


def grab_shapes(job: Job, spec: SweepSpec) -> dict[str, tuple[int, ...]]:
    """Set up ``job`` on the CPU and call every grab once, before any training.

    Returns each grab's shape, which every job's grab must then return. A grab that raises or
    returns a non-number is a ``SweepError`` naming it. ``post_init_fn`` is left out, so that it
    runs once per job; a job that cannot be set up is left to fail as its own record.
    """
    device = torch.device("cpu")
    with seeded_global_rng(training_rng_seed(job), device):
        try:
            problem = setup_job(job, dataclasses.replace(spec, post_init_fn=None), device)
            X, y, _ = problem.batch(0 if problem.batch_fn is not None else job.trial)
        except Exception:  # noqa: BLE001 - the job reports its own setup error when it runs
            return {}
        shapes = {}
        for name, fn in spec.grabs.items():
            one = dataclasses.replace(problem, grabs={name: fn}, grab_shapes={})
            try:
                shapes[name] = evaluate_grabs(one, X, y, 0)[name].shape
            except Exception as err:  # noqa: BLE001 - reported with the grab's name
                raise SweepError(
                    f"grab {name!r} failed when called on the first job ({job.label()}) before "
                    "training (each grab is called once with the initial model to check it): "
                    f"{type(err).__name__}: {err}"
                ) from err
    return shapes
