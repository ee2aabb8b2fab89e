"""A job's identity comes from exact values, and every random generator is seeded per job.

Axis values whose exact identity cannot be established (tensors, NaN, values one trace key
cannot tell apart) are refused before training; values that can (Python numbers, numpy scalars)
give each job its own seed, stored row and trace key, which ``load()``, ``to_xarray()`` and the
traces all give back exactly. A batch function drawing from ``np.random`` or ``random`` gets the
same numbers on every run, on any number of workers, in any job order.
"""

import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from sweeps import config

from modelscape import SweepError, load, run_sweep
from modelscape.data.data import get_powerlaw_target
from modelscape.sweep.jobs import job_seed


def scaled_bfn(bsz, gen, X=None, y=None, scale=1.0, **kwargs):
    """x0 * x1 times the job's ``scale``: jobs of nearly equal scales differ in their losses."""

    def batch_fn(step):
        Xb = torch.randn(bsz, 5, generator=gen)
        return Xb, scale * Xb[:, 0] * Xb[:, 1]

    return batch_fn


def sweep(values, name="scale", bfn=scaled_bfn, **overrides):
    return run_sweep([values], [name], config(**overrides), {"base_bfn": bfn}, progress=False)


def test_seeds_of_ordinary_values_are_unchanged():
    # pinned from the release before exact identities: existing run folders keep resuming
    assert job_seed(0, ["trial", "GAMMA", "target"], [1, 0.1, "a"]) == 175064296375662450
    assert job_seed(3, ["x"], [(1, 2.5)]) == 2797188436916120583
    assert job_seed(0, ["GAMMA"], [np.float64(0.1)]) == job_seed(0, ["GAMMA"], [0.1])


@pytest.mark.parametrize(
    "values, fix",
    [
        (list(torch.tensor([1.00001, 1.3, 1.00004])), "x.item()"),
        ([torch.ones(3), torch.zeros(3)], "tuple(t.tolist())"),
        ([np.ones(3)], "tuple(a.tolist())"),
        ([np.array(2.0)], "x.item()"),
        ([(1, torch.tensor(2.0))], "x.item()"),
        ([{"w": 1.0}, {"w": 2.0}], "tuple(sorted(d.items()))"),  # unhashable, key order
    ],
)
def test_values_without_an_exact_identity_are_refused_before_training(tmp_path, values, fix):
    save_dir = tmp_path / "run"
    with pytest.raises(SweepError, match="scale") as err:
        sweep(values, SAVE_DIR=str(save_dir), WORKERS_PER_DEVICE=2)
    assert fix in str(err.value)
    assert not save_dir.exists()  # refused before the run folder was made


def test_nearly_equal_floats_keep_their_own_seed_row_and_trace_key_on_workers(tmp_path):
    values = torch.tensor([1.00001, 1.3, 1.00004]).tolist()  # the fix the refusal names
    assert repr(torch.tensor(values[0])) == repr(torch.tensor(values[2]))
    save_dir = tmp_path / "run"
    result = sweep(values, SAVE_DIR=str(save_dir), WORKERS_PER_DEVICE=2, MAX_ITER=30)
    stored = load(save_dir)
    seeds = {v: result.record(v).seed for v in values}
    assert len(set(seeds.values())) == 3
    losses = {v: result.record(v).test_loss for v in values}
    assert len(set(losses.values())) == 3  # each job trained on its own scale
    ds = stored.to_xarray()
    for v in values:
        assert stored.record(v).seed == seeds[v]
        assert stored.record(v).test_loss == losses[v]
        assert stored["losses"]["config2outcome"][(v,)] == losses[v]
        assert float(ds["test_loss"].sel(scale=v)) == losses[v]
        assert int(ds["seed"].sel(scale=v)) == seeds[v]
    assert list(ds["status"].values) == ["ok"] * 3


def test_values_with_one_trace_key_are_refused():
    with pytest.raises(SweepError, match=r"None.*'None'.*str\(\)"):
        sweep([None, "None"], name="target")


def test_none_and_a_string_label_stay_distinct_in_traces_and_xarray(tmp_path):
    result = sweep([None, "none"], name="target", SAVE_DIR=str(tmp_path / "run"), MAX_ITER=20)
    stored = load(tmp_path / "run")
    for r in (result, stored):
        assert set(r["losses"]["config2outcome"]) == {("None",), ("none",)}
        assert list(r.to_xarray()["status"].values) == ["ok", "ok"]
    assert stored.record(None).test_loss == result.record(None).test_loss


@pytest.mark.parametrize(
    "values",
    [[math.nan], [0.5, float("nan")], [float("nan"), float("nan")], [np.float32("nan")]],
)
def test_nan_axis_values_are_refused_before_training(tmp_path, values):
    save_dir = tmp_path / "run"
    with pytest.raises(SweepError, match="NaN.*the string 'nan'"):
        sweep(values, SAVE_DIR=str(save_dir), WORKERS_PER_DEVICE=2)
    assert not save_dir.exists()


def numpy_drawing_bfn(bsz, gen, X=None, y=None, **kwargs):
    """Inputs from ``gen``; the target's signs from ``np.random`` (modelscape.data's powerlaw
    target) and a shift from ``random``, as research batch functions often do."""
    Xb = torch.randn(bsz, 6, generator=gen, dtype=torch.float64)
    target = get_powerlaw_target(Xb.numpy(), source_exp=2.0) + random.random()
    Xb, yb = Xb.float(), torch.as_tensor(target, dtype=torch.float32)
    return lambda step: (Xb, yb)


@pytest.mark.parametrize("batched", ["auto", "off"])
def test_numpy_and_python_generators_are_seeded_per_job(batched):
    def run(trials, workers):
        np.random.seed(len(trials) * 7 + workers)  # the caller's states must not matter
        random.seed(workers)
        result = sweep(trials, name="trial", bfn=numpy_drawing_bfn, ONLINE=False,
                       BATCHED=batched, MAX_ITER=20, WORKERS_PER_DEVICE=workers)  # fmt: skip
        return {t: result.record(t).test_loss for t in trials}

    first = run([0, 1, 2, 3], 1)
    assert len(set(first.values())) == 4
    assert run([3, 2, 1, 0], 2) == first  # bit-identical, in another order, on 2 workers
    assert run([0, 1, 2, 3], 1) == first


def test_a_sweep_leaves_the_callers_generators_where_they_were():
    np.random.seed(5)
    random.seed(5)
    sweep([0, 1], name="trial", bfn=numpy_drawing_bfn, ONLINE=False, MAX_ITER=5)
    after = np.random.random(), random.random()
    np.random.seed(5)
    random.seed(5)
    assert after == (np.random.random(), random.random())


def online_numpy_bfn(bsz, gen, X=None, y=None, **kwargs):
    """Every step's batch from ``np.random``, with noise from ``random``: no ``gen`` at all."""

    def batch_fn(step):
        Xb = torch.as_tensor(np.random.standard_normal((bsz, 5)), dtype=torch.float32)
        return Xb, Xb[:, 0] * Xb[:, 1] + random.gauss(0.0, 0.1)

    return batch_fn


def test_online_draws_from_numpy_are_per_job_in_a_stack_and_alone(tmp_path):
    def run(trials, workers, batched, **extra):
        np.random.seed(workers)
        result = sweep(trials, name="trial", bfn=online_numpy_bfn, BATCHED=batched,
                       MAX_ITER=40, WORKERS_PER_DEVICE=workers, **extra)  # fmt: skip
        return {t: result.record(t) for t in trials}

    stacked = run([0, 1, 2, 3], 1, "auto")
    assert {r.trained_by for r in stacked.values()} == {"stacked"}
    assert len({r.test_loss for r in stacked.values()}) == 4
    # two stacks of two on two workers, in another order: bit-identical
    again = run([3, 2, 1, 0], 2, "auto", SAVE_DIR=str(tmp_path / "run"))
    stored = load(tmp_path / "run")
    for t, r in stacked.items():
        assert again[t].test_loss == r.test_loss == stored.record(t).test_loss
        assert again[t].train_loss == r.train_loss
    # the one-job loop draws the same batches: equal up to the engines' float rounding
    alone = run([0, 1, 2, 3], 1, "off")
    for t, r in stacked.items():
        assert abs(alone[t].test_loss - r.test_loss) <= 1e-5 * abs(r.test_loss)


# An online batch function drawing from np.random that SIGKILLs its own process at step 45 of
# trial 1, once a checkpoint has been written (only where RELIABILITY_KILL is set).
NUMPY_DATA = """
import os, random, signal
import numpy as np
import torch

def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
    def batch_fn(step):
        if os.environ.get("RELIABILITY_KILL") and trial == 1 and step == 45:
            os.kill(os.getpid(), signal.SIGKILL)
        Xb = torch.as_tensor(np.random.standard_normal((bsz, 5)), dtype=torch.float32)
        return Xb, Xb[:, 0] * Xb[:, 1] + random.gauss(0.0, 0.1)

    return batch_fn
"""
NUMPY_SWEEP = """
import sys
from modelscape import base_args, run_sweep

DATA, SAVE_DIR, BATCHED = sys.argv[1:]
cfg = vars(base_args(WIDTH=16, MAX_ITER=60, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
                     LOSS_CHECKPOINTS=[1e-9], BATCHED=BATCHED, SAVE_DIR=SAVE_DIR,
                     CHECKPOINT_EVERY=1e-9))
run_sweep([[0, 1, 2]], ["trial"], cfg, {"bfn_file": DATA, "bfn_name": "bfn"}, progress=False)
"""


@pytest.mark.parametrize("batched", ["off", "auto"])
def test_a_job_drawing_from_numpy_resumes_from_its_checkpoint_bit_identically(tmp_path, batched):
    data, script = tmp_path / "numpy_data.py", tmp_path / "numpy_sweep.py"
    data.write_text(NUMPY_DATA)
    script.write_text(NUMPY_SWEEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "run"),
                             batched], env={**env, "RELIABILITY_KILL": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert list((tmp_path / "run" / "checkpoints").glob("trial=1*.pt"))
    for run in ("run", "reference"):
        done = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / run),
                               batched], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        if run == "run":
            assert "resuming job (trial=1) from its checkpoint at step" in done.stderr
    resumed, reference = load(tmp_path / "run"), load(tmp_path / "reference")
    for t in (0, 1, 2):
        assert resumed.record(t).status == "ok"
        assert resumed.record(t).test_loss == reference.record(t).test_loss
        assert resumed.record(t).train_loss == reference.record(t).train_loss
