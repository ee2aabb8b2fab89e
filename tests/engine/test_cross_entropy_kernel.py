"""Classification on the hand-written MLP kernel: the built-in MLP with CrossEntropyLoss on
integer labels trains stacked on ``MLPKernel`` (not ``FuncKernel``), and every job's numbers
are those of its one-job run.

- whole sweeps, stacked against BATCHED="off", offline and online, CENTER on and off, GAMMA
  other than 1, under muP and NTK parametrizations;
- jobs with different N_SAMPLES in one ragged stack: per-job means by segment;
- the kernel's losses and gradients against autograd of ``nn.CrossEntropyLoss`` on each job's
  own module;
- what the kernel refuses (non-default CrossEntropyLoss settings, float targets) still trains,
  through ``FuncKernel``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sweeps import assert_same, reference
from torch import nn

from modelscape import engine, run_sweep
from modelscape.engine.stacked import kernels
from modelscape.engine.stacked.func_kernel import FuncKernel
from modelscape.engine.stacked.kernels import MLPKernel
from modelscape.engine.stacked.stack import Layout, Stack
from modelscape.runner import plan

CPU = torch.device("cpu")
CLASSES = 3

BASE = {
    "WIDTH": 16,
    "DEPTH": 2,
    "N_SAMPLES": 32,
    "N_TEST": 100,
    "MAX_ITER": 80,
    "LR": 0.5,
    "ONLINE": False,
    "LOSS": "CrossEntropyLoss",
    "D_OUT": CLASSES,
    "LOSS_CHECKPOINTS": [0.8, 0.6],
    "DTYPE": "float64",
    "DEVICES": ["cpu"],
}


def classes_bfn(bsz, gen, X=None, y=None, d=6, one_hot=False, **kwargs):
    """Gaussian inputs labelled by the largest of three fixed linear readouts (learnable)."""
    readout = torch.randn(d, CLASSES, generator=torch.Generator().manual_seed(0))

    def batch_fn(step):
        Xb = torch.randn(bsz, d, generator=gen)
        labels = (Xb @ readout).argmax(1)
        return Xb, nn.functional.one_hot(labels, CLASSES).double() if one_hot else labels

    return batch_fn


def make_jobs(overrides=None, axes=None, **bfn_options):
    axes = axes or {"trial": range(2), "GAMMA": [1.0, 0.5], "LR": [0.2, 1.0]}
    swept = {{"ntrain": "N_SAMPLES"}.get(name, name) for name in axes}
    config = {k: v for k, v in {**BASE, **(overrides or {})}.items() if k not in swept}
    bfn = {"base_bfn": classes_bfn, **bfn_options}
    _, _, jobs, spec = plan(list(axes.values()), list(axes), config, bfn)
    return jobs, spec


@pytest.fixture
def kernel_steps(monkeypatch):
    """How many steps each kernel (by its ``name``) computed while the test ran."""
    steps: Counter[str] = Counter()
    for cls in (MLPKernel, FuncKernel):

        def counted(self, *args, _original=cls.loss_and_grads, **kwargs):
            steps[self.name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "loss_and_grads", counted)
    return steps


def stacked(jobs, spec):
    out = {}
    for group in engine.group_jobs(jobs, spec=spec):
        for record in engine.train_stacked(group, spec, CPU):
            assert record.trained_by == "stacked", (record.trained_by, record.error)
            out[record.key] = record
    return out


# ----------------------------------------------------------------------------- whole sweeps


@pytest.mark.parametrize("parametrization", ["mup", "ntp"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("online", [False, True])
def test_a_classification_sweep_stacks_on_the_mlp_kernel_and_equals_its_one_job_runs(
    online, center, parametrization, kernel_steps
):
    settings = {k: v for k, v in BASE.items() if k != "LR"}
    settings.update(ONLINE=online, CENTER=center, PARAMETRIZATION=parametrization)
    axes = {"LR": [0.2, 1.0], "trial": range(2), "GAMMA": [1.0, 0.5]}
    results = {}
    for mode in ("off", "auto"):
        results[mode] = run_sweep(
            list(axes.values()),
            list(axes),
            {**settings, "BATCHED": mode},
            {"base_bfn": classes_bfn},
            progress=False,
        )
        if mode == "off":
            assert not kernel_steps  # the one-job loop uses no stacked kernel
    assert results["auto"].trained_by == Counter({"stacked": 8})
    assert kernel_steps["mlp"] > 0 and kernel_steps["torch.func"] == 0
    one_job = {r.key: r for r in results["off"].records}
    assert_same(one_job, {r.key: r for r in results["auto"].records})
    # the thresholds are crossed, at different steps: the timekeys compared above mean something
    timekeys = np.array([r.timekeys for r in one_job.values()])
    assert not np.isnan(timekeys).all() and len(np.unique(timekeys[~np.isnan(timekeys)])) >= 2


def test_float32_classification_equals_its_one_job_runs(kernel_steps):
    jobs, spec = make_jobs({"DTYPE": "float32", "CENTER": True, "OPTIMIZER": "Adam", "LR": 0.01})
    assert_same(reference(jobs, spec), stacked(jobs, spec))
    assert kernel_steps["mlp"] > 0 and kernel_steps["torch.func"] == 0


def test_bf16_mixed_classification_on_the_kernel_is_within_bf16s_tolerance_of_its_runs(
    kernel_steps,
):
    """Under PRECISION="bf16-mixed" the kernel takes its bf16 products' outputs in float32 for
    the softmax, as autocast does for torch's cross-entropy: a stacked job stays within bf16's
    tolerance (an 8-bit mantissa, 1e-2 relative) of its one-job run, and bf16 really ran."""
    overrides = {"DTYPE": "float32", "OPTIMIZER": "Adam", "LR": 0.01, "CENTER": True}
    overrides["LOSS_CHECKPOINTS"] = [0.0]  # every job runs all its steps
    jobs, spec = make_jobs({**overrides, "PRECISION": "bf16-mixed"})
    got = stacked(jobs, spec)
    assert kernel_steps["mlp"] > 0 and kernel_steps["torch.func"] == 0
    alone = reference(jobs, spec)
    fp32_jobs, fp32_spec = make_jobs(overrides)
    fp32 = reference(fp32_jobs, fp32_spec)
    for key, r in alone.items():
        assert got[key].test_loss == pytest.approx(r.test_loss, rel=1e-2), key
        assert got[key].train_loss == pytest.approx(r.train_loss, rel=1e-2), key
        assert got[key].test_loss != fp32[key].test_loss  # bf16 really ran


# ----------------------------------------------------------------------------- ragged stacks


MIXED_N = {"trial": range(2), "ntrain": [16, 48, 128], "GAMMA": [1.0, 2.0]}


def test_jobs_with_different_sample_counts_share_one_cross_entropy_stack(kernel_steps):
    jobs, spec = make_jobs({"PARAMETRIZATION": "mup", "CENTER": True}, axes=MIXED_N)
    (group,) = engine.group_jobs(jobs, spec=spec)
    assert len(group) == len(jobs)
    ref = reference(jobs, spec)
    assert len({r.steps for r in ref.values()}) >= 2
    assert_same(ref, stacked(jobs, spec))
    assert kernel_steps["mlp"] > 0 and kernel_steps["torch.func"] == 0
    # a job's numbers do not depend on the sample counts of its stack-mates, bit for bit
    mixed = {r.key: r for r in engine.train_stacked(jobs, spec, CPU)}
    for n in MIXED_N["ntrain"]:
        for record in engine.train_stacked([j for j in jobs if j.hp.N_SAMPLES == n], spec, CPU):
            other = mixed[record.key]
            assert (record.train_loss, record.test_loss, record.steps) == (
                other.train_loss,
                other.test_loss,
                other.steps,
            )
            np.testing.assert_array_equal(record.timekeys, other.timekeys)


def test_float_targets_under_cross_entropy_train_per_sample_count_through_torch_func(
    kernel_steps,
):
    """One-hot float targets: the MLP kernel refuses them (they are class probabilities), so
    the group formed across sample counts splits into one FuncKernel stack per count."""
    jobs, spec = make_jobs({"MAX_ITER": 40}, axes=MIXED_N, one_hot=True)
    assert kernels.kernel_for(engine.setup_job(jobs[0], spec, CPU)) is FuncKernel
    assert_same(reference(jobs, spec), stacked(jobs, spec))
    assert kernel_steps["torch.func"] > 0 and kernel_steps["mlp"] == 0


# ----------------------------------------------------------------------------- the kernel alone


def stack_of(problems):
    """The kernel and stack of set-up jobs (sorted by sample count), their training sets flat."""
    names = [n for n, _ in problems[0].model.named_parameters()]
    kernel = MLPKernel(problems[0], names)
    layout = Layout([p.job.hp.N_SAMPLES for p in problems], [True] * len(problems))
    params = [
        torch.stack([dict(p.model.named_parameters())[n].detach() for p in problems]) for n in names
    ]
    rows = list(range(len(problems)))
    samples = kernel.samples(problems, layout)
    stack = Stack(rows, params, {}, {}, {}, samples, layout, [0] * len(rows))
    f0 = None if problems[0].f0_tr is None else torch.cat([p.f0_tr for p in problems])
    data = torch.cat([p.X_tr for p in problems]), torch.cat([p.y_tr for p in problems]), f0
    return kernel, stack, data


@pytest.mark.parametrize(
    "overrides",
    [
        {"PARAMETRIZATION": "mup", "CENTER": True},
        {"PARAMETRIZATION": "ntp", "BIAS": True, "NONLINEARITY": "tanh"},
        {"PARAMETRIZATION": "sp", "BIAS": True, "NONLINEARITY": "gelu", "DEPTH": 3},
    ],
)
def test_the_kernels_losses_and_gradients_are_autograds_of_cross_entropy(overrides):
    jobs, spec = make_jobs(overrides, axes=MIXED_N)
    problems = sorted(
        (engine.setup_job(j, spec, CPU) for j in jobs), key=lambda p: p.job.hp.N_SAMPLES
    )
    assert len({p.gamma for p in problems}) == 2
    kernel, stack, (X, y, f0) = stack_of(problems)
    losses, grads = kernel.loss_and_grads(stack, X, y, f0)
    assert losses.shape == (len(problems),)
    for r, p in enumerate(problems):
        p.model.zero_grad()
        loss = nn.CrossEntropyLoss()(p.output(p.X_tr, p.f0_tr), p.y_tr)
        loss.backward()
        torch.testing.assert_close(losses[r], loss.detach(), rtol=1e-12, atol=0)
        for i, (name, param) in enumerate(p.model.named_parameters()):
            torch.testing.assert_close(grads[i][r], param.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(CLASSES, dtype=torch.float64)),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(ignore_index=0),
        nn.NLLLoss(),
    ],
)
def test_cross_entropy_other_than_torchs_default_takes_torch_func(loss_fn):
    jobs, spec = make_jobs()
    problem = engine.setup_job(jobs[0], spec, CPU)
    assert kernels.kernel_for(problem) is MLPKernel
    problem.loss_fn = loss_fn
    assert kernels.kernel_for(problem) is FuncKernel
    problem.loss_fn = nn.CrossEntropyLoss()
    problem.y_te = problem.y_te.int()  # the kernel takes int64 class indices only
    assert kernels.kernel_for(problem) is FuncKernel
