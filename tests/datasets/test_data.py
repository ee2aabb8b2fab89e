"""modelscape.data: HEA eigenvalues, Hermite targets, Monomial, image loaders, batch functions."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from sweeps import write_fake_cifar

from modelscape.data import (
    Monomial,
    cifar10_folder,
    grayscale,
    hea_eigenvalue,
    hea_eigenvalues,
    hermite,
    load_cifar10,
    load_digits,
    load_image_data,
    monomial_bfn,
    normalize_samples,
    one_hot,
    pool_bfn,
    powerlaw_eigenvalues,
    powerlaw_gaussian,
    principal_coordinates,
    relu_ntk_level_coefficients,
    select_classes,
    top_hea_monomials,
    zca_whiten,
)
from modelscape.sweep.jobs import stable_repr

# ---------------------------------------------------------------- HEA eigenvalues


def test_level_coefficients_one_hidden_layer_no_bias_by_hand():
    # Theta(t) = (1/2)(k1(t) + t k0(t)) on the unit sphere: c_l = Theta^(l)(0) computed by hand
    # from k0 = 1/2 + arcsin(t)/pi and k1 = (sqrt(1 - t^2) + (pi - arccos t) t)/pi
    c = relu_ntk_level_coefficients([0.5, 0.3, 0.2], 4, depth=1, bias_variance=0.0)
    expected = [1 / (2 * math.pi), 0.5, 3 / (2 * math.pi), 0.0, 5 / (2 * math.pi)]
    np.testing.assert_allclose(c, expected, rtol=1e-12, atol=1e-15)


def test_level_coefficients_with_bias_by_hand():
    # w = b = 1, |x|^2 = 1: q = 2, c(t) = (1 + t)/2, Theta = k1(c) + c k0(c) + 1
    c = relu_ntk_level_coefficients([0.6, 0.4], 1, depth=1, bias_variance=1.0)
    c0 = 5 / 3 + math.sqrt(3) / (2 * math.pi)  # k1(1/2) + k0(1/2)/2 + 1
    c1 = 2 / 3 + 1 / (2 * math.pi * math.sqrt(3))  # (2 k0(1/2) + (1/2) k0'(1/2)) / 2
    np.testing.assert_allclose(c, [c0, c1], rtol=1e-12)


def _relu_ntk_closed_form(t: np.ndarray, rho: float, depth: int, w: float, b: float):
    """The NTK recursion evaluated pointwise with arccos formulas (no power series)."""
    sigma, q = w * t + b, w * rho + b
    theta = sigma
    for _ in range(depth):
        c = np.clip(sigma / q, -1, 1)
        k0 = (np.pi - np.arccos(c)) / np.pi
        k1 = (np.sqrt(1 - c**2) + (np.pi - np.arccos(c)) * c) / np.pi
        sigma = w * q / 2 * k1 + b
        theta = sigma + theta * (w / 2 * k0)
        q = w * q / 2 + b
    return theta


@pytest.mark.parametrize(
    "depth,bias,rho,w", [(1, 0.0, 1.0, 1.0), (2, 0.0, 1.0, 1.0), (3, 0.5, 1.0, 1.0),
                         (1, 1.0, 2.5, 2.0), (2, 0.3, 0.4, 1.5)]
)  # fmt: skip
def test_level_coefficients_sum_back_to_the_kernel(depth, bias, rho, w):
    # rho = |x|^2 = sum(gamma) and the weight variance w enter only through q and c = sigma/q;
    # spectra that do not sum to 1 check that they are used where they belong
    gamma = rho * powerlaw_eigenvalues(8, 1.0).numpy()
    c = relu_ntk_level_coefficients(gamma, 30, depth=depth, weight_variance=w, bias_variance=bias)
    t = np.linspace(-0.4, 0.4, 9) * rho
    series = sum(c[k] * t**k / math.factorial(k) for k in range(c.size))
    np.testing.assert_allclose(series, _relu_ntk_closed_form(t, rho, depth, w, bias), rtol=1e-6)


def test_hea_eigenvalues_match_the_empirical_ntk_spectrum():
    """The ansatz itself: eigendecompose the one-hidden-layer ReLU NTK Gram matrix of Gaussian
    samples (their norms vary, as real inputs' do) and compare with c_l * prod gamma_i^alpha_i.
    A wrong 1/l! convention or Hermite normalization would be off by 2x at degree 2."""
    d, n, b = 40, 2000, 1.0
    gamma = powerlaw_eigenvalues(d, 1.5, offset=3.0)
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = (z * gamma.sqrt()).numpy()
    sq = (X**2).sum(1)
    q = sq + b
    norm = np.sqrt(np.outer(q, q))
    sigma = X @ X.T + b
    cos = np.clip(sigma / norm, -1, 1)
    k0 = (np.pi - np.arccos(cos)) / np.pi
    k1 = (np.sqrt(1 - cos**2) + (np.pi - np.arccos(cos)) * cos) / np.pi
    K = (norm / 2 * k1 + b + sigma * k0 / 2) / n  # Sigma2 + Theta1 * Sigma2_dot
    coeffs = relu_ntk_level_coefficients(gamma, 4, depth=1, bias_variance=b)
    _, predicted = top_hea_monomials(gamma, 9, coeffs)  # the constant and x0..x7
    empirical = np.linalg.eigvalsh(K)[::-1][:9]
    np.testing.assert_allclose(empirical, predicted, rtol=0.1)
    for m in ("x0^2", "x0*x1", "x1*x2"):  # degree 2: Rayleigh quotients of the targets
        f = Monomial(m)(z).numpy()
        f = (f - f.mean()) / np.linalg.norm(f - f.mean())
        assert f @ K @ f == pytest.approx(hea_eigenvalue(m, gamma, coeffs), rel=0.25)


def test_hea_eigenvalue_is_level_coefficient_times_eigenvalue_product():
    gamma = [0.5, 0.3, 0.2]
    c = relu_ntk_level_coefficients(gamma, 4)
    assert hea_eigenvalue("x0", gamma, c) == pytest.approx(0.5 * 0.5)
    assert hea_eigenvalue("x0^2", gamma, c) == pytest.approx(3 / (2 * math.pi) * 0.25)
    assert hea_eigenvalue("x0*x1", gamma, c) == pytest.approx(3 / (2 * math.pi) * 0.15)
    assert hea_eigenvalue("x1^2*x2^2", gamma, c) == pytest.approx(5 / (2 * math.pi) * 0.09 * 0.04)
    assert hea_eigenvalue("1", gamma, c) == pytest.approx(1 / (2 * math.pi))
    with pytest.raises(ValueError, match="max_degree"):
        hea_eigenvalue("x0^5", gamma, c)


def test_top_hea_monomials_match_brute_force_order():
    gamma = powerlaw_eigenvalues(5, 1.3, offset=0.5).numpy()
    c = relu_ntk_level_coefficients(gamma, 4, depth=2, bias_variance=0.3)
    every = [
        Monomial({i: e for i, e in enumerate(exps)})
        for exps in itertools.product(range(5), repeat=5)
        if sum(exps) <= 4
    ]
    brute = np.sort(hea_eigenvalues(every, gamma, c))[::-1]
    monomials, values = top_hea_monomials(gamma, 60, c)
    np.testing.assert_allclose(values, brute[:60], rtol=1e-12)
    np.testing.assert_allclose(hea_eigenvalues(monomials, gamma, c), values, rtol=1e-12)
    assert len(set(monomials)) == 60


def test_top_hea_monomials_skip_vanishing_levels():
    # bias-free one-hidden-layer ReLU NTK: odd levels above 1 vanish
    monomials, values = top_hea_monomials([0.5, 0.3, 0.2], 30, relu_ntk_level_coefficients([1], 4))
    assert all(m.degree != 3 for m in monomials) and np.all(values > 0)
    with pytest.raises(ValueError, match="decreasing"):
        top_hea_monomials([0.2, 0.5], 3, [1.0, 1.0])


# ---------------------------------------------------------------- Hermite and Monomial


def test_hermite_matches_explicit_polynomials():
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(hermite(0, z), torch.ones_like(z))
    torch.testing.assert_close(hermite(2, z), (z**2 - 1) / math.sqrt(2))
    torch.testing.assert_close(hermite(3, z), (z**3 - 3 * z) / math.sqrt(6))
    torch.testing.assert_close(hermite(4, z), (z**4 - 6 * z**2 + 3) / math.sqrt(24))


def test_hermite_orthonormal_on_gaussian_samples():
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = torch.stack([hermite(k, z) for k in range(5)], 1)
    gram = (H.T @ H / z.shape[0]).numpy()
    np.testing.assert_allclose(gram, np.eye(5), atol=0.03)


def test_multivariate_monomials_orthonormal_on_powerlaw_data():
    X, z, gamma = powerlaw_gaussian(400_000, 4, 1.5, gen=torch.Generator().manual_seed(1))
    assert torch.allclose(X, z * gamma.sqrt().float())
    monomials = [Monomial(s) for s in ["x0", "x1", "x0^2", "x0*x1", "x2^2*x3", "x0^3"]]
    H = torch.stack([m(z.double()) for m in monomials], 1)
    gram = (H.T @ H / z.shape[0]).numpy()
    np.testing.assert_allclose(gram, np.eye(len(monomials)), atol=0.03)


def test_monomial_parse_print_degree_hash():
    m = Monomial("x3*x0^2")
    assert str(m) == "x0^2*x3"
    assert m == Monomial({0: 2, 3: 1}) == "x0^2*x3"
    assert hash(m) == hash(Monomial("x0^2*x3"))
    assert m.degree == 3 and m.powers == {0: 2, 3: 1} and m.max_coordinate == 3
    assert Monomial("x1*x1") == Monomial("x1^2")
    assert Monomial("1").degree == 0 and str(Monomial({})) == "1"
    assert len({Monomial("x0"), Monomial({0: 1}), Monomial("x1")}) == 2
    assert sorted([Monomial("x0^2"), Monomial("x5"), Monomial("1")]) == ["1", "x5", "x0^2"]
    assert eval(repr(m)) == m
    assert pickle.loads(pickle.dumps(m)) == m
    assert stable_repr(m) == "Monomial('x0^2*x3')"  # so it can seed jobs as an iterator value
    with pytest.raises(ValueError, match="x<index>"):
        Monomial("y0^2")
    with pytest.raises(ValueError, match="coordinate 3"):
        m(torch.zeros(5, 3))


def test_principal_coordinates_recover_the_spectrum():
    X, _, gamma = powerlaw_gaussian(200_000, 6, 1.0, gen=torch.Generator().manual_seed(2))
    rot = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))[0]
    z, est, basis = principal_coordinates(X @ rot.T)
    np.testing.assert_allclose(est.numpy(), gamma.numpy(), rtol=0.03)
    np.testing.assert_allclose((z.T @ z / z.shape[0]).numpy(), np.eye(6), atol=1e-4)


# ---------------------------------------------------------------- images


def test_cifar10_loader_reads_the_pickle_format(tmp_path, monkeypatch):
    written = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    X, y = load_cifar10(tmp_path, "train")
    assert X.shape == (20, 3, 32, 32) and X.dtype == torch.float32 and y.dtype == torch.int64
    data, labels = written["data_batch_2"]
    # image 1 of batch 2 is row 5 overall; pixel (c, h, w) is byte c*1024 + h*32 + w
    assert X[5, 2, 7, 11].item() == pytest.approx(data[1, 2 * 1024 + 7 * 32 + 11] / 255)
    assert X[5, 0, 0, 0].item() == pytest.approx(data[1, 0] / 255)
    assert y[4:8].tolist() == labels
    Xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert Xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]
    monkeypatch.setenv("DATASETPATH", str(tmp_path))
    assert torch.equal(load_cifar10(split="test")[0], Xt)


def test_cifar10_missing_files_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("DATASETPATH", raising=False)
    with pytest.raises(FileNotFoundError, match="DATASETPATH"):
        cifar10_folder()
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path)
    assert "cifar-10-batches-py" in str(err.value) and "cs.toronto.edu" in str(err.value)


def test_cifar10_through_load_image_data(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py", n_per_batch=40, n_test=30)
    data = load_image_data("cifar10", root=str(tmp_path), classes=(0, 6), to_grayscale=True)
    assert data.X_train.shape[1:] == (1, 32, 32) and data.num_outputs == 1
    assert set(data.y_train.tolist()) <= {1.0, -1.0}
    rms = data.X_train.reshape(len(data.X_train), -1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms))


def test_digits_loader():
    X, y = load_digits("train")
    Xt, yt = load_digits("test")
    Xa, ya = load_digits(None)
    assert Xa.shape == (1797, 1, 8, 8) and len(X) + len(Xt) == 1797 and len(Xt) == 359
    assert X.min() >= 0 and X.max() == 1.0 and Xa[0, 0, 0, 2].item() == pytest.approx(5 / 16)
    assert sorted(y.tolist() + yt.tolist()) == sorted(ya.tolist())
    # the split is disjoint: no test image appears among the training images
    train_rows = {tuple(r) for r in X.reshape(len(X), -1).tolist()}
    dupes_in_all = len(Xa) - len({tuple(r) for r in Xa.reshape(len(Xa), -1).tolist()})
    overlap = sum(tuple(r) in train_rows for r in Xt.reshape(len(Xt), -1).tolist())
    assert overlap <= dupes_in_all
    Xb, yb = select_classes(X, y, [0, 6])
    assert (yb == 1).sum() == (y == 0).sum() and (yb == -1).sum() == (y == 6).sum()


def test_preprocessing():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(4, 3, 5, 5, generator=gen)
    gray = grayscale(rgb)
    assert gray.shape == (4, 1, 5, 5)
    assert gray[1, 0, 2, 3] == pytest.approx(
        (0.299 * rgb[1, 0, 2, 3] + 0.587 * rgb[1, 1, 2, 3] + 0.114 * rgb[1, 2, 2, 3]).item()
    )
    mix = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    X = torch.randn(20_000, 6, generator=gen, dtype=torch.float64) @ mix
    X = X - X.mean(0)
    W = zca_whiten(X, 0.0)
    np.testing.assert_allclose((W.T @ W / len(W)).numpy(), np.eye(6), atol=1e-6)
    soft = zca_whiten(X, 10.0)
    assert np.linalg.cond((soft.T @ soft).numpy()) < np.linalg.cond((X.T @ X).numpy())
    rms = normalize_samples(X).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms))
    assert one_hot(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    Xs, ys = select_classes(torch.arange(6.0), torch.tensor([3, 1, 2, 3, 1, 0]), [3, 1, 0])
    assert Xs.tolist() == [0, 1, 3, 4, 5] and ys.tolist() == [0, 1, 0, 1, 2]


# ---------------------------------------------------------------- batch functions


def test_monomial_bfn_follows_the_seed_protocol():
    def draw(seed):
        fn = monomial_bfn(64, torch.Generator().manual_seed(seed), target="x0*x2", d=5, alpha=1.0)
        return fn(0), fn(1)

    (X0, y0), (X1, y1) = draw(3)
    (X0b, _), _ = draw(3)
    assert torch.equal(X0, X0b) and not torch.equal(X0, X1)  # seeded; fresh batch each step
    gamma = powerlaw_eigenvalues(5, 1.0).float()
    z = X0 / gamma.sqrt()
    torch.testing.assert_close(y0, z[:, 0] * z[:, 2])
    fixed = monomial_bfn(64, torch.Generator(), X=X0, y=y0, target="x0")
    assert fixed(7)[0] is X0


def test_pool_bfn_draws_distinct_rows_of_the_pool():
    X_pool, y_pool = torch.arange(50.0)[:, None], torch.arange(50.0)
    fn = pool_bfn(20, torch.Generator().manual_seed(0), X_pool=X_pool, y_pool=y_pool, n_pool=30)
    X, y = fn(0)
    assert len(set(y.tolist())) == 20 and max(y.tolist()) < 30
    assert torch.equal(X[:, 0], y)
    with pytest.raises(ValueError, match="pool of 30"):
        pool_bfn(40, torch.Generator(), X_pool=X_pool, y_pool=y_pool, n_pool=30)
