"""The sweep runner and training loop, checked against hand computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from modelscape import ExptTrace, HParamError, HParams, SweepError
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args


def gaussian_bfn(bsz, gen, X=None, y=None, d=6, **kwargs):
    """Seed-style batch function: Gaussian inputs, target x0 * x1."""

    def batch_fn(step):
        if X is not None:
            return X, y
        Xb = torch.randn(bsz, d, generator=gen, device=gen.device)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


def config(**overrides):
    base = dict(WIDTH=16, MAX_ITER=40, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
                LOSS_CHECKPOINTS=[0.9, 0.5], VERBOSE=False)  # fmt: skip
    base.update(overrides)
    known = {k: v for k, v in base.items() if k in HParams.__dataclass_fields__}
    user = {k: v for k, v in base.items() if k not in known}
    return {**vars(base_args(**known)), **user}


def run(iterators, names, cfg, bfn=gaussian_bfn, **bfn_kwargs):
    return run_job_iterator(iterators, names, cfg, {"base_bfn": bfn, **bfn_kwargs}, progress=False)


class Scalar(nn.Module):
    """f(x) = w * x0 with w starting at 0: losses have a closed form."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (self.w * x[:, 0]).unsqueeze(-1)


def ones_bfn(bsz, gen, X=None, y=None, **kwargs):
    return lambda step: (torch.ones(bsz, 1), torch.ones(bsz))


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
def test_ema_curve_and_timekeys_match_a_hand_computation(gamma):
    lr, s, max_iter = 0.05, 0.9, 60
    thresholds = [0.5, 0.1, 1e-12]
    cfg = config(MODEL_CLASS=Scalar, CENTER=False, LR=lr, GAMMA=gamma, EMA_SMOOTHER=s,
                 MAX_ITER=max_iter, LOSS_CHECKPOINTS=thresholds, ONLYTHRESHOLDS=False,
                 ONLINE=False, N_SAMPLES=4, N_TEST=4)  # fmt: skip
    result = run([[0]], ["trial"], cfg, bfn=ones_bfn)
    # out = u = w/gamma and SGD runs at lr*gamma (gamma>=1) or lr*gamma**2 (gamma<1), so
    # (u - 1) <- (1 - 2*lr*c)(u - 1) with c = 1/gamma (gamma>=1) or 1 (gamma<1).
    c = 1.0 / gamma if gamma >= 1 else 1.0
    raw = (1 - 2 * lr * c) ** (2 * np.arange(max_iter))
    ema = np.empty(max_iter)
    ema[0] = raw[0]
    for t in range(1, max_iter):
        ema[t] = s * ema[t - 1] + (1 - s) * raw[t]
    expected_tk = [float(np.argmax(ema < th)) if (ema < th).any() else math.nan
                   for th in sorted(thresholds, reverse=True)]  # fmt: skip
    trace = ExptTrace.deserialize(result["train_losses"])
    np.testing.assert_allclose(trace[0], ema, rtol=1e-5)
    timekeys = ExptTrace.deserialize(result["timekeys"])[0]
    np.testing.assert_array_equal(timekeys, expected_tk)
    assert math.isnan(timekeys[2]) and timekeys[0] < timekeys[1]


def test_unreached_thresholds_are_nan_and_reached_ones_stop_training():
    cfg = config(MODEL_CLASS=Scalar, CENTER=False, LR=0.2, EMA_SMOOTHER=0.0, MAX_ITER=500,
                 LOSS_CHECKPOINTS=[0.5, 0.01], ONLINE=False, N_SAMPLES=4, N_TEST=4)  # fmt: skip
    result = run([[0]], ["trial"], cfg, bfn=ones_bfn)
    rec = result.record(0)
    # raw loss 0.36**t with EMA smoother 0: below 0.5 at t=1, below 0.01 at t=5
    assert list(rec.timekeys) == [1.0, 5.0]
    assert rec.steps == 6  # the crossing step's update is taken, then the job exits
    never = run([[0]], ["trial"], {**cfg, "LOSS_CHECKPOINTS": [1e-30], "MAX_ITER": 7}, ones_bfn)
    assert math.isnan(never.record(0).timekeys[0]) and never.record(0).steps == 7


def batch_sum(X_tr, **kwargs):
    return float(X_tr.sum())


def test_online_draws_a_fresh_batch_every_step_and_offline_one_set():
    names = ["trial"]
    grabs = {"xsum": batch_sum}
    online = run([[0]], names, config(ONLINE=True, ONLYTHRESHOLDS=False, EVAL_EVERY=1,
                                      LOSS_CHECKPOINTS=[1e-9], otherreturns=grabs))  # fmt: skip
    offline = run([[0]], names, config(ONLINE=False, ONLYTHRESHOLDS=False, EVAL_EVERY=1,
                                       LOSS_CHECKPOINTS=[1e-9], otherreturns=grabs))  # fmt: skip
    on = ExptTrace.deserialize(online["extras"]["xsum"])[0]
    off = ExptTrace.deserialize(offline["extras"]["xsum"])[0]
    assert on.shape == off.shape == (40,)
    assert len(np.unique(on)) == 40  # a new batch at each of the 40 steps
    assert len(np.unique(off)) == 1  # the same training set throughout


def test_offline_training_set_depends_on_the_trial_and_test_losses_are_recorded():
    result = run([[0, 1]], ["trial"], config(ONLINE=False, otherreturns={"xsum": batch_sum}))
    sums = ExptTrace.deserialize(result["extras"]["xsum"])
    assert sums[0] != sums[1]
    losses = ExptTrace.deserialize(result["losses"])
    assert np.all(np.isfinite(losses[:])) and losses[:].shape == (2,)


def test_grabs_receive_the_documented_arguments():
    seen = {}

    def probe(model, X_tr, y_tr, X_te, y_te, opt, step, **kwargs):
        seen.update(kwargs, model=model, X_tr=X_tr, X_te=X_te, y_te=y_te, opt=opt, step=step)
        return np.array([X_tr.shape[0], X_te.shape[0], step])

    cfg = config(MAX_ITER=5, LOSS_CHECKPOINTS=[1e-9], CLASSES=[0, 6], otherreturns={"p": probe})
    result = run([[32], [0], ["x0*x1"]], ["ntrain", "trial", "target"], cfg)
    assert isinstance(seen["model"], nn.Module)
    assert isinstance(seen["opt"], torch.optim.Optimizer)
    assert seen["CLASSES"] == [0, 6] and seen["target"] == "x0*x1" and seen["trial"] == 0
    assert seen["WIDTH"] == 16 and seen["N_SAMPLES"] == 32
    np.testing.assert_array_equal(ExptTrace.deserialize(result["extras"]["p"])[32, 0, "x0*x1"],
                                  [32, 64, 4])  # fmt: skip


def test_iterator_values_reach_the_batch_function_and_override_hyperparameters():
    calls = []

    def bfn(bsz, gen, X=None, y=None, target=None, **kwargs):
        calls.append((bsz, target))
        return gaussian_bfn(bsz, gen, X, y)

    result = run([[8, 16], ["a"], [0.5, 2.0]], ["ntrain", "target", "GAMMA"], config(), bfn=bfn)
    assert {c for c in calls if c[0] != 64} == {(8, "a"), (16, "a")}
    assert len(result["jobs"]) == 4 and result["var_axes"] == ["ntrain", "target", "GAMMA"]


def test_a_failing_job_does_not_sink_the_sweep(capsys):
    def bfn(bsz, gen, X=None, y=None, target=None, **kwargs):
        if target == "bad":
            raise RuntimeError("this target is broken")
        return gaussian_bfn(bsz, gen, X, y)

    result = run([["good", "bad", "fine"]], ["target"], config(), bfn=bfn)
    assert set(result["errors"]) == {("bad",)}
    err = result["errors"][("bad",)]
    assert "this target is broken" in err["message"] and "Traceback" in err["traceback"]
    losses = ExptTrace.deserialize(result["losses"])
    assert np.isfinite(losses["good"]) and np.isfinite(losses["fine"]) and np.isnan(losses["bad"])
    assert "1 of 3 jobs failed" in capsys.readouterr().err


def test_divergence_stops_the_job_and_is_not_an_error():
    result = run([[0.05, 1e6]], ["LR"], config(MAX_ITER=200, LOSS_CHECKPOINTS=[1e-9]))
    assert result["status"][(1e6,)] == "diverged" and result["status"][(0.05,)] == "ok"
    assert not result["errors"]
    assert result.record(1e6).steps < 200
    assert np.isnan(ExptTrace.deserialize(result["losses"])[1e6])


def test_identical_seeds_give_identical_results_and_other_seeds_differ():
    a = run([[16, 32], range(2)], ["ntrain", "trial"], config())
    b = run([[16, 32], range(2)], ["ntrain", "trial"], config())
    c = run([[16, 32], range(2)], ["ntrain", "trial"], config(SEED=7))
    la, lb, lc = (ExptTrace.deserialize(r["losses"])[:, :] for r in (a, b, c))
    np.testing.assert_array_equal(la, lb)
    assert not np.allclose(la, lc)
    assert la[0, 0] != la[0, 1]  # trials differ


def test_results_do_not_depend_on_which_jobs_share_the_sweep():
    full = run([[16, 32], range(2)], ["ntrain", "trial"], config())
    part = run([[32], [1]], ["ntrain", "trial"], config())
    assert full.record(32, 1).test_loss == part.record(32, 1).test_loss


def test_centering_starts_the_network_at_zero_output():
    def fixed_bfn(bsz, gen, X=None, y=None, **kwargs):
        Xf = torch.linspace(-1, 1, bsz * 3).reshape(bsz, 3)
        return lambda step: (Xf, Xf[:, 0] + 2.0)

    cfg = config(LR=0.0, MAX_ITER=1, N_SAMPLES=8, N_TEST=8, ONLINE=False)
    centered = run([[0]], ["trial"], {**cfg, "CENTER": True}, bfn=fixed_bfn).record(0)
    raw = run([[0]], ["trial"], {**cfg, "CENTER": False}, bfn=fixed_bfn).record(0)
    y = torch.linspace(-1, 1, 24).reshape(8, 3)[:, 0] + 2.0
    assert centered.train_loss == pytest.approx(float((y**2).mean()), rel=1e-6)
    assert raw.train_loss != pytest.approx(centered.train_loss, rel=1e-3)


def test_fixed_test_set_from_global_config():
    X_te = torch.zeros(5, 6)
    y_te = torch.full((5,), 3.0)
    result = run([[0]], ["trial"], config(X_te=X_te, y_te=y_te, LR=0.0, MAX_ITER=1))
    assert result.record(0).test_loss == pytest.approx(9.0)  # centered output 0, target 3


class Poly(nn.Module):
    def __init__(self, d_in, d_out, width, degree):
        super().__init__()
        self.degree = degree
        self.lin = nn.Linear(d_in * degree, d_out)
        self.width = width

    def forward(self, x):
        return self.lin(torch.cat([x**k for k in range(1, self.degree + 1)], dim=1))


def test_user_model_class_gets_arguments_by_name(tmp_path):
    seen = []

    def grab(model, **kwargs):
        seen.append((type(model).__name__, model.degree, model.width))
        return 0.0

    run([[0]], ["trial"], config(MODEL_CLASS=Poly, DEGREE=2, otherreturns={"g": grab}))
    assert set(seen) == {("Poly", 2, 16)}  # the preflight's call and the job's
    with pytest.raises(SweepError, match="give it as DEGREE"):  # one spelling per argument
        run([[0]], ["trial"], config(MODEL_CLASS=Poly, degree=2))
    with pytest.raises(SweepError, match="needs degree: add DEGREE"):
        run([[0]], ["trial"], config(MODEL_CLASS=Poly))
    path = tmp_path / "mymodel.py"
    path.write_text("import torch\nclass Lin(torch.nn.Linear):\n"
                    "    def __init__(self, d_in, d_out):\n"
                    "        super().__init__(d_in, d_out)\n")  # fmt: skip
    result = run([[0]], ["trial"], config(MODEL_CLASS=f"{path}:Lin"))
    assert result["status"][(0,)] == "ok"


def test_optimizer_and_loss_by_name_with_extra_arguments():
    adam = config(OPTIMIZER="Adam", OPTIMIZER_KWARGS={"betas": (0.8, 0.9)}, LOSS="L1Loss")
    ok = run([[0]], ["trial"], adam)
    assert ok["status"][(0,)] == "ok"
    with pytest.raises(SweepError, match="takes no momentum"):
        run([[0]], ["trial"], config(OPTIMIZER="Adam", MOMENTUM=0.9))
    with pytest.raises(SweepError, match="Choices: .*SGD"):
        run([[0]], ["trial"], config(OPTIMIZER="Sgd"))


def test_bfn_file_protocol(tmp_path):
    f = tmp_path / "mydata.py"
    f.write_text("import torch\n"
                 "def bfn(bsz, gen, X=None, y=None, scale=1.0, **kw):\n"
                 "    return lambda step: (torch.randn(bsz, 3, generator=gen),\n"
                 "                         scale * torch.ones(bsz))\n")  # fmt: skip
    result = run_job_iterator([[0]], ["trial"], config(LR=0.0, MAX_ITER=1),
                              {"bfn_file": str(f), "bfn_name": "bfn", "scale": 2.0},
                              progress=False)  # fmt: skip
    assert result.record(0).test_loss == pytest.approx(4.0)


@pytest.mark.parametrize(
    "iterators, names, cfg, bfn, match",
    [
        ([[1, 2]], ["a", "b"], {}, gaussian_bfn, "2 iterator_names"),
        ([[]], ["a"], {}, gaussian_bfn, "is empty"),
        ([[1]], ["a"], {"WIDTH": "wide"}, gaussian_bfn, "WIDTH='wide'"),
        ([[1]], ["a"], {"otherreturns": {"g": 3}}, gaussian_bfn, "not callable"),
        ([[1]], ["a"], {}, lambda bsz, gen, X=None, y=None, **k: lambda s: (torch.ones(bsz, 2),
                       torch.ones(bsz + 1)), "rows"),
        ([["x"]], ["WIDTH"], {}, gaussian_bfn, "WIDTH='x'"),
        ([[1]], ["DEVICES"], {}, gaussian_bfn, "cannot be an axis"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_training(iterators, names, cfg, bfn, match):
    with pytest.raises((HParamError, SweepError), match=match):
        run(iterators, names, config(**cfg), bfn=bfn)


def test_near_miss_config_key_is_an_error():
    with pytest.raises(HParamError, match="'WIDHT' is not a hyperparameter, but looks like WIDTH"):
        run([[0]], ["trial"], {**config(), "WIDHT": 3})


def test_list_valued_hyperparameter_becomes_an_axis():
    result = run([[0]], ["trial"], config(GAMMA=[0.5, 2.0]))
    assert result["var_axes"] == ["trial", "GAMMA"]
    assert set(result["jobs"]) == {(0, 0.5), (0, 2.0)}


def test_result_accessors_are_labelled():
    result = run([[16, 32], range(2)], ["ntrain", "trial"], config())
    ds = result.to_xarray()
    assert ds["test_loss"].dims == ("ntrain", "trial")
    assert list(ds["ntrain"].values) == [16, 32]
    assert ds["timekeys"].dims == ("ntrain", "trial", "threshold")
    assert float(ds["test_loss"].sel(ntrain=32, trial=1)) == result.record(32, 1).test_loss
    df = result.to_dataframe()
    assert len(df) == 4 and {"ntrain", "trial", "test_loss", "timekey_0.9"} <= set(df.columns)
    serial = result["losses"]
    assert set(serial) == {"var_names", "config2outcome", "outcome_shape"}
    assert serial["var_names"] == ["ntrain", "trial"] and (16, 0) in serial["config2outcome"]


def global_rng_bfn(bsz, gen, X=None, y=None, **kwargs):
    """Ignores `gen` (common in research code): draws from torch's global RNG."""

    def batch_fn(step):
        Xb = torch.randn(bsz, 6)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


@pytest.mark.parametrize("online", [False, True])
def test_a_batch_function_ignoring_gen_is_still_reproducible(online):
    cfg = config(ONLINE=online)
    first = run([range(3)], ["trial"], cfg, bfn=global_rng_bfn)
    torch.randn(7)  # move the caller's global RNG: results must not care
    second = run([range(3)], ["trial"], cfg, bfn=global_rng_bfn)
    losses = [r.test_loss for r in first.records]
    assert losses == [r.test_loss for r in second.records]
    assert len(set(losses)) == 3  # trials still differ


def test_bfn_file_works_on_worker_processes(tmp_path):
    f = tmp_path / "mydata.py"
    f.write_text("import torch\n"
                 "def bfn(bsz, gen, X=None, y=None, **kw):\n"
                 "    def batch_fn(step):\n"
                 "        X = torch.randn(bsz, 3, generator=gen)\n"
                 "        return X, X[:, 0] - X[:, 1]\n"
                 "    return batch_fn\n")  # fmt: skip
    bfn_config = {"bfn_file": str(f), "bfn_name": "bfn"}
    here = run_job_iterator([range(2)], ["trial"], config(), bfn_config, progress=False)
    two = run_job_iterator([range(2)], ["trial"], config(WORKERS_PER_DEVICE=2), bfn_config,
                           progress=False)  # fmt: skip
    assert [r.status for r in two.records] == ["ok", "ok"]
    assert [r.test_loss for r in here.records] == [r.test_loss for r in two.records]


def test_divergence_at_the_first_step_with_curves_keeps_the_sweep():
    """Finite data whose loss overflows at the first step (targets of 1e30: the squared error is
    inf in float32) diverges; NaN data is refused instead (tests/sweep/test_bad_data.py)."""

    def bfn(bsz, gen, X=None, y=None, target=None, **kwargs):
        def batch_fn(step):
            Xb = torch.randn(bsz, 6, generator=gen)
            yb = Xb[:, 0] * (1e30 if target == "huge" else 1.0)
            return Xb, yb

        return batch_fn

    cfg = config(ONLYTHRESHOLDS=False, otherreturns={"xsum": batch_sum}, DTYPE="float32")
    result = run([["ok", "huge"]], ["target"], cfg, bfn=bfn)
    assert result["status"] == {("ok",): "ok", ("huge",): "diverged"}
    curves = ExptTrace.deserialize(result["losses"])
    assert not np.isfinite(curves["huge"]).any() and np.isfinite(curves["ok"]).all()
    assert np.isnan(ExptTrace.deserialize(result["extras"]["xsum"])["huge"]).all()


def test_list_valued_iterator_values_become_tuples():
    result = run([[[0.9, 0.5], [0.8, 0.4]]], ["LOSS_CHECKPOINTS"], config())
    assert set(result["jobs"]) == {((0.9, 0.5),), ((0.8, 0.4),)}
    assert result.record((0.8, 0.4)).timekeys.shape == (2,)
    with pytest.raises(SweepError, match="same number of thresholds"):
        run([[[0.9, 0.5], [0.8]]], ["LOSS_CHECKPOINTS"], config())


def test_duplicate_iterator_values_are_refused():
    with pytest.raises(SweepError, match="lists 0.1 twice"):
        run([[0.1, 0.1, 0.2]], ["LR"], config())


def test_optimizer_arguments_come_from_optimizer_kwargs_never_silently():
    seen = {}

    def grab(opt, **kwargs):
        seen.update(opt.defaults)
        return 0.0

    # a user key (data) that is not the argument's exact name is never RMSprop's alpha
    run([[0]], ["trial"], config(OPTIMIZER="RMSprop", ALPHA=0.5, otherreturns={"g": grab}))
    assert seen["alpha"] == 0.99
    # the original's spelling, the argument's exact name, is taken with a warning
    with pytest.warns(FutureWarning, match="write OPTIMIZER_KWARGS=.'alpha': 0.5."):
        run([[0]], ["trial"], config(OPTIMIZER="RMSprop", alpha=0.5, otherreturns={"g": grab}))
    assert seen["alpha"] == 0.5
    kwargs = {"alpha": 0.9}
    run(
        [[0]],
        ["trial"],
        config(OPTIMIZER="RMSprop", OPTIMIZER_KWARGS=kwargs, otherreturns={"g": grab}),
    )
    assert seen["alpha"] == 0.9


def test_more_trials_extend_a_stored_sweep(tmp_path):
    def sweep(n):
        cfg = config(SAVE_DIR=str(tmp_path / "run"), NUM_TRIALS=n)
        return run([range(cfg["NUM_TRIALS"])], ["trial"], cfg)

    two = sweep(2)
    three = sweep(3)
    assert len(three.records) == 3
    for key in [(0,), (1,)]:
        assert three.record(*key).seconds == two.record(*key).seconds  # not retrained


def test_a_batch_function_ignoring_bsz_fails_before_training():
    def fixed_size(bsz, gen, X=None, y=None, **kwargs):
        return lambda step: (torch.ones(32, 6), torch.ones(32))

    with pytest.raises(SweepError, match="honour bsz, or give a fixed test set"):
        run([[0]], ["trial"], config(N_SAMPLES=32, N_TEST=64), bfn=fixed_size)


@pytest.mark.parametrize(
    "bad", [{"LR": "0.1"}, {"LR": float("nan")}, {"GAMMA": float("inf")},
            {"LOSS_CHECKPOINTS": [float("nan")]}],
)  # fmt: skip
def test_non_finite_or_mistyped_numbers_are_refused(bad):
    with pytest.raises(HParamError):
        base_args(**bad)


def test_out_of_range_values_are_refused_before_training():
    with pytest.raises(HParamError, match="N_TRAIN must be > 0"):
        run([[0]], ["trial"], config(N_TRAIN=-5))


def test_curves_of_jobs_with_different_max_iter_are_padded_with_their_last_value():
    cfg = config(ONLYTHRESHOLDS=False, LOSS_CHECKPOINTS=[1e-9], EVAL_EVERY=5)
    result = run([[10, 25]], ["MAX_ITER"], cfg)
    curves = ExptTrace.deserialize(result["train_losses"])
    short, long = curves[10], curves[25]
    assert short.shape == long.shape == (25,)
    assert np.all(short[10:] == short[9]) and len(np.unique(long[:25])) == 25


def test_balance_gives_every_worker_a_share_of_a_refill_stream():
    from modelscape.runner import balance

    stream, other = list(range(1000)), list(range(1000, 1010))  # two group keys
    sizes = [len(g) for g in balance([stream, other], 2)]
    assert sizes == [500, 500, 10]  # not one worker with 1000 jobs, the other with 10
    assert [len(g) for g in balance([stream], 1)] == [1000]  # one worker: one stream
    assert sorted(sum(balance([stream, other], 3), [])) == stream + other


def test_balance_shares_out_one_at_a_time_groups_in_pairs_among_several_workers():
    from modelscape.runner import balance

    def alone(group):
        return group[0] < 100  # the jobs below 100 train one at a time, the others stacked

    singles, stack = list(range(7)), list(range(100, 104))
    assert balance([singles, stack], 2, alone) == [[0, 1], [2, 3], [4, 5, 6], stack]
    assert balance([singles], 1, alone) == [singles]  # one worker: nothing to share
    assert balance([[0, 1, 2]], 2, alone) == [[0, 1, 2]]  # too few to pair up
