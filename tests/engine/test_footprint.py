"""A job's size in a stack (``footprint.job_bytes``) against its model as it really trains.

The reference builds each job with its own setup on the CPU, counts its real parameters and
buffers, and runs one real training step's forward pass and loss on its own batch under
``saved_tensors_hooks``: the estimate, made on the meta device before anything is built, must
agree with it within a factor of 2 for every family, and it decides how many jobs a stack holds.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from modelscape import engine, run_sweep
from modelscape.engine.stacked import footprint
from modelscape.engine.stacked.footprint import ModelBytes, formula_bytes, held_bytes, job_bytes
from modelscape.engine.stacked.refill import Waiting
from modelscape.runner import plan

CPU = torch.device("cpu")
BASE = {"N_SAMPLES": 32, "N_TEST": 16, "MAX_ITER": 4, "DEVICES": ["cpu"], "LR": 0.01}


def tensor_bfn(bsz, gen, X=None, y=None, shape=(3, 8, 8), **kwargs):
    """Gaussian inputs of ``shape`` per sample, and a scalar target (their mean)."""

    def batch_fn(step):
        Xb = torch.randn(bsz, *shape, generator=gen)
        return Xb, Xb.flatten(1).mean(1)

    return batch_fn


class TwoLayer(nn.Module):
    """A user's model: flattened input, one tanh layer of ``width`` units."""

    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.hidden = nn.Linear(d_in, width)
        self.readout = nn.Linear(width, d_out)

    def forward(self, x):
        return self.readout(torch.tanh(self.hidden(x.flatten(1))))


class NormedInit(TwoLayer):
    """A user's model whose constructor reads its initial weights' values, which the meta
    device does not have."""

    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__(d_in, d_out, width)
        with torch.no_grad():
            self.hidden.weight /= float(self.hidden.weight.norm())


FAMILIES = {
    "MLP": ({"WIDTH": 64, "DEPTH": 2}, (12,)),
    "CNN": ({"MODEL_CLASS": "CNN", "WIDTH": 8, "DEPTH": 2}, (3, 16, 16)),
    "ResNet": ({"MODEL_CLASS": "ResNet", "WIDTH": 8, "DEPTH": 2}, (3, 16, 16)),
    "Transformer": ({"MODEL_CLASS": "Transformer", "WIDTH": 32, "DEPTH": 2}, (16, 8)),
    "user": ({"MODEL_CLASS": TwoLayer, "WIDTH": 48}, (3, 8, 8)),
    "user, no meta": ({"MODEL_CLASS": NormedInit, "WIDTH": 48}, (3, 8, 8)),
}


def make_jobs(overrides, shape, trials=2):
    config = {**BASE, **overrides}
    bfn = {"base_bfn": tensor_bfn, "shape": shape}
    _, _, jobs, spec = plan([range(trials)], ["trial"], config, bfn)
    return jobs, spec


def measured(job, spec) -> ModelBytes:
    """The job's model as it trains: built by its own setup on the CPU, one forward pass and
    loss on its own first batch, every storage autograd saves counted once."""
    problem = engine.setup_job(job, spec, CPU)
    X, y, f0 = problem.batch(0)
    model = problem.model
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), X)}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = problem.output(X, f0)
        problem.loss_fn(out, y)
    return ModelBytes(
        params=sum(p.nbytes for p in model.parameters()),
        buffers=sum(b.nbytes for b in model.buffers()),
        activations=sum(saved.values()) + out.nbytes,
        d_out=out.shape[-1] if out.dim() > 1 else 1,
        built_on="cpu",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_job_bytes_is_within_a_factor_2_of_the_model_as_it_trains(family):
    jobs, spec = make_jobs(*FAMILIES[family])
    job = jobs[0]
    real = measured(job, spec)
    counted = footprint.model_bytes(job, spec)
    assert counted.built_on == ("cpu" if family == "user, no meta" else "meta")
    assert (counted.params, counted.buffers, counted.d_out) == (
        real.params,
        real.buffers,
        real.d_out,
    )
    assert 0.5 <= counted.activations / real.activations <= 2, (counted, real)
    ratio = job_bytes(job, spec) / held_bytes(job, spec, real)
    assert 0.5 <= ratio <= 2, ratio
    # the same number in every job of the shape, from one build
    assert job_bytes(jobs[1], spec) == job_bytes(job, spec)


def test_the_mlp_formula_misses_a_wide_image_cnn_by_orders_of_magnitude():
    """Its activations (every pixel times WIDTH channels) dwarf its weights; the MLP formula
    reads only WIDTH, DEPTH and N_SAMPLES."""
    jobs, spec = make_jobs({"MODEL_CLASS": "CNN", "WIDTH": 8, "DEPTH": 2}, (3, 64, 64))
    truth = held_bytes(jobs[0], spec, measured(jobs[0], spec))
    assert truth > 5 * 2**20
    assert formula_bytes(jobs[0]) < truth / 100
    assert 0.5 <= job_bytes(jobs[0], spec) / truth <= 2


def test_a_cnn_sweep_is_grouped_by_its_footprint():
    overrides = {"MODEL_CLASS": "CNN", "WIDTH": 8, "DEPTH": 2, "REFILL": False}
    jobs, spec = make_jobs(overrides, (3, 32, 32), trials=10)
    size = job_bytes(jobs[0], spec)
    budget = 3 * size + size // 2  # three jobs' footprints and a half
    groups = engine.group_jobs(jobs, budget, spec=spec)
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert engine.group_cap(jobs[0], budget, spec=spec) == 3
    # the MLP formula would have put all ten in one stack
    assert formula_bytes(jobs[0]) * 10 < budget
    # with REFILL one stream, three jobs at a time
    jobs, spec = make_jobs({**overrides, "REFILL": True}, (3, 32, 32), trials=10)
    (group,) = engine.group_jobs(jobs, budget, spec=spec)
    waiting = Waiting(group, spec, CPU, None, group_bytes=budget)
    assert len(waiting.first()) == 3


def test_a_model_the_meta_device_cannot_build_is_counted_once_on_the_cpu(caplog):
    overrides = {"MODEL_CLASS": NormedInit, "WIDTH": 40, "REFILL": False}
    jobs, spec = make_jobs(overrides, (3, 8, 8), trials=4)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.DEBUG, logger=footprint.__name__):
        size = job_bytes(jobs[0], spec)
    assert "cannot run on the meta device" in caplog.text
    assert torch.equal(torch.get_rng_state(), rng)  # the CPU build left the generator alone
    assert footprint.model_bytes(jobs[0], spec).built_on == "cpu"
    assert 0.9 <= size / held_bytes(jobs[0], spec, measured(jobs[0], spec)) <= 1.1
    budget = 2 * size + size // 2
    assert [len(g) for g in engine.group_jobs(jobs, budget, spec=spec)] == [2, 2]


def test_a_sweep_of_a_model_that_cannot_run_on_meta_trains_stacked():
    config = {**BASE, "MODEL_CLASS": NormedInit, "WIDTH": 44, "LOSS_CHECKPOINTS": [1e-9]}
    result = run_sweep(
        [range(3)],
        ["trial"],
        config,
        {"base_bfn": tensor_bfn, "shape": (3, 8, 8)},
        progress=False,
        use_mp=False,
    )
    assert [r.trained_by for r in result.records] == ["stacked"] * 3
    assert all(r.status == "ok" and r.steps == BASE["MAX_ITER"] for r in result.records)
    assert np.isfinite([r.train_loss for r in result.records]).all()


class Unbuildable(TwoLayer):
    def __init__(self, d_in: int, d_out: int, width: int):
        raise RuntimeError("no weights today")


def test_a_model_that_cannot_be_built_is_sized_by_the_formula_and_fails_as_its_jobs():
    jobs, spec = make_jobs({"MODEL_CLASS": Unbuildable, "WIDTH": 40}, (3, 8, 8))
    with pytest.warns(UserWarning, match="sized by the MLP formula"):
        assert job_bytes(jobs[0], spec) == formula_bytes(jobs[0])
    config = {**BASE, "MODEL_CLASS": Unbuildable, "WIDTH": 40}
    result = run_sweep(
        [range(2)],
        ["trial"],
        config,
        {"base_bfn": tensor_bfn, "shape": (3, 8, 8)},
        progress=False,
        use_mp=False,
    )
    assert all("no weights today" in r.error for r in result.records)
