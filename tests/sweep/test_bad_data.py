"""Data that cannot train: integer inputs to a float model, NaN or infinite inputs or targets.

The preflight catches them in the first job's data before anything trains, naming the fix; a
job whose own data is not finite fails alone, with a message that says so, and the others'
values are stored and read back exactly.
"""

import numpy as np
import pytest
import torch
from sweeps import config

from modelscape import SweepError, load, run_sweep


def make_bfn(*, integer_X=False, poison=None, bad_trial=None, n_test=64):
    """x0 * x1 on 5 inputs. ``poison`` is ``("X" | "y", value, "train" | "test")``: that value
    is put in one sample of the training batch or the test set, of every trial or only of
    ``bad_trial``."""

    def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
        def batch_fn(step):
            Xb = torch.randn(bsz, 5, generator=gen)
            yb = Xb[:, 0] * Xb[:, 1]
            if integer_X:
                Xb = (Xb * 3).round().long()
            if poison is not None and (bad_trial is None or trial == bad_trial):
                name, value, where = poison
                if (bsz == n_test) == (where == "test"):
                    (Xb if name == "X" else yb)[3] = value
            return Xb, yb

        return batch_fn

    return bfn


def sweep(bfn, trials=(0, 1, 2), **overrides):
    cfg = config(MAX_ITER=20, **overrides)
    return run_sweep([list(trials)], ["trial"], cfg, {"base_bfn": bfn}, progress=False)


def test_integer_inputs_to_a_float_model_are_refused_before_training_with_the_fix(tmp_path):
    with pytest.raises(SweepError, match=r"dtype torch.int64.*X\.float\(\)"):
        sweep(make_bfn(integer_X=True), SAVE_DIR=str(tmp_path / "run"), WORKERS_PER_DEVICE=2)
    assert not (tmp_path / "run").exists()


def test_integer_inputs_that_the_model_takes_still_train():
    class Embed(torch.nn.Module):
        def __init__(self, d_out=1, **kwargs):
            super().__init__()
            self.table = torch.nn.Embedding(64, 4)
            self.out = torch.nn.Linear(20, d_out)

        def forward(self, x):
            return self.out(self.table(x.clamp(-30, 30) + 32).flatten(1))

    result = sweep(make_bfn(integer_X=True), trials=(0,), MODEL_CLASS=Embed)
    assert result.record(0).status == "ok" and np.isfinite(result.record(0).test_loss)


@pytest.mark.parametrize(
    "poison, where",
    [
        (("y", float("nan"), "train"), r"training batch.*y holds 1 NaN or infinite.*y\[3\]"),
        (("X", float("inf"), "train"), r"training batch.*X holds 5 NaN or infinite.*X\[3, 0\]"),
        (("y", float("nan"), "test"), r"test set.*y holds 1 NaN"),
    ],
)
def test_data_that_is_not_finite_is_refused_before_training(tmp_path, poison, where):
    with pytest.raises(SweepError, match=where):
        sweep(make_bfn(poison=poison), SAVE_DIR=str(tmp_path / "run"), WORKERS_PER_DEVICE=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize(
    "poison, message",
    [
        (("y", float("nan"), "test"), "the test set: y holds 1 NaN"),
        (("X", -float("inf"), "train"), "X holds 5 NaN or infinite values"),
    ],
)
def test_a_job_whose_own_data_is_not_finite_fails_alone_and_says_so(
    tmp_path, online, poison, message
):
    run = tmp_path / "run"
    bfn = make_bfn(poison=poison, bad_trial=1)
    result = sweep(bfn, SAVE_DIR=str(run), WORKERS_PER_DEVICE=2, ONLINE=online)
    clean = sweep(make_bfn(), trials=(0, 2), ONLINE=online)
    stored = load(run)
    ds = stored.to_xarray()
    for r in (result, stored):
        assert r.record(1).status == "failed"
        assert "trial=1" in r.record(1).error and message in r.record(1).error
        assert "NaN" in r["errors"][(1,)]["message"]
        for t in (0, 2):
            assert r.record(t).status == "ok"
            assert r.record(t).test_loss == clean.record(t).test_loss
            assert r["losses"]["config2outcome"][(t,)] == clean.record(t).test_loss
    assert list(ds["status"].values) == ["ok", "failed", "ok"]
    assert [float(ds["test_loss"].sel(trial=t)) for t in (0, 2)] == [
        clean.record(t).test_loss for t in (0, 2)
    ]
