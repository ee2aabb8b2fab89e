"""The one-job loop's windows: consuming the losses once per window, and rewinding a job that
exited inside one, gives exactly the record of a loop that applies the rules after every step.

The reference is the same loop with one-step windows (``SYNC_EVERY = 1``: no window ever needs a
rewind). The jobs use everything a rewind must restore: dropout and a batch function that draw
from the global RNG, the data generator, Adam's state, and curves and grabs at the exit step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelscape import engine
from modelscape.engine import loop
from modelscape.runner import plan

CPU = torch.device("cpu")


class Dropping(torch.nn.Module):
    """A user model whose training step draws from the global RNG."""

    def __init__(self, d_in, d_out, width):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Dropout(0.1)
        )
        self.head = torch.nn.Linear(width, d_out)

    def forward(self, x):
        return self.head(self.body(x))


def noisy_bfn(bsz, gen, X=None, y=None, d=5, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, d, generator=gen)
        noise = 0.01 * torch.randn(bsz)  # the global RNG, on purpose
        return Xb, Xb[:, 0] * Xb[:, 1] + noise

    return batch_fn


def weight_norm(model, **kwargs):
    return float(sum(p.detach().pow(2).sum() for p in model.parameters()))


def records(thresholds, max_iter):
    config = {
        "MODEL_CLASS": Dropping,
        "WIDTH": 16,
        "N_SAMPLES": 16,
        "N_TEST": 50,
        "MAX_ITER": max_iter,
        "LR": 0.02,
        "OPTIMIZER": "Adam",
        "ONLINE": True,
        "ONLYTHRESHOLDS": False,
        "EVAL_EVERY": 10,
        "LOSS_CHECKPOINTS": thresholds,
        "DTYPE": "float64",
        "otherreturns": {"norm": weight_norm},
    }
    axes = {"trial": range(4)}
    _, _, jobs, spec = plan(list(axes.values()), list(axes), config, {"base_bfn": noisy_bfn})
    return [engine.run_job(job, spec, CPU) for job in jobs]


@pytest.mark.parametrize("thresholds,max_iter", [([0.7, 0.35], 300), ([1e-9], 77)])
def test_windows_and_rewinds_match_a_step_by_step_loop(monkeypatch, thresholds, max_iter):
    got = records(thresholds, max_iter)
    monkeypatch.setattr(loop, "SYNC_EVERY", 1)
    ref = records(thresholds, max_iter)
    # windows end at evaluation steps (every 10th): a job exiting elsewhere before MAX_ITER
    # exits inside a window and is rewound
    inside = [r.steps for r in ref if (r.steps - 1) % 10 and r.steps < max_iter]
    assert bool(inside) == (max_iter == 300), [r.steps for r in ref]
    for r, g in zip(ref, got):
        assert r.status == g.status == "ok", (r.error, g.error)
        assert g.steps == r.steps
        np.testing.assert_array_equal(g.timekeys, r.timekeys)
        assert g.train_loss == r.train_loss and g.test_loss == r.test_loss
        assert g.grabs["norm"] == r.grabs["norm"]
        assert set(g.curves) == set(r.curves)
        for name in r.curves:
            np.testing.assert_array_equal(g.curves[name], r.curves[name])
