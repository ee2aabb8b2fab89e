"""Helpers shared by the tests: a batch function, a tiny sweep's config, the sweep itself, and
tiny CIFAR-10 files in the real format."""

import pickle

import numpy as np
import torch

from modelscape import engine, run_sweep
from modelscape.cli.args import base_args


def quadratic_bfn(bsz, gen, X=None, y=None, d=6, **kwargs):
    """Online batches of ``x0 * x1 + 0.5 * x2`` on ``d`` Gaussian inputs, from the job's ``gen``."""

    def batch_fn(step):
        Xb = torch.randn(bsz, d, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1] + 0.5 * Xb[:, 2]

    return batch_fn


def config(**overrides):
    """A tiny one-job-at-a-time sweep on the CPU whose jobs run all MAX_ITER steps."""
    hp = dict(WIDTH=16, MAX_ITER=60, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[1e-9], BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def trial_sweep(cfg, trials, bfn, grabs, **kwargs):
    """``run_sweep`` over a ``trial`` axis with ``grabs``, without a progress bar."""
    return run_sweep(
        [list(trials)],
        ["trial"],
        {**cfg, "otherreturns": grabs},
        {"base_bfn": bfn},
        progress=False,
        **kwargs,
    )


def reference(jobs, spec):
    """Each job's record from the one-job loop on the CPU: what a stack must reproduce."""
    return {job.key: engine.run_job(job, spec, torch.device("cpu")) for job in jobs}


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    m = ~np.isnan(a)
    return float(np.max(np.abs(a[m] - b[m]) / np.maximum(np.abs(a[m]), 1e-300), initial=0.0))


def assert_same(ref, got, tol=1e-5):
    assert set(ref) == set(got)
    for key, r in ref.items():
        g = got[key]
        assert g.status == r.status, (key, r.error, g.error, g.traceback)
        assert g.steps == r.steps, key
        np.testing.assert_array_equal(g.timekeys, r.timekeys)
        if r.status == "ok":
            assert rel(r.train_loss, g.train_loss) <= tol
            assert rel(r.test_loss, g.test_loss) <= tol
        assert set(g.grabs) == set(r.grabs)
        for name in r.grabs:
            assert rel(r.grabs[name], g.grabs[name]) <= tol, name
        assert (r.curves is None) == (g.curves is None)
        for name in r.curves or {}:
            assert r.curves[name].shape == g.curves[name].shape
            assert rel(r.curves[name], g.curves[name]) <= tol, name


def write_fake_cifar(folder, n_per_batch=4, n_test=3):
    """Tiny CIFAR-10 batches in the real format: pickled dicts with bytes keys, uint8 rows
    of 3072 = 3 channels x 32 x 32 (channel-major, then row-major)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, labels)
    return written


def monomial_sweep(axes: dict, save_dir=None, **overrides):
    """A small real sweep of Hermite-monomial targets (``monomial_bfn``, d=4) over ``axes``
    (name -> values, e.g. target, ntrain, trial): offline, width 16, 40 steps unless
    ``overrides`` say otherwise. What the analysis, plotting and run-folder tests look at."""
    from modelscape.data import monomial_bfn

    settings = dict(
        WIDTH=16, DEPTH=1, LR=0.2, ONLINE=False, MAX_ITER=40, N_TEST=200,
        LOSS_CHECKPOINTS=[0.9, 0.5], EVAL_EVERY=10, DEVICES=["cpu"], SAVE_DIR=save_dir,
    )  # fmt: skip
    return run_sweep(
        list(axes.values()),
        list(axes),
        base_args(**{**settings, **overrides}),
        {"base_bfn": monomial_bfn, "d": 4, "alpha": 1.0},
        progress=False,
    )
