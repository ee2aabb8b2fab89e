"""Refill (REFILL=True): jobs that wait join a running stack in the rows of jobs that exited.

A job's numbers must not depend on when it joined: bit for bit those of the same job trained
from the start of a stack, and its one-job run's to float rounding (timekeys exactly).
"""

import numpy as np
import pytest
import torch
from sweeps import assert_same, quadratic_bfn, reference

from modelscape import engine, load, run_sweep
from modelscape.engine.stacked import grouping
from modelscape.engine.stacked.optimizers import StackedAdam
from modelscape.engine.stacked.stack import Layout, Stack
from modelscape.runner import plan
from modelscape.store.checkpoints import Checkpoints

CPU = torch.device("cpu")

BASE = {
    "WIDTH": 16,
    "DEPTH": 2,
    "N_SAMPLES": 32,
    "N_TEST": 100,
    "MAX_ITER": 400,
    "OPTIMIZER": "Adam",
    "LOSS_CHECKPOINTS": [0.9, 0.4],
    "DTYPE": "float64",
    "DEVICES": ["cpu"],
}
# exit steps spread widely: the fast jobs free rows early, the slow ones keep theirs
AXES = {"trial": range(3), "LR": [0.003, 0.01, 0.03]}


class Tanh(torch.nn.Module):
    """A user model: its stack takes the torch.func kernel."""

    def __init__(self, d_in, d_out, width):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.Tanh())
        self.head = torch.nn.Linear(width, d_out)

    def forward(self, x):
        return self.head(self.body(x))


def make_jobs(**overrides):
    config = {**BASE, **overrides}
    _, _, jobs, spec = plan(list(AXES.values()), list(AXES), config, {"base_bfn": quadratic_bfn})
    return jobs, spec


def stream(jobs, spec, width, checkpoints=None):
    """Every job's record from one stream ``width`` jobs wide."""
    (group,) = engine.group_jobs(jobs, spec=spec)
    out = {}
    for record in engine.train_stacked(group, spec, CPU, checkpoints, width=width):
        assert record.trained_by == "stacked", (record.trained_by, record.error)
        out[record.key] = record
    return out


def assert_identical(a, b):
    """The same numbers, bit for bit."""
    assert set(a) == set(b)
    for key, r in a.items():
        g = b[key]
        assert (g.status, g.steps) == (r.status, r.steps), key
        np.testing.assert_array_equal(g.timekeys, r.timekeys)
        assert g.train_loss == r.train_loss and g.test_loss == r.test_loss, key
        for name in r.curves or {}:
            np.testing.assert_array_equal(g.curves[name], r.curves[name])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"ONLINE": True, "CENTER": True, "ONLYTHRESHOLDS": False, "EVAL_EVERY": 25},
        {"OPTIMIZER": "SGD", "MOMENTUM": 0.9, "OPTIMIZER_KWARGS": {"dampening": 0.3}},
        {"MODEL_CLASS": Tanh, "ONLINE": True, "N_SAMPLES": 16},  # the torch.func kernel
    ],
    ids=["adam-offline", "adam-online-curves", "sgd-dampened-momentum", "user-model"],
)
def test_joined_job_equals_a_stack_start_and_its_one_job_run(overrides):
    jobs, spec = make_jobs(**overrides)
    whole = stream(jobs, spec, width=len(jobs))  # every job from the start of one stack
    steps = sorted(r.steps for r in whole.values())
    assert steps[-1] >= 4 * steps[0]  # exits spread: rows free up early
    assert all(r.joined_at is None for r in whole.values())
    refilled = stream(jobs, spec, width=3)
    joined = [r.joined_at for r in refilled.values() if r.joined_at is not None]
    assert len(joined) == len(jobs) - 3 and len(set(joined)) >= 2 and min(joined) > 0
    assert_identical(whole, refilled)
    assert_same(reference(jobs, spec), refilled, tol=1e-9)


def test_adam_bias_correction_is_per_row():
    """Rows at their own step 0 and step 5 in one Adam step: each as torch's Adam."""
    gen = torch.Generator().manual_seed(0)  # not the global generator other tests move
    lr, grads = 0.01, torch.randn(6, 2, 3, dtype=torch.float64, generator=gen)
    p0 = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    torch_params = [p0[r].clone().requires_grad_() for r in range(2)]
    torch_opts = [torch.optim.Adam([p], lr=lr) for p in torch_params]
    for k in range(5):  # row 0 takes five steps before row 1 joins
        torch_params[0].grad = grads[k, 0].clone()
        torch_opts[0].step()

    class Job:
        pass

    stack_opt = StackedAdam.__new__(StackedAdam)
    stack_opt.values = {
        k: [[v, v]] for k, v in zip(StackedAdam.settings, (lr, 0.9, 0.999, 1e-8, 0))
    }
    stack_opt.trained, stack_opt.flags, stack_opt._cache = [0], {"decoupled": False}, None
    state = torch_opts[0].state[torch_params[0]]
    params = [torch.stack([torch_params[0].detach().clone(), p0[1].clone()])]
    slots = {
        "exp_avg": [torch.stack([state["exp_avg"].clone(), torch.zeros(3, dtype=torch.float64)])],
        "exp_avg_sq": [torch.stack([state["exp_avg_sq"], torch.zeros(3, dtype=torch.float64)])],
    }
    # the stack's step 5 is row 0's sixth step and row 1's first: offsets 0 and 5
    stack = Stack([0, 1], params, slots, {}, {}, {}, Layout([1, 1], [True, True]), [0, 5])
    stack_opt.step(stack, [grads[5]], 5)
    for r in range(2):
        torch_params[r].grad = grads[5, r].clone()
        torch_opts[r].step()
        # torch's fused kernel and its loop may round apart; a shared step count would not be
        # near (the bias corrections of steps 1 and 6 differ by a factor of about 5)
        torch.testing.assert_close(params[0][r], torch_params[r].detach(), rtol=1e-12, atol=0)
    # Adam's first step moves each entry by lr (bias-corrected); a shared count of 6 would not
    moved = (params[0][1] - p0[1]).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-6, atol=0)


class Killed(BaseException):
    """The process "dies" here."""


class KilledMidSave(Checkpoints):
    """Checkpoints whose process dies once one save of a stack's rows holds different steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = {}  # key -> step, of the rows saved since a key came round again

    def save(self, key, state):
        super().save(key, state)
        self.rows = {} if key in self.rows else self.rows
        self.rows[key] = state["step"]
        if len(set(self.rows.values())) >= 2:
            raise Killed


def test_checkpoint_with_rows_at_different_steps_resumes_to_the_same_result(tmp_path):
    jobs, spec = make_jobs()
    whole = stream(jobs, spec, width=len(jobs))
    ckpt = KilledMidSave(tmp_path, every_seconds=0.0)  # save at every window end
    (group,) = engine.group_jobs(jobs, spec=spec)
    finished = {}
    with pytest.raises(Killed):
        for record in engine.train_stacked(group, spec, CPU, ckpt, width=3):
            finished[record.key] = record
    rest = [job for job in jobs if job.key not in finished]
    saved = [ckpt.load(job.key) for job in rest]
    assert len({state["step"] for state in saved if state is not None}) >= 2  # joined rows
    resumed = Checkpoints(tmp_path, every_seconds=0.0)
    for record in engine.train_stacked(rest, spec, CPU, resumed, width=3):
        finished[record.key] = record
    assert_identical(whole, finished)


def test_sweep_with_refill_equals_sweep_without(monkeypatch, tmp_path):
    monkeypatch.setattr(grouping, "MAX_GROUP", 3)
    iterators, names = [list(AXES["trial"]), AXES["LR"]], ["trial", "LR"]
    config = {**BASE, "BATCHED": "on"}
    results = {}
    for refill in (False, True):
        run_dir = tmp_path / str(refill)
        cfg = {**config, "REFILL": refill, "SAVE_DIR": str(run_dir)}
        run_sweep(iterators, names, cfg, {"base_bfn": quadratic_bfn}, progress=False)
        results[refill] = {r.key: r for r in load(run_dir).records}  # as the run folder has it
    assert all(r.trained_by == "stacked" for r in results[True].values())
    assert all(r.joined_at is None for r in results[False].values())
    assert sum(r.joined_at is not None for r in results[True].values()) == 6
    assert_identical(results[False], results[True])
