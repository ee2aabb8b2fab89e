"""Grabs see the trained function through ``predict``: (f(x) - f_init(x)) / GAMMA.

A grab that computes the test loss through ``predict`` must equal the recorded ``test_loss`` at
every evaluation step, whichever engine trained the job, at every GAMMA, with CENTER on or off.
The raw ``model`` a grab also receives is not that function, which the last test pins down.
"""

import numpy as np
import pytest
import torch

from modelscape import run_sweep
from modelscape.backend.cli import base_args


def product_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 5, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


def predicted_test_loss(predict, X_te, y_te, **kwargs):
    return ((predict(X_te) - y_te) ** 2).mean()


def raw_test_loss(model, X_te, y_te, **kwargs):
    return ((model(X_te).squeeze(-1) - y_te) ** 2).mean()


def sweep(gammas, **overrides):
    cfg = dict(WIDTH=16, MAX_ITER=30, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
               LOSS_CHECKPOINTS=[1e-9], ONLYTHRESHOLDS=False, EVAL_EVERY=10)  # fmt: skip
    cfg.update(overrides)
    config = {**vars(base_args(**cfg)), "otherreturns": {"pl": predicted_test_loss}}
    names = ["GAMMA", "trial"]
    return run_sweep([gammas, [0, 1]], names, config, {"base_bfn": product_bfn}, progress=False)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("batched", ["on", "off"])
@pytest.mark.parametrize("online", [True, False])
def test_a_grab_through_predict_is_the_recorded_test_loss(center, batched, online):
    result = sweep([0.1, 1.0, 10.0], CENTER=center, BATCHED=batched, ONLINE=online)
    assert len(result.records) == 6 and not result.failed
    engines = {r.trained_by.split(":")[0] for r in result.records}
    assert engines == ({"stacked"} if batched == "on" else {"single"}), engines
    for r in result.records:
        recorded, through_predict = r.curves["test_loss"], r.curves["pl"]
        assert np.isfinite(recorded).sum() >= 3  # steps 0, 10, 20 (and the exit)
        np.testing.assert_allclose(through_predict, recorded, rtol=1e-6, atol=0, equal_nan=True)


def test_predict_on_other_inputs_is_centered_and_scaled():
    """On inputs other than the cached test set, predict computes f_init itself."""

    def on_copy(predict, X_te, y_te, **kwargs):
        return ((predict(X_te.clone()) - y_te) ** 2).mean()

    cfg = dict(WIDTH=16, MAX_ITER=20, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
               LOSS_CHECKPOINTS=[1e-9], ONLINE=False, BATCHED="off")  # fmt: skip
    grabs = {"copy": on_copy, "pl": predicted_test_loss, "raw": raw_test_loss}
    config = {**vars(base_args(**cfg)), "otherreturns": grabs}
    result = run_sweep([[0.1, 10.0]], ["GAMMA"], config, {"base_bfn": product_bfn}, progress=False)
    for r in result.records:
        assert r.grabs["copy"] == pytest.approx(r.test_loss, rel=1e-6)
        assert r.grabs["pl"] == pytest.approx(r.test_loss, rel=1e-6)
    # the raw module is not the trained function (its outputs are GAMMA times the function's,
    # plus f_init): its "loss" misses the recorded one
    for r in result.records:
        assert r.grabs["raw"] != pytest.approx(r.test_loss, rel=1e-3)
