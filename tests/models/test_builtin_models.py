"""Built-in models: each trains through the sweep under every parametrization that applies."""

import math

import pytest
import torch

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.errors import SweepError
from modelscape.models import BUILTIN_MODELS, CNN, MLP, ResNet, Transformer
from modelscape.models import parametrize as P

WIDTH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def flat_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 6, generator=gen, device=gen.device)
        return Xb, Xb[:, 0] + 0.5 * Xb[:, 1]

    return batch_fn


def image_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 2, 5, 5, generator=gen, device=gen.device)
        return Xb, Xb[:, 0].mean(dim=(1, 2)) * 3

    return batch_fn


def sequence_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, 3, generator=gen, device=gen.device)
        return Xb, Xb[..., 0].mean(dim=1) * 2

    return batch_fn


def readout_multiplier(model, **kwargs):
    """1 for a plain readout, else the parametrized readout's multiplier."""
    readout = P.weight_layers(model)[-1][1]
    return float(readout.multiplier) if isinstance(readout, P.ParametrizedLinear) else 1.0


# model -> (batch function, variance of its target: the loss of the centered model at init)
CASES = {
    "MLP": (flat_bfn, 1.25),
    "CNN": (image_bfn, 9 / 25),
    "ResNet": (image_bfn, 9 / 25),
    "Transformer": (sequence_bfn, 1.0),
}
MUP_FAMILY, NTP_FAMILY = ("mup", "mfp", "mup-lr"), ("ntp", "ntp-lr")
# Base LRs that train each model in 80 steps at width 8. The NTK parametrizations step every
# layer by LR/fan_in, and convolutions have fan_in 9 * channels, so those get larger ones.
LRS = {
    "MLP": {"sp": 0.2, **dict.fromkeys(MUP_FAMILY, 0.2), **dict.fromkeys(NTP_FAMILY, 0.5)},
    "CNN": {"sp": 0.2, **dict.fromkeys(MUP_FAMILY, 0.5), **dict.fromkeys(NTP_FAMILY, 1.0)},
    "ResNet": {"sp": 0.2, **dict.fromkeys(MUP_FAMILY, 0.2), **dict.fromkeys(NTP_FAMILY, 1.0)},
    "Transformer": {"sp": 0.2},
}


def sweep(model, params, bfn, **overrides):
    settings = dict(MODEL_CLASS=model, WIDTH=WIDTH, DEPTH=2, MAX_ITER=80, N_SAMPLES=32,
                    N_TEST=256, DEVICES=["cpu"], LOSS_CHECKPOINTS=[1e-9])  # fmt: skip
    cfg = vars(base_args(**{**settings, **overrides}))
    cfg["otherreturns"] = {"readout_mult": readout_multiplier}
    return run_job_iterator([list(params)], ["PARAMETRIZATION"], cfg, {"base_bfn": bfn},
                            progress=False)  # fmt: skip


def test_every_builtin_model_and_parametrization_is_covered():
    assert set(CASES) == set(LRS) == set(BUILTIN_MODELS)
    assert all(set(LRS[name]) == set(P.PARAMETRIZATIONS) for name in ("MLP", "CNN", "ResNet"))


@pytest.mark.parametrize("name", list(CASES))
def test_builtin_model_trains_under_each_parametrization(name):
    bfn, target_var = CASES[name]
    lrs = LRS[name]
    # mupify's readout multipliers: mup and ntp 1/sqrt(n), mfp 1/n, sp and the -lr variants 1
    expected = {"sp": 1.0, "ntp": 1 / math.sqrt(WIDTH), "mup": 1 / math.sqrt(WIDTH),
                "mfp": 1 / WIDTH, "ntp-lr": 1.0, "mup-lr": 1.0}  # fmt: skip
    for lr in sorted(set(lrs.values())):
        group = [p for p in lrs if lrs[p] == lr]
        result = sweep(name, group, bfn, LR=lr)
        for param in group:
            record = result.record(param)
            assert record.status == "ok", (param, record.error)
            assert record.test_loss < 0.6 * target_var, (param, record.test_loss)
            assert record.grabs["readout_mult"] == pytest.approx(expected[param]), param


def test_transformer_under_mup_fails_before_training_with_the_reason():
    with pytest.raises(SweepError, match=r"attention.*PARAMETRIZATION='sp'"):
        sweep("Transformer", ["sp", "mup"], sequence_bfn)


def test_models_check_their_input_shapes():
    with pytest.raises(ValueError, match=r"CNN takes images.*Use MODEL_CLASS='MLP'"):
        CNN(in_shape=(6,), d_out=1, width=4, depth=1)
    with pytest.raises(ValueError, match=r"Transformer takes sequences"):
        Transformer(in_shape=(6,), d_out=1, width=8, depth=1)
    with pytest.raises(ValueError, match="divisible by heads=4"):
        Transformer(in_shape=(4, 3), d_out=1, width=6, depth=1)


def test_model_anatomy_is_what_the_parametrizations_assume():
    """Readin first, readout last, width = the hidden fan: what mupify's rules are keyed on."""
    cases = [
        (MLP(d_in=6, d_out=2, width=16, depth=3), 4, [6, 16, 16, 16]),
        (CNN((2, 5, 5), 2, 16, depth=2), 3, [2 * 9, 16 * 9, 16]),
        (ResNet((5, 5), 2, 16, depth=2), 6, [9] + [16 * 9] * 4 + [16]),
    ]
    for model, n_layers, fan_ins in cases:
        layers, width = P.anatomy(model)
        assert len(layers) == n_layers and width == 16
        assert [r.fan_in for r in P.layer_scales(model, "mup")] == fan_ins
        assert [role for _, _, role in layers][:: n_layers - 1] == ["readin", "readout"]


def test_resnet_branch_scale_keeps_the_stream_bounded():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6)
    deep = ResNet((6, 6), 1, 32, depth=16)
    P.apply(deep, "mup", torch.optim.SGD, 0.1, {})
    with torch.no_grad():
        stream = deep.stem(x)
        for block in deep.blocks:
            stream = stream + deep.branch_scale * block(stream)
    assert 0.3 < stream.std().item() < 5.0
