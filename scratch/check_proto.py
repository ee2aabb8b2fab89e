"""Phase-1 checks of scratch/proto_kernel.py against per-job autograd and today's kernel."""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn

sys.path.insert(0, "scratch")
import proto_kernel as pk  # noqa: E402

from modelscape import batched, engine  # noqa: E402
from modelscape.backend.job_iterator import plan  # noqa: E402
from modelscape.demo import quadratic_bfn  # noqa: E402

CPU = torch.device("cpu")


def problems_for(overrides, axes):
    config = {
        "WIDTH": 16, "DEPTH": 2, "N_TEST": 50, "MAX_ITER": 10, "LR": 0.1, "ONLINE": False,
        "LOSS_CHECKPOINTS": [0.0], "DTYPE": "float64", "DEVICES": ["cpu"], **overrides,
    }  # fmt: skip
    _, _, jobs, spec = plan(list(axes.values()), list(axes), config, {"base_bfn": quadratic_bfn, "d": 5})
    probs = [engine.setup_job(j, spec, CPU) for j in jobs]
    probs.sort(key=lambda p: p.job.hp.N_SAMPLES)
    return probs


def reference(p):
    model = p.model
    out = model(p.X_tr)
    if p.f0_tr is not None:
        out = out - p.f0_tr
    out = out / p.gamma
    loss = nn.functional.mse_loss(out.squeeze(-1) if p.squeeze else out, p.y_tr)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


def run_proto(probs):
    names = [n for n, _ in probs[0].model.named_parameters()]
    assert pk.MLPKernel.check(probs[0].model, probs[0].loss_fn, probs[0].y_tr)
    kernel = pk.MLPKernel(probs[0].model, names)
    layout = pk.Layout([p.job.hp.N_SAMPLES for p in probs], [True] * len(probs))
    params = [torch.stack([dict(p.model.named_parameters())[n].detach() for p in probs]) for n in names]
    gammas = torch.tensor([p.gamma for p in probs], dtype=params[0].dtype)
    d_out = 1
    fac = kernel.factors([p.model for p in probs], gammas, layout, d_out)
    X = torch.cat([p.X_tr for p in probs])
    y = torch.cat([p.y_tr for p in probs])
    f0 = None if probs[0].f0_tr is None else torch.cat([p.f0_tr for p in probs])
    return kernel.loss_and_grads(params, X, y, f0, layout, fac)


def check(overrides, axes):
    probs = problems_for(overrides, axes)
    losses, grads = run_proto(probs)
    worst = 0.0
    for j, p in enumerate(probs):
        loss, g = reference(p)
        worst = max(worst, abs(float(losses[j] - loss)) / abs(float(loss)))
        for a, b in zip(grads, g):
            worst = max(worst, float((a[j] - b).abs().max() / b.abs().max().clamp_min(1e-300)))
    print(f"{overrides} {sorted({p.job.hp.N_SAMPLES for p in probs})}: worst rel {worst:.2e}")
    assert worst < 1e-10, worst


def check_bitwise_sp():
    """sp, one N, float32: the prototype equals today's batched.MLPKernel bit for bit, and a
    mixed-N stack equals the per-N stacks bit for bit."""
    for bias, act in itertools.product([False, True], ["relu", "tanh", "gelu"]):
        over = {"DTYPE": "float32", "BIAS": bias, "NONLINEARITY": act, "CENTER": True}
        probs = problems_for(over, {"ntrain": [8, 16, 32], "trial": range(3)})
        losses, grads = run_proto(probs)
        for n in (8, 16, 32):
            part = [p for p in probs if p.job.hp.N_SAMPLES == n]
            rows = [i for i, p in enumerate(probs) if p.job.hp.N_SAMPLES == n]
            l2, g2 = run_proto(part)
            assert torch.equal(losses[rows], l2)
            assert all(torch.equal(a[rows], b) for a, b in zip(grads, g2))
            # today's kernel on the same stack
            names = [nm for nm, _ in part[0].model.named_parameters()]
            old = batched.MLPKernel(part[0].model, names, True)
            params = [torch.stack([dict(p.model.named_parameters())[nm].detach() for p in part]) for nm in names]
            stack = batched.Stack(list(range(len(part))), params, {}, {}, {"gamma_b": None})
            X = torch.stack([p.X_tr for p in part])
            y = torch.stack([p.y_tr for p in part])
            f0 = torch.stack([p.f0_tr for p in part])
            l3, g3 = old.loss_and_grads(stack, X, y, f0)
            assert torch.equal(l2, l3), (bias, act, n)
            assert all(torch.equal(a, b) for a, b in zip(g2, g3)), (bias, act, n)
    print("sp float32: bit-identical to today's kernel, and mixed-N == per-N stacks")


if __name__ == "__main__":
    check_bitwise_sp()
    axes = {"ntrain": [8, 16, 32, 64], "trial": range(2), "GAMMA": [1.0, 10.0]}
    for param in ("sp", "mup", "ntp", "mfp", "mup-lr"):
        for extra in ({}, {"BIAS": True, "CENTER": False}, {"NONLINEARITY": "gelu", "BIAS": True}):
            check({"PARAMETRIZATION": param, **extra}, axes)
    check({"PARAMETRIZATION": "mup", "NONLINEARITY": "tanh", "DEPTH": 3}, axes)
    check({"PARAMETRIZATION": "ntp", "NONLINEARITY": "silu", "DEPTH": 1}, axes)
    print("all good")
