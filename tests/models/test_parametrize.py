"""Parametrizations: mupify parity, the Adam table, equivalences, weight decay, entry points."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.models import MLP, Transformer
from modelscape.models import parametrize as P

D_IN, WIDTH, D_OUT = 32, 256, 16


def mlp(seed=0, nonlinearity="relu", bias=False):
    torch.manual_seed(seed)
    return MLP(d_in=D_IN, d_out=D_OUT, width=WIDTH, depth=2, nonlinearity=nonlinearity, bias=bias)


def mupify_reference(param, role, fan_in, n):
    """mupify's published (multiplier, init std, lr factor), written out per case by hand."""
    a2 = n if param in ("mup", "mfp", "mup-lr") else 1
    q = 1 / fan_in if role == "readout" else a2 / fan_in
    return {
        "ntp": (1 / math.sqrt(fan_in), 1.0, 1.0),
        "mfp": (math.sqrt(q / a2), 1.0, a2),
        "mup": (math.sqrt(q), 1 / math.sqrt(a2), 1.0),
        "ntp-lr": (1.0, 1 / math.sqrt(fan_in), 1 / fan_in),
        "mup-lr": (1.0, math.sqrt(q / a2), q),
    }[param]


@pytest.mark.parametrize("param", ["mup", "ntp", "mfp", "ntp-lr", "mup-lr"])
def test_sgd_matches_mupify_per_layer(param):
    model = mlp()
    lr = 0.05
    opt = P.apply(model, param, torch.optim.SGD, lr, {"momentum": 0.0, "weight_decay": 0.0})
    layers = [model.input_layer, model.hidden_layers[0], model.output_layer]
    expected = [
        mupify_reference(param, "readin", D_IN, WIDTH),
        mupify_reference(param, "hidden", WIDTH, WIDTH),
        mupify_reference(param, "readout", WIDTH, WIDTH),
    ]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1]
    for layer, group, (g, std, lr_factor) in zip(layers, opt.param_groups, expected):
        assert isinstance(layer, P.ParametrizedLinear)
        assert float(layer.multiplier) == pytest.approx(g, rel=1e-6)
        assert layer.weight.std().item() == pytest.approx(std, rel=0.05)
        assert group["params"][0] is layer.weight
        assert group["lr"] == pytest.approx(lr * lr_factor, rel=1e-12)
    assert type(model.nonlin) is P.ScaledReLU and model.nonlin.gain == pytest.approx(math.sqrt(2))
    x = torch.randn(5, D_IN)
    assert torch.allclose(model.nonlin(x), math.sqrt(2) * torch.relu(x))


def test_conv_fan_in_counts_channels_times_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 2))  # fmt: skip
    table = {r.name: r for r in P.layer_scales(model, "ntp")}
    assert [table[k].fan_in for k in ("0", "2", "4")] == [27, 576, 1024]
    assert table["2"].multiplier == pytest.approx(1 / 24)


def test_adam_mup_lr_is_tensor_programs_v_table():
    """mup-lr is the multiplier-free form: TP-V's muP Adam column can be read off directly."""
    table = P.layer_scales(mlp(), "mup-lr", torch.optim.Adam)
    readin, hidden, readout = table
    assert [r.multiplier for r in table] == [1.0, 1.0, 1.0]
    assert readin.init_std == pytest.approx(1 / math.sqrt(D_IN))
    assert hidden.init_std == pytest.approx(1 / math.sqrt(WIDTH))
    assert readout.init_std == pytest.approx(1 / WIDTH)  # var 1/fan_in**2
    assert readin.lr_scale == pytest.approx(1 / D_IN)  # constant in width
    assert hidden.lr_scale == pytest.approx(1 / WIDTH)  # 1/fan_in
    assert readout.lr_scale == pytest.approx(1 / WIDTH)  # 1/fan_in


def outputs_after_training(param, opt_cls, steps=6, **opt_kwargs):
    model = mlp(bias=True)
    torch.manual_seed(1)  # init draws: the same standard normals for every parametrization
    opt = P.apply(model, param, opt_cls, 0.05, opt_kwargs)
    gen = torch.Generator().manual_seed(2)
    X, y = torch.randn(32, D_IN, generator=gen), torch.randn(32, D_OUT, generator=gen)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("group", [("mup", "mfp", "mup-lr"), ("ntp", "ntp-lr")])
def test_equivalent_parametrizations_train_identically_with_momentum_and_decay(group):
    """mup/mfp/mup-lr are one parametrization written three ways (so are ntp/ntp-lr): with SGD,
    nesterov momentum and weight decay their functions must agree step by step."""
    kw = dict(momentum=0.9, nesterov=True, weight_decay=0.1)
    outs = [outputs_after_training(p, torch.optim.SGD, **kw) for p in group]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)
    untrained = outputs_after_training(group[0], torch.optim.SGD, steps=0)
    assert (outs[0] - untrained).abs().mean() > 1e-2  # training did move the function


@pytest.mark.parametrize("group", [("mup", "mfp", "mup-lr"), ("ntp", "ntp-lr")])
def test_equivalent_parametrizations_agree_under_adamw(group):
    kw = dict(betas=(0.8, 0.95), weight_decay=0.1)
    outs = [outputs_after_training(p, torch.optim.AdamW, **kw) for p in group]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-3, atol=1e-4)


def adam_reference(param, d, n):
    """The Adam LR factors (readin, hidden, readout) of the README's written-out table for a
    2-hidden-layer MLP, typed in from the table, not computed by the implementation's rule."""
    return {
        "ntp": (1 / math.sqrt(d * n), 1 / n, 1 / math.sqrt(n)),
        "ntp-lr": (1 / (d * math.sqrt(n)), n**-1.5, 1 / n),
        "mup": (1 / math.sqrt(d * n), 1 / n, 1 / math.sqrt(n)),
        "mfp": (1 / math.sqrt(d), 1 / math.sqrt(n), 1.0),
        "mup-lr": (1 / d, 1 / n, 1 / n),
    }[param]


@pytest.mark.parametrize("param", ["mup", "ntp", "mfp", "ntp-lr", "mup-lr"])
def test_adam_lr_factors_match_the_written_out_table(param):
    """Every row of the Adam table, and the effective LR (multiplier x LR) it implies: TP-V's
    muP Adam column (1/d_in, 1/n, 1/n) for mup, mfp and mup-lr; (1/(d_in sqrt n), n^-1.5, 1/n),
    hidden features moving by 1/sqrt(n), for ntp and ntp-lr."""
    table = P.layer_scales(mlp(), param, torch.optim.AdamW)
    d, n = D_IN, WIDTH
    assert [r.lr_scale for r in table] == pytest.approx(adam_reference(param, d, n), rel=1e-12)
    if param.startswith("mup") or param == "mfp":
        effective = (1 / d, 1 / n, 1 / n)
    else:
        effective = (1 / (d * math.sqrt(n)), n**-1.5, 1 / n)
    assert [r.multiplier * r.lr_scale for r in table] == pytest.approx(effective, rel=1e-12)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("param", ["sp", "ntp", "mup", "mfp", "ntp-lr", "mup-lr"])
def test_weight_decay_shrinks_every_layer_by_lr_times_wd(param, opt_cls):
    """A zero-gradient step leaves only weight decay: every layer shrinks by 1 - LR*WD, for any
    parametrization (mupify's unscaled decay would shrink mfp layers by 1 - WIDTH*LR*WD < 0)."""
    lr, wd = 0.01, 0.3
    model = mlp()
    opt = P.apply(model, param, opt_cls, lr, {"weight_decay": wd})
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(4, D_IN)) * 0.0).sum().backward()
    opt.step()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b * (1 - lr * wd), rtol=1e-5, atol=0)


def test_sp_leaves_the_model_as_built():
    model, reference = mlp(seed=3), mlp(seed=3)
    opt = P.apply(model, "sp", torch.optim.SGD, 0.1, {"momentum": 0.9})
    assert all(
        type(m) is nn.Linear for m in (model.input_layer, *model.hidden_layers, model.output_layer)
    )
    assert type(model.nonlin) is nn.ReLU
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.1
    assert P.parametrization_of(model) == "sp"


def test_mupify_keeps_each_groups_hyperparameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))  # fmt: skip
    opt = torch.optim.SGD(
        [
            {"params": [*model[0].parameters(), *model[2].parameters()], "momentum": 0.9},
            {"params": model[4].parameters(), "lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3},
        ],
        lr=0.1,
    )
    P.mupify(model, opt, "mfp")
    groups = opt.param_groups
    assert [len(g["params"]) for g in groups] == [2, 2, 2]  # weight and bias per layer
    assert [g["momentum"] for g in groups] == [0.9, 0.9, 0.5]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * 64, 0.1 * 64, 0.01 * 64])
    assert groups[2]["weight_decay"] == pytest.approx(1e-3 / 64)
    assert groups[0]["params"][0] is model[0].weight
    # state_dict keys are unchanged, so checkpoints of the plain model still load
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                        "4.bias"]  # fmt: skip


def test_mupify_adam_keeps_betas_and_uses_the_adam_rule():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.7, 0.9), eps=1e-10)
    P.mupify(model, opt, "mup")
    assert all(g["betas"] == (0.7, 0.9) and g["eps"] == 1e-10 for g in opt.param_groups)
    # TP-V Adam, effective lr = multiplier * lr: 1/d_in readin, 1/fan_in hidden and readout
    layers = [model.input_layer, model.hidden_layers[0], model.output_layer]
    effective = [float(m.multiplier) * g["lr"] for m, g in zip(layers, opt.param_groups)]
    assert effective == pytest.approx([1 / D_IN, 1 / WIDTH, 1 / WIDTH])


def test_second_mupify_raises():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    P.mupify(model, opt, "mup")
    with pytest.raises(P.ParametrizationError, match="already parametrized .'mup'."):
        P.mupify(model, opt, "ntp")


def test_mupify_after_a_step_raises():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, D_IN)).sum().backward()
    opt.step()
    with pytest.raises(P.ParametrizationError, match="already taken steps"):
        P.mupify(model, opt, "mup")


def test_attention_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = Transformer(in_shape=(5, 3), d_out=1, width=16, depth=1)
    with pytest.raises(P.ParametrizationError, match="attention .MultiheadAttention.*1/d_head"):
        P.apply(model, "mup", torch.optim.SGD, 0.1, {})
    with torch.device("meta"):  # what a sweep can check before any job trains
        P.check_applicable(MLP(d_in=4, d_out=1, width=8, depth=2), "mup", torch.optim.AdamW)
        P.check_applicable(Transformer((5, 3), 1, 16, 1), "sp", torch.optim.SGD)
        with pytest.raises(P.ParametrizationError, match="is attention"):
            P.check_applicable(Transformer((5, 3), 1, 16, 1), "ntp", torch.optim.SGD)
    norm_net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    with pytest.raises(P.ParametrizationError, match="'1' .LayerNorm. has its own parameters"):
        P.apply(norm_net, "ntp", torch.optim.SGD, 0.1, {})


@pytest.mark.parametrize("gamma", [0.25, 4.0])
def test_rescale_divides_the_output_and_applies_the_lr_rule(gamma):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    P.mupify(model, opt, "mup")
    lrs = [g["lr"] for g in opt.param_groups]
    x = torch.randn(3, D_IN)
    before = model(x).detach()
    P.rescale(model, gamma, opt)
    torch.testing.assert_close(model(x).detach(), before / gamma)
    factor = gamma**2 if gamma < 1 else gamma
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * factor for lr in lrs])


def test_rescale_then_mupify_is_refused():
    model = mlp()
    P.rescale(model, 2.0)
    assert (
        type(model.output_layer) is P.ParametrizedLinear
        and float(model.output_layer.multiplier) == 0.5
    )
    with pytest.raises(P.ParametrizationError, match="call mupify first"):
        P.mupify(model, torch.optim.SGD(model.parameters(), lr=1.0), "mup")


def test_stacked_functional_call_reproduces_each_parametrized_model():
    """What the batched engine does: stack per-job models, vmap one functional forward."""
    models = []
    for seed in (0, 1):
        m = mlp(seed=seed)
        P.apply(m, "mup", torch.optim.SGD, 0.1, {})
        models.append(m)
    params, buffers = stack_module_state(models)
    assert buffers["output_layer.multiplier"].shape == (2,)
    x = torch.randn(4, D_IN)

    def f(p, b):
        return functional_call(models[0], (p, b), (x,))

    stacked = torch.vmap(f)(params, buffers)
    for i, m in enumerate(models):
        torch.testing.assert_close(stacked[i], m(x))


def square_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 6, generator=gen, device=gen.device)
        return Xb, Xb[:, 0] ** 2 - 1

    return batch_fn


def test_post_init_mupify_equals_the_native_parametrization():
    """The original's migration path (mupify in a post_init_fn under sp) and PARAMETRIZATION give
    the same runs; mupify on top of a native parametrization is a clear failure."""

    def post_init(model, opt):
        P.mupify(model, opt, "mup")
        return model, opt

    cfg = dict(vars(base_args(WIDTH=64, MAX_ITER=30, N_SAMPLES=32, N_TEST=64, LR=0.05,
                              DEVICES=["cpu"], LOSS_CHECKPOINTS=[1e-9])))  # fmt: skip

    def run(c):
        return run_job_iterator([[0]], ["trial"], c, {"base_bfn": square_bfn}, progress=False)

    native = run({**cfg, "PARAMETRIZATION": "mup"}).record(0)
    legacy = run({**cfg, "post_init_fn": post_init}).record(0)
    assert native.status == legacy.status == "ok"
    assert legacy.train_loss == pytest.approx(native.train_loss, rel=1e-6)
    assert legacy.test_loss == pytest.approx(native.test_loss, rel=1e-6)
    twice = run({**cfg, "PARAMETRIZATION": "mup", "post_init_fn": post_init}).record(0)
    assert twice.status == "failed" and "already parametrized" in twice.error


def test_lr_transfer_example_prints_best_lrs_and_saves_its_plot(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "lr_transfer.py"
    png = tmp_path / "lrt.png"
    cmd = [sys.executable, str(example), "--WIDTH", "16", "32", "--LR", "0.01", "0.1",
           "--MAX_ITER", "5", "--N_TEST", "64", "--OUT", str(png)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny run: threads only add start-up
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = [
        line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["sp"], ["mup"])
    ]
    assert [(p, int(w)) for p, w, *_ in lines] == [("sp", 16), ("sp", 32), ("mup", 16), ("mup", 32)]
    assert all(float(best) in (0.01, 0.1) for *_, best, _ in lines)
    assert png.read_bytes()[:4] == b"\x89PNG"
