"""The engine's contracts that are not about stacked-vs-reference numbers: optimizer arguments
come from one place, sub-seeds are named, and the loop rules are one implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modelscape
from modelscape import engine
from modelscape.backend.job_iterator import plan
from modelscape.engine.tracking import Track, Tracker
from modelscape.errors import SweepError
from modelscape.sweep.jobs import SubSeeds, sub_seeds

CPU = torch.device("cpu")


def quadratic_bfn(bsz, gen, X=None, y=None, d=4, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, d, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


BASE = {
    "WIDTH": 8,
    "N_SAMPLES": 16,
    "N_TEST": 50,
    "MAX_ITER": 40,
    "LOSS_CHECKPOINTS": [0.5, 1e-9],
    "DTYPE": "float64",
    "DEVICES": ["cpu"],
}


def run(config, axes=None):
    axes = axes or {"trial": range(2)}
    return modelscape.run_sweep(
        list(axes.values()),
        list(axes),
        {**BASE, **config},
        {"base_bfn": quadratic_bfn},
        progress=False,
    )


def test_an_unknown_optimizer_argument_fails_before_training_with_a_suggestion():
    with pytest.raises(SweepError, match=r"'nesterow'.*Did you mean 'nesterov'\?.*dampening"):
        run({"MOMENTUM": 0.9, "OPTIMIZER_KWARGS": {"nesterow": True}})
    with pytest.raises(SweepError, match="set MOMENTUM instead"):
        run({"OPTIMIZER_KWARGS": {"momentum": 0.9}})
    with pytest.raises(SweepError, match="takes no momentum argument"):
        run({"OPTIMIZER": "Adam", "MOMENTUM": 0.9})


def test_optimizer_arguments_come_from_optimizer_kwargs_never_silently_from_a_key():
    adam = {"OPTIMIZER": "Adam", "LR": 0.01}
    plain = run(adam)
    chosen = run({**adam, "OPTIMIZER_KWARGS": {"eps": 0.5}})
    assert not np.allclose(plain.to_xarray()["test_loss"], chosen.to_xarray()["test_loss"])
    # a config key named like an optimizer argument is the original's spelling: taken, loudly
    with pytest.warns(FutureWarning, match=r"write OPTIMIZER_KWARGS=\{'eps': 0.5\}"):
        legacy = run({**adam, "eps": 0.5})
    np.testing.assert_array_equal(legacy.to_xarray()["test_loss"], chosen.to_xarray()["test_loss"])


@pytest.mark.parametrize(
    "optimizer,extra",
    [("Adam", {}), ("AdamW", {}), ("SGD", {"MOMENTUM": 0.9}), ("Adagrad", {})],
)
def test_a_one_job_run_on_the_cpu_steps_with_torchs_fused_kernel_unless_kwargs_pick_one(
    optimizer, extra
):
    config = {**BASE, "OPTIMIZER": optimizer, "LR": 0.01, **extra}
    _, _, (job,), spec = plan([[0]], ["trial"], config, {"base_bfn": quadratic_bfn})
    assert engine.setup_job(job, spec, CPU).opt.defaults["fused"] is True
    by_default = engine.run_job(job, spec, CPU)
    # the same numbers as naming the fused kernel; torch's op-by-op update agrees to rounding
    for kwargs in ({"fused": True}, {"foreach": False}):
        cfg = {**config, "OPTIMIZER_KWARGS": kwargs}
        _, _, (chosen,), spec = plan([[0]], ["trial"], cfg, {"base_bfn": quadratic_bfn})
        assert bool(engine.setup_job(chosen, spec, CPU).opt.defaults["fused"]) is (
            "fused" in kwargs
        )
        record = engine.run_job(chosen, spec, CPU)
        np.testing.assert_array_equal(record.timekeys, by_default.timekeys)
        if "fused" in kwargs:
            assert record.test_loss == by_default.test_loss
        else:
            assert record.test_loss == pytest.approx(by_default.test_loss, rel=1e-9)


def test_an_optimizer_without_a_fused_kernel_keeps_torchs_default():
    config = {**BASE, "OPTIMIZER": "RMSprop"}
    _, _, (job,), spec = plan([[0]], ["trial"], config, {"base_bfn": quadratic_bfn})
    assert "fused" not in engine.setup_job(job, spec, CPU).opt.defaults


def test_an_axis_sweeps_one_optimizer_argument_in_a_stack():
    config = {**BASE, "MOMENTUM": 0.9, "OPTIMIZER_KWARGS": {"dampening": 0.0}}
    axes = {"trial": range(2), "OPTIMIZER_KWARGS.nesterov": [False, True]}
    _, _, jobs, spec = plan(list(axes.values()), list(axes), config, {"base_bfn": quadratic_bfn})
    assert [job.hp.OPTIMIZER_KWARGS for job in jobs[:2]] == [
        {"dampening": 0.0, "nesterov": False},
        {"dampening": 0.0, "nesterov": True},
    ]
    problem = engine.setup_job(jobs[1], spec, CPU)
    assert problem.opt.param_groups[0]["nesterov"] is True
    # Nesterov is a flag of a whole stack: jobs that differ in it train one at a time, and say so
    (group,) = engine.group_jobs(jobs, spec=spec)
    records = list(engine.train_group(group, spec, CPU))
    assert {r.trained_by for r in records} == {
        "single: the jobs' optimizers differ in [('nesterov', False), ('nesterov', True)]"
    }
    refs = {job.key: engine.run_job(job, spec, CPU) for job in jobs}
    for r in records:
        assert r.status == "ok"
        assert abs(r.test_loss - refs[r.key].test_loss) <= 1e-6 * abs(refs[r.key].test_loss)
    by_flag = {r.key[1]: r.test_loss for r in records if r.key[0] == 0}
    assert by_flag[False] != by_flag[True]


def test_sub_seeds_are_named_in_their_historical_order():
    seeds = SubSeeds.of(1234)
    # a stream added later is appended: the earlier seeds are those of fewer streams
    assert list(seeds)[:7] == sub_seeds(1234, 7)
    assert list(seeds) == sub_seeds(1234, 8)
    assert seeds.training_rng == sub_seeds(1234, 7)[3]
    assert len(set(seeds)) == 8


def test_the_tracker_consumes_a_window_of_many_jobs_as_each_job_alone():
    """One window of losses [jobs x steps] gives each job what step-by-step feeding gives."""
    _, _, jobs, _ = plan(
        [[0.5, 0.9]],
        ["EMA_SMOOTHER"],
        {**BASE, "LOSS_CHECKPOINTS": [1.0, 0.3], "MAX_ITER": 6},
        {"base_bfn": quadratic_bfn},
    )
    losses = torch.tensor([[2.0, 0.9, 0.2, 0.1, 0.05, 0.01], [2.0, 1.0, float("nan"), 0, 0, 0]])
    window = Tracker([Track.start(job) for job in jobs])
    window.consume(0, losses, [0, 1])
    for row, job in enumerate(jobs):
        alone = Track.start(job)
        one = Tracker([alone])
        for step, value in enumerate(losses[row].tolist()):
            if alone.exit is None:
                one.consume(step, [[value]], [0])  # as the one-job loop feeds it
        got = window.tracks[row]
        assert (got.exit, got.diverged, got.ema) == (alone.exit, alone.diverged, alone.ema)
        np.testing.assert_array_equal(got.timekeys, alone.timekeys)
    fast, diverging = window.tracks
    assert not fast.diverged and fast.exit == 4 and fast.timekeys.tolist() == [2.0, 4.0]
    assert diverging.diverged and diverging.exit == 2


def test_which_hyperparameters_may_differ_inside_a_stack_is_metadata_of_their_fields():
    """A new job-scoped hyperparameter is part of a stack's shape unless its field says
    ``varies_in_stack``: the grouping reads the schema, it keeps no list of its own."""
    from modelscape.engine.stacked.grouping import SAME_IN_GROUP
    from modelscape.sweep import hparams as H

    assert H.VARIES_IN_STACK == {
        "LR", "GAMMA", "SEED", "MOMENTUM", "WEIGHT_DECAY", "OPTIMIZER_KWARGS", "EMA_SMOOTHER",
        "LOSS_CHECKPOINTS", "MAX_ITER",
    }  # fmt: skip
    assert set(SAME_IN_GROUP) == (set(H.JOB_FIELDS) - H.VARIES_IN_STACK) | set(H.SWEEP_FIELDS)


def exits_for_trial_one(bsz, gen, X=None, y=None, trial=0, **kwargs):
    if trial == 1:
        raise SystemExit(3)  # a stray sys.exit() in user code, while this job sets up
    return quadratic_bfn(bsz, gen, X, y)


def test_the_failure_boundary_fails_only_the_job_whose_code_exits_inside_a_stack():
    """One boundary for every engine: the job whose batch function calls sys.exit() while its
    stack sets up fails alone (a UserCodeExit record); its stack-mates still train stacked."""
    result = modelscape.run_sweep(
        [range(3)], ["trial"], {**BASE, "BATCHED": "on"}, {"base_bfn": exits_for_trial_one},
        progress=False,
    )  # fmt: skip
    status = {r.key: (r.status, r.trained_by) for r in result.records}
    assert status[(0,)] == ("ok", "stacked") and status[(2,)] == ("ok", "stacked")
    assert status[(1,)][0] == "failed"
    assert "UserCodeExit: SystemExit(3) was raised inside your code" in result.record(1).error


def test_cuda_graph_capture_is_an_explicit_opt_in_never_the_default():
    """The capture has never run on a GPU here, so the default step is eager everywhere;
    COMPILE="cuda-graphs" asks for it, and only a CUDA device gets it."""
    from modelscape.engine.stacked import graphs
    from modelscape.sweep import hparams as H

    def eager(*args):
        return args

    assert H.HParams().COMPILE == "off"
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert graphs.step_function(eager, "off", cuda) is eager
    assert graphs.step_function(eager, "cuda-graphs", CPU) is eager
    assert isinstance(graphs.step_function(eager, "cuda-graphs", cuda), graphs.GraphedStep)
    with pytest.raises(H.HParamError, match="cuda-graphs"):
        H.resolve({"COMPILE": "auto"})


def images_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 2, 6, 6, generator=gen)
        return Xb, Xb[:, 0].mean(dim=(1, 2)) * 3

    return batch_fn


class NCHWCNN(modelscape.models.CNN):
    prefers_channels_last = False  # the same model, trained in torch's default layout


class NCHWResNet(modelscape.models.ResNet):
    prefers_channels_last = False


class UsersCNN(torch.nn.Module):
    prefers_channels_last = True  # a user's model opts in

    def __init__(self, in_shape, d_out, width):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_shape[0], width, 3, padding=1)
        self.readout = torch.nn.Linear(width, d_out)

    def forward(self, x):
        return self.readout(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def conv_weights(problem):
    return [m.weight for m in problem.model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize(
    "model, nchw", [("CNN", NCHWCNN), ("ResNet", NCHWResNet), (UsersCNN, None)], ids=str
)
def test_convolutional_models_that_prefer_it_train_channels_last_on_the_cpu(model, nchw):
    """Their weights (and so activations) are channels-last in a one-job run on the CPU; the
    numbers are those of torch's default layout to float rounding."""
    config = {**BASE, "MODEL_CLASS": model, "DEPTH": 2, "OPTIMIZER": "Adam", "LR": 0.01}
    _, _, (job,), spec = plan([[0]], ["trial"], config, {"base_bfn": images_bfn})
    weights = conv_weights(engine.setup_job(job, spec, CPU))
    assert weights and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        for w in weights
    )
    if nchw is None:
        return
    _, _, (default,), spec_nchw = plan(
        [[0]], ["trial"], {**config, "MODEL_CLASS": nchw}, {"base_bfn": images_bfn}
    )
    assert all(w.is_contiguous() for w in conv_weights(engine.setup_job(default, spec_nchw, CPU)))
    got, want = engine.run_job(job, spec, CPU), engine.run_job(default, spec_nchw, CPU)
    np.testing.assert_array_equal(got.timekeys, want.timekeys)
    assert got.train_loss == pytest.approx(want.train_loss, rel=1e-9)
    assert got.test_loss == pytest.approx(want.test_loss, rel=1e-9)
