"""Ports of the original's flows through the public API: its namespace, its result types, its
public modules, and what its internal tests checked (spectral norms under muP/NTP, centering,
randomness across trials)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import modelscape
from modelscape import ExptTrace
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args, parse_args
from modelscape.compat.model import (
    MLP,
    CenteredWrapper,
    SimpleCNN,
    SimpleTransformer,
    centeredmodel,
)
from modelscape.compat.utils import ensure_numpy, ensure_torch, load_json
from modelscape.data.data import compute_hermite_basis, get_powerlaw, get_synthetic_X
from modelscape.data.mlp_grabs import empirical_ntk, empirical_ntk_trace, get_Win, get_Wout
from modelscape.data.monomial import Monomial, generate_hea_monomials
from modelscape.data.ntk_coeffs import get_relu_level_coeff_fn
from modelscape.models import parametrize as P


def random_bfn(bsz, gen=None, X=None, y=None, dim=4, **kwargs):
    """The original tests' batch function."""

    def batch_fn(step):
        Xb = torch.randn(bsz, dim, generator=gen, device=gen.device)
        return Xb, torch.randn(bsz, generator=gen, device=gen.device)

    return batch_fn


def original_config(**extra):
    cfg = {"LR": 1e-2, "MAX_ITER": 2, "LOSS_CHECKPOINTS": [1e-1], "EMA_SMOOTHER": 0.0,
           "ONLYTHRESHOLDS": True, "VERBOSE": False, "ONLINE": True, "N_TEST": 8, "SEED": 0,
           "DIM": 4, "width": 8, "depth": 2, "DEVICES": ["cpu"]}  # fmt: skip
    cfg.update(extra)
    return cfg


def run(iterators, names, cfg, **bfn):
    with pytest.warns(FutureWarning):
        return run_job_iterator(
            iterators, names, cfg, {"base_bfn": random_bfn, "dim": 4, **bfn}, progress=False
        )


def test_namespace_n_samples_is_an_iterator_and_gamma_a_value_and_an_axis():
    args = base_args()
    assert args.N_SAMPLES == [1024] and parse_args([]).N_SAMPLES == [1024]
    assert parse_args(["--N_SAMPLES", "8", "16"]).N_SAMPLES == [8, 16]
    args.N_SAMPLES = [8]
    args.GAMMA = [0.5, 2.0]
    args.MAX_ITER = 5e0
    args.LOSS_CHECKPOINTS = 0.1
    args.N_TEST = 8
    args.DEVICES = ["cpu"]
    with pytest.warns(FutureWarning):
        args.width = 8
    iterators = [args.N_SAMPLES, range(2), args.GAMMA]
    result = run_job_iterator(
        iterators, ["ntrain", "trial", "GAMMA"], vars(args).copy(),
        {"base_bfn": random_bfn}, progress=False,
    )  # fmt: skip
    assert result["var_axes"] == ["ntrain", "trial", "GAMMA"]
    assert sorted(result["jobs"]) == [(8, t, g) for t in (0, 1) for g in (0.5, 2.0)]
    assert all(s == "ok" for s in result["status"].values())
    # one value in a list is that value, not an extra axis
    one = run_job_iterator([range(1)], ["trial"], vars(args) | {"GAMMA": [2.0]},
                           {"base_bfn": random_bfn}, progress=False)  # fmt: skip
    assert one["var_axes"] == ["trial"]


def test_scalar_grabs_are_hashable_scalars():
    grabs = {"alpha_val": lambda model, opt, alpha, **kw: float(alpha)}
    result = run([[4], [0], [1.5, 2.5]], ["ntrain", "trial", "alpha"],
                 original_config(otherreturns=grabs))  # fmt: skip
    values = list(result["extras"]["alpha_val"]["config2outcome"].values())
    assert set(values) == {1.5, 2.5}
    assert all(isinstance(v, (float, np.floating)) and np.ndim(v) == 0 for v in values)


def test_trace_keys_str_convert_non_plain_values():
    targets = [Monomial({0: 1}), Monomial({1: 2})]
    result = run([[4], [0], targets], ["ntrain", "trial", "monomials"], original_config())
    keys = set(result["losses"]["config2outcome"])
    assert keys == {(4, 0, "$x_{0}$"), (4, 0, "$x_{1}^2$")}
    trace = ExptTrace.deserialize(result["losses"])
    assert np.asarray(trace[:, :, :]).shape == (1, 1, 2)
    assert result.record(4, 0, targets[1]).status == "ok"


def test_every_trace_exists_nan_filled_when_every_job_fails():
    def broken(model, opt, **kw):
        raise RuntimeError("boom")

    cfg = original_config(post_init_fn=broken, otherreturns={"g": lambda **kw: 1.0})
    result = run([[4], [0, 1]], ["ntrain", "trial"], cfg)
    assert len(result["errors"]) == 2
    for trace in (result["losses"], result["timekeys"], result["extras"]["g"]):
        assert set(trace["config2outcome"]) == {(4, 0), (4, 1)}
        assert all(np.isnan(v).all() for v in trace["config2outcome"].values())


def test_trials_draw_different_data_and_weights_and_a_rerun_repeats_them():
    grabs = {
        "xte_sum": lambda X_te, **kw: float(X_te.sum()),
        "w1_head": lambda model, **kw: model.input_layer.weight.detach().flatten()[:10],
    }
    cfg = original_config(MAX_ITER=1, ONLYTHRESHOLDS=False, otherreturns=grabs)
    first = run([[8], [0, 1]], ["ntrain", "trial"], dict(cfg))
    again = run([[8], [0, 1]], ["ntrain", "trial"], dict(cfg))
    for grab in ("xte_sum", "w1_head"):
        a = first["extras"][grab]["config2outcome"]
        assert not np.allclose(a[(8, 0)], a[(8, 1)])
        b = again["extras"][grab]["config2outcome"]
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_centering_starts_the_trained_function_at_zero():
    X_te, y_te = torch.randn(16, 4), torch.full((16,), 2.0)
    first_loss = {"f": lambda model, X_te, **kw: float(model(X_te).abs().mean())}
    common = dict(MAX_ITER=1, LR=0.0, X_te=X_te, y_te=y_te, otherreturns=first_loss)
    centered = run([[8], [0]], ["ntrain", "trial"], original_config(**common, CENTER=True))
    raw = run([[8], [0]], ["ntrain", "trial"], original_config(**common, CENTER=False))
    # the network itself is not zero, but the centered function is: its test loss is mean(y^2)
    assert centered["extras"]["f"]["config2outcome"][(8, 0)] > 0.01
    assert centered["losses"]["config2outcome"][(8, 0)] == pytest.approx(4.0, rel=1e-6)
    assert raw["losses"]["config2outcome"][(8, 0)] != pytest.approx(4.0, rel=1e-3)


def test_centered_wrapper_outputs_zero_then_follows_the_model():
    model = MLP(d_in=4, width=8, depth=2, d_out=1)
    wrapped = centeredmodel(model)
    assert isinstance(wrapped, CenteredWrapper)
    x = torch.randn(5, 4)
    assert torch.equal(wrapped(x), torch.zeros(5, 1))
    with torch.no_grad():
        model.output_layer.bias.add_(1.0)
    assert torch.allclose(wrapped(x), torch.ones(5, 1))
    wrapped(x).sum().backward()
    assert model.output_layer.bias.grad is not None
    assert all(p.grad is None for p in wrapped.baseline.parameters())
    wrapped.recenter()
    assert torch.equal(wrapped(x), torch.zeros(5, 1))


def _hidden_norms(width, param, steps=10, lr=0.5):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 16, generator=gen)
    y = X[:, 0] * X[:, 1]
    model = MLP(d_in=16, width=width, depth=2, d_out=1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    modelscape.mupify(model, opt, param)
    layer = model.hidden_layers[0]
    g = float(layer.multiplier)
    w0 = layer.weight.detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        ((model(X).squeeze(-1) - y) ** 2).mean().backward()
        opt.step()
    spectral = lambda W: float(torch.linalg.matrix_norm(g * W, ord=2))  # noqa: E731
    return spectral(w0), spectral(layer.weight.detach() - w0)


def _slope(widths, values):
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def test_spectral_norms_of_hidden_weights_under_mup_and_ntp(one_thread):
    widths = [64, 128, 256, 512]
    mup = [_hidden_norms(w, "mup") for w in widths]
    ntp = [_hidden_norms(w, "ntp") for w in widths]
    # muP: the effective hidden weights and their updates are O(1) in width
    assert abs(_slope(widths, [i for i, _ in mup])) < 0.1
    assert abs(_slope(widths, [d for _, d in mup])) < 0.15
    # NTP: O(1) at init, but updates shrink like 1/sqrt(width) (the lazy regime)
    assert abs(_slope(widths, [i for i, _ in ntp])) < 0.1
    assert -1.0 < _slope(widths, [d for _, d in ntp]) < -0.3


class Momentumless(torch.optim.Optimizer):
    """A custom optimizer, like the original's example Muon: plain gradient steps."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    "opt_cls, rule",
    [(torch.optim.SGD, "sgd"), (torch.optim.Adam, "adam"), (torch.optim.AdamW, "adam"),
     (torch.optim.RMSprop, "adam"), (torch.optim.Adagrad, "adam")],
)  # fmt: skip
def test_mupify_takes_any_torch_optimizer_by_its_update_type(opt_cls, rule):
    model = MLP(d_in=4, width=32, depth=2, d_out=1)
    opt = opt_cls(model.parameters(), lr=0.1)
    modelscape.mupify(model, opt, "mup")
    expected = [row.lr_scale * 0.1 for row in P.layer_scales(MLP(4, 32, 2, 1), "mup", rule)]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)


def test_mupify_warns_and_uses_the_sgd_rule_for_an_unknown_optimizer():
    model = MLP(d_in=4, width=32, depth=2, d_out=1)
    opt = Momentumless(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="Momentumless is not in modelscape's optimizer table; "
                      "using the SGD rule"):  # fmt: skip
        modelscape.mupify(model, opt, "mup")
    expected = [row.lr_scale * 0.1 for row in P.layer_scales(MLP(4, 32, 2, 1), "mup", "sgd")]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)
    modelscape.rescale(model, 2.0, opt)
    assert float(model.output_layer.multiplier) == pytest.approx(
        P.layer_scales(MLP(4, 32, 2, 1), "mup", "sgd")[-1].multiplier / 2
    )


def test_mlp_is_the_originals_network():
    model = MLP(d_in=3, width=6, depth=3, d_out=2)
    assert MLP is modelscape.MLP
    names = [n for n, _ in model.named_parameters()]
    assert names == ["input_layer.weight", "input_layer.bias", "hidden_layers.0.weight",
                     "hidden_layers.0.bias", "hidden_layers.1.weight", "hidden_layers.1.bias",
                     "output_layer.weight", "output_layer.bias"]  # fmt: skip
    x = torch.randn(5, 3)
    acts, out = model.get_activations(x)
    assert [a.shape for a in acts] == [(5, 6)] * 3 and torch.equal(out, model(x))
    assert torch.equal(acts[0], torch.relu(model.input_layer(x)))
    zero = MLP(d_in=3, width=6, depth=1, d_out=1, forcezeros=True, nonlinearity=nn.Tanh())
    assert torch.equal(zero(x), torch.zeros(5, 1)) and isinstance(zero.nonlin, nn.Tanh)
    assert [r.role for r in P.layer_scales(model, "mup")] == ["readin", "hidden", "hidden",
                                                               "readout"]  # fmt: skip


def test_simple_cnn_and_transformer_train_in_a_sweep():
    def images(bsz, gen, X=None, y=None, **kw):
        return lambda step: (torch.randn(bsz, 2, 5, 5, generator=gen), torch.randn(bsz))

    def sequences(bsz, gen, X=None, y=None, **kw):
        return lambda step: (torch.randn(bsz, 3, 4, generator=gen), torch.randn(bsz))

    for cls, bfn in ((SimpleCNN, images), (SimpleTransformer, sequences)):
        cfg = {"MODEL_CLASS": cls, "WIDTH": 8, "MAX_ITER": 2, "N_SAMPLES": 4, "N_TEST": 4,
               "DEVICES": ["cpu"], "LOSS_CHECKPOINTS": [0.1]}  # fmt: skip
        result = run_job_iterator([[0]], ["trial"], cfg, {"base_bfn": bfn}, progress=False)
        assert result["status"] == {(0,): "ok"}, result["errors"]


def test_utils_convert_and_load(tmp_path):
    t = ensure_torch(np.arange(3), device="cpu")
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    assert ensure_numpy(torch.ones(2)).tolist() == [1.0, 1.0]
    (tmp_path / "m.json").write_text('[{"0": 1}]')
    assert load_json(tmp_path / "m.json") == [{"0": 1}]


def test_monomials_and_hea_order_use_the_library():
    m = Monomial({0: 2, 3: 1})
    assert str(m) == "$x_{0}^2x_{3}$" and Monomial.from_repr(str(m)) == m
    assert m.degree() == 3 and m.max_degree() == 2 and hash(m) == hash(Monomial({3: 1, 0: 2}))
    eig = get_powerlaw(20, 1.5)
    level = get_relu_level_coeff_fn(eig, weight_variance=1, bias_variance=1)
    values, monomials = generate_hea_monomials(eig, 30, level, kmax=4)
    assert monomials[0] == Monomial() and len(monomials) == 30
    assert np.all(np.diff(values[1:]) <= 1e-15) and values[0] == pytest.approx(level(0))
    assert Monomial({0: 1}) in monomials and Monomial({0: 1, 1: 1}) in monomials


def test_hermite_basis_is_orthonormal_on_gaussian_data():
    X, eig = get_synthetic_X(d=6, N=20000, gen=torch.Generator().manual_seed(0))
    assert torch.allclose(eig.sum().cpu(), torch.tensor(1.0))
    H = compute_hermite_basis(X, [Monomial({0: 1}), Monomial({1: 2}), Monomial({0: 1, 2: 1})])
    gram = H.T @ H  # columns carry 1/sqrt(N): the Gram matrix estimates E[h_i h_j]
    assert np.allclose(gram, np.eye(3), atol=0.05)


def test_empirical_ntk_is_the_jacobian_gram():
    model = MLP(d_in=3, width=5, depth=1, d_out=1)
    X = torch.randn(4, 3)
    K = empirical_ntk(model, X)
    grad_sq = []
    for i in range(4):
        model.zero_grad()
        model(X[i : i + 1]).sum().backward()
        grad_sq.append(sum(float((p.grad**2).sum()) for p in model.parameters()))
    assert np.allclose(np.diag(K), grad_sq, rtol=1e-5)
    assert empirical_ntk_trace(model, X) == pytest.approx(sum(grad_sq), rel=1e-5)
    W, b = get_Win(model)
    assert torch.equal(W, model.input_layer.weight) and W is not model.input_layer.weight
    assert get_Wout(model)[0].shape == (1, 5)


def test_level_coefficients_match_the_originals_closed_form():
    eig = get_powerlaw(50, 1.5)
    level = get_relu_level_coeff_fn(eig, weight_variance=1, bias_variance=1)
    # the original's closed form: c_l = pref * scale**l * G_l(c0), q = b + w * sum(eig)
    q = 1 + eig.sum()
    c0, pref, scale = 1 / q, q / (2 * math.pi), 1 / q
    g0 = math.sqrt(1 - c0**2) + 2 * (math.pi - math.acos(c0)) * c0
    g1 = 2 * (math.pi - math.acos(c0)) + c0 / math.sqrt(1 - c0**2)
    g2 = (3 - 2 * c0**2) / (1 - c0**2) ** 1.5
    for ell, g in enumerate((g0, g1, g2)):
        assert level(ell) == pytest.approx(pref * scale**ell * g, rel=1e-9)
