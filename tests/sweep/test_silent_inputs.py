"""Nothing silent: D_OUT and its spelling d_out, lookalike iterator axes, optimizer-argument
typos, and every spelling the original's code reads.

Each refusal is checked for the name it gives and for nothing having trained: the batch
functions record the steps they draw, and the preflight draws only step 0 (ONLINE), so a step
1 means a job trained.
"""

import warnings

import pytest
import torch

from modelscape import HParamError, SweepError, run_sweep
from modelscape.backend.cli import base_args, parse_args
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import axis_target, lookalike_axis


def config(**overrides):
    hp = dict(WIDTH=16, MAX_ITER=5, N_SAMPLES=16, N_TEST=32, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[1e-9], BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def recording_bfn(seen):
    def bfn(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            seen.append(step)
            Xb = torch.randn(bsz, 4, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]

        return batch_fn

    return bfn


def sweep(iterators, names, cfg, bfn, grabs=None):
    cfg = {**cfg, "otherreturns": grabs or {}}
    return run_sweep(iterators, names, cfg, {"base_bfn": bfn}, progress=False)


def grab_values(result, name):
    return [float(r.grabs[name]) for r in result.records]


# --- 1. D_OUT, and d_out as its legacy spelling --------------------------------------------


def classes_bfn(received):
    def bfn(bsz, gen, d_out, X=None, y=None, **kwargs):
        received.append(d_out)

        def batch_fn(step):
            Xb = torch.randn(bsz, 4, generator=gen)
            return Xb, (Xb[:, 0] > 0).long() + (Xb[:, 1] > 0).long()

        return batch_fn

    return bfn


def test_d_out_on_the_namespace_sets_D_OUT_and_reaches_the_batch_function():
    args = base_args(WIDTH=16, MAX_ITER=5, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"],
                     LOSS_CHECKPOINTS=[1e-9], LOSS="CrossEntropyLoss")  # fmt: skip
    with pytest.warns(FutureWarning, match="d_out is the original modelscape's spelling; use D_"):
        args.d_out = 3
    assert args.D_OUT == 3
    received = []
    outputs = {"outputs": lambda model, **kw: model.output_layer.weight.shape[0]}
    result = sweep([[0, 1]], ["trial"], vars(args), classes_bfn(received), outputs)
    assert not result.failed and grab_values(result, "outputs") == [3.0, 3.0]
    assert set(received) == {3}


def test_d_out_as_a_config_key_warns_with_both_spellings_and_trains_that_many_outputs():
    cfg = {**config(LOSS="CrossEntropyLoss"), "d_out": 4}
    del cfg["D_OUT"]
    received = []
    outputs = {"outputs": lambda model, **kw: model.output_layer.weight.shape[0]}
    with pytest.warns(FutureWarning, match="d_out .*use D_OUT"):
        result = sweep([[0]], ["trial"], cfg, classes_bfn(received), outputs)
    assert grab_values(result, "outputs") == [4.0] and set(received) == {4}


def test_D_OUT_is_a_flag_listed_by_help(capsys):
    assert parse_args(["--D_OUT", "10"]).D_OUT == 10
    with pytest.warns(FutureWarning, match="use D_OUT"):
        assert parse_args(["--d_out", "7"]).D_OUT == 7
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--D_OUT" in capsys.readouterr().out
    with pytest.raises(HParamError, match="D_OUT must be > 0"):
        H.resolve({"D_OUT": 0})


def test_a_D_OUT_that_float_targets_contradict_is_refused_before_training():
    seen = []
    with pytest.raises(SweepError, match=r"D_OUT=3, but the float targets have 1 outputs.*D_OUT=1"):
        sweep([[0]], ["trial"], config(D_OUT=3), recording_bfn(seen))
    assert max(seen) == 0


# --- 3. iterator axes that look like hyperparameters -----------------------------------------


@pytest.mark.parametrize(
    "axis, target",
    [("GAMA", "GAMMA"), ("lr", "LR"), ("Lr", "LR"), ("gamma", "GAMMA"), ("samples", "N_SAMPLES"),
     ("seed", "SEED"), ("Width", "WIDTH")],
)  # fmt: skip
def test_a_lookalike_axis_is_refused_naming_the_hyperparameter(axis, target):
    seen = []
    with pytest.raises(SweepError) as err:
        sweep([[0.1, 1.0], [0]], [axis, "trial"], config(), recording_bfn(seen))
    text = str(err.value)
    assert f"'{axis}'" in text and f"name the axis {target}" in text, text
    assert seen == []  # refused before the batch function is even called


def test_an_axis_the_batch_function_takes_by_name_is_allowed_with_a_notice(capsys):
    received = []

    def bfn(bsz, gen, lr, X=None, y=None):
        received.append(lr)
        return recording_bfn([])(bsz, gen)

    lr = {"lr": lambda opt, **kw: opt.param_groups[0]["lr"]}
    result = sweep([[0.5, 0.01]], ["lr"], config(LR=0.05), bfn, lr)
    assert "axis 'lr' is your batch function's parameter; it does not set LR" in (
        capsys.readouterr().err
    )
    assert grab_values(result, "lr") == pytest.approx([0.05, 0.05])  # LR, not the axis
    assert {0.5, 0.01} <= set(received)


def test_the_lr_of_an_LR_axis_reaches_the_optimizer():
    lr = {"lr": lambda opt, **kw: opt.param_groups[0]["lr"]}
    result = sweep([[0.5, 0.01]], ["LR"], config(), recording_bfn([]), lr)
    assert grab_values(result, "lr") == pytest.approx([0.5, 0.01])


@pytest.mark.parametrize("axis", ["batch", "target", "alpha", "monomials", "trial"])
def test_common_user_axes_stay_identity_axes(axis):
    assert lookalike_axis(axis) is None and axis_target(axis) is None
    seen = []
    result = sweep([[1, 2]], [axis], config(), recording_bfn(seen))
    assert not result.failed and len(result.records) == 2


def test_ntrain_still_sets_N_SAMPLES():
    assert lookalike_axis("ntrain") is None and axis_target("ntrain") == "N_SAMPLES"
    rows = {"rows": lambda X_tr, **kw: X_tr.shape[0]}
    result = sweep([[8, 24]], ["ntrain"], config(), recording_bfn([]), rows)
    assert grab_values(result, "rows") == [8.0, 24.0]


@pytest.mark.parametrize(
    "axis, current", [("BSZ", "ntrain"), ("bsz", "ntrain"), ("TRIAL", "trial"), ("trials", "trial")]
)
def test_the_original_s_other_sample_and_trial_axis_names_are_refused_naming_the_current(
    axis, current
):
    seen = []
    with pytest.raises(SweepError, match=f"'{axis}' was the original .* name the axis '{current}'"):
        sweep([[8, 16]], [axis], config(), recording_bfn(seen))
    assert seen == []


def test_a_legacy_axis_maps_with_a_warning():
    widths = {"width": lambda model, **kw: model.input_layer.weight.shape[0]}
    with pytest.warns(FutureWarning, match="width is the original modelscape's spelling; use W"):
        result = sweep([[4, 12]], ["width"], config(), recording_bfn([]), widths)
    assert grab_values(result, "width") == [4.0, 12.0]


# --- 4. an optimizer argument's typo ----------------------------------------------------------


@pytest.mark.parametrize("optimizers", [None, ["Adam", "SGD"]])
def test_a_near_miss_of_an_optimizer_argument_is_refused(optimizers):
    seen = []
    cfg = {**config(OPTIMIZER="SGD", MOMENTUM=0.9 if optimizers is None else 0.0), "nesterow": True}
    iterators, names = ([[0]], ["trial"]) if optimizers is None else ([optimizers], ["OPTIMIZER"])
    with pytest.raises(SweepError, match=r"'nesterow' is not an argument of SGD: did you mean "
                       r"'nesterov'\? Write OPTIMIZER_KWARGS=\{'nesterov': ...\}"):  # fmt: skip
        sweep(iterators, names, cfg, recording_bfn(seen))
    assert max(seen, default=0) == 0


def test_a_near_miss_the_batch_function_takes_is_a_user_key():
    received = []

    def bfn(bsz, gen, nesterow, X=None, y=None):
        received.append(nesterow)
        return recording_bfn([])(bsz, gen)

    cfg = {**config(OPTIMIZER="SGD", MOMENTUM=0.9), "nesterow": 3}
    nesterov = {"nesterov": lambda opt, **kw: opt.param_groups[0]["nesterov"]}
    result = sweep([[0]], ["trial"], cfg, bfn, nesterov)
    assert grab_values(result, "nesterov") == [0.0] and set(received) == {3}


def test_beta_for_adam_is_refused_but_a_model_s_BETA_is_not_a_lookalike():
    seen = []
    cfg = {**config(OPTIMIZER="Adam"), "beta": 2.0}
    with pytest.raises(SweepError, match="'beta' is not an argument of Adam: did you mean 'betas'"):
        sweep([[0]], ["trial"], cfg, recording_bfn(seen))
    assert max(seen) == 0
    # a model's own arguments are upper-case keys, which no lower-case optimizer argument is
    # near: BETA reaches the model
    cfg = {**config(OPTIMIZER="Adam", MODEL_CLASS=BetaNet), "BETA": 2.0}
    beta = {"beta": lambda model, **kw: model.beta}
    assert grab_values(sweep([[0]], ["trial"], cfg, recording_bfn([]), beta), "beta") == [2.0]
    # a lower-case key the model's constructor takes is not an optimizer typo: the error names
    # the model's spelling, not Adam's betas
    cfg = {**config(OPTIMIZER="Adam", MODEL_CLASS=BetaNet), "beta": 3.0}
    with pytest.raises(SweepError, match="BetaNet.__init__ takes 'beta': give it as BETA"):
        sweep([[0]], ["trial"], cfg, recording_bfn([]))


class BetaNet(torch.nn.Module):
    def __init__(self, d_in, d_out, width, beta):
        super().__init__()
        self.input_layer = torch.nn.Linear(d_in, width)
        self.output_layer = torch.nn.Linear(width, d_out)
        self.beta = beta

    def forward(self, x):
        return self.output_layer(torch.tanh(self.beta * self.input_layer(x)))


# --- every spelling the original's code reads --------------------------------------------------

# What the original's code reads from global_config (backend/job.py: the model, the input size,
# the test set, the loop's settings; backend/trainloop.py: the optimizer, loss and post-init
# keys), and what its examples, notebook and tests set on the parse_args() namespace.
ORIGINAL_KEYS = {
    "ONLINE": False, "N_TRAIN": 100, "N_TEST": 32, "ONLYTHRESHOLDS": True, "N_SAMPLES": [16],
    "NUM_TRIALS": 1, "MAX_ITER": 5, "LR": 0.1, "depth": 2, "width": 16, "GAMMA": 1.0,
    "DEVICES": ["cpu"], "SEED": 1, "LOSS_CHECKPOINTS": [0.1], "EMA_SMOOTHER": 0.9,
    "DETERMINSITIC": True, "VERBOSE": False, "EXPT_NAME": "expt", "MODEL_CLASS": "MLP",
    "model_class": "MLP", "DIM": 4, "dim": 4, "d_in": 4, "d_out": 1, "X_te": None,
    "y_te": None, "otherreturns": {}, "OPTIMIZER_CLASS": "SGD", "optimizer_class": "SGD",
    "OPTIMIZER_FN": "SGD", "optimizer_fn": "SGD", "optimizer": "SGD", "LOSS_CLASS": "MSELoss",
    "loss_class": "MSELoss", "LOSS_FN": "MSELoss", "loss_fn": "MSELoss", "loss": "MSELoss",
    "momentum": 0.0, "weight_decay": 0.0, "post_init_fn": None, "POST_INIT_FN": None,
    "CLASSES": None, "N_TOT": 100, "NORMALIZED": True, "TARGET_MONOMIALS": [],
    "datasethps": {}, "in_channels": 1, "num_blocks": 2, "mup_param": "mup", "img_size": 8,
    "seq_len": 4,
}  # fmt: skip
ORIGINAL_PAIRS = [{"MODEL_FILE": "m.py", "MODEL_NAME": "Net"},
                  {"model_file": "m.py", "model_name": "Net"}]  # fmt: skip
ORIGINAL_REFUSED = ["OPTIMIZER_INSTANCE", "optimizer_instance", "LOSS_INSTANCE", "loss_instance"]
ORIGINAL_AXES = ["ntrain", "trial", "GAMMA", "alpha", "monomials", "width", "depth"]


@pytest.mark.parametrize("key", sorted(ORIGINAL_KEYS))
def test_every_config_key_the_original_reads_still_works(key):
    value = ORIGINAL_KEYS[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hps, user = H.split_config({key: value})
        args = base_args()
        setattr(args, key, value)
    new = H.DEPRECATED_NAMES.get(key, key)
    if new in H.FIELDS:
        assert hps == {new: value} and getattr(args, new) == value
        if new != key:  # a legacy spelling: the warning names both
            assert any(key in str(w.message) and new in str(w.message) for w in caught), key
    else:  # a special or user key, passed on to user code under its own name
        assert new in user and user[new] is value


@pytest.mark.parametrize("pair", ORIGINAL_PAIRS)
def test_the_original_model_file_pairs_still_work(pair):
    with pytest.warns(FutureWarning, match="MODEL_CLASS='m.py:Net'"):
        hps, _ = H.split_config(pair)
    assert hps == {"MODEL_CLASS": "m.py:Net"}


@pytest.mark.parametrize("key", ORIGINAL_REFUSED)
def test_the_original_prebuilt_objects_are_refused_with_the_fix(key):
    with pytest.raises(HParamError, match="is not supported: .*give"):
        H.split_config({key: object()})


@pytest.mark.parametrize("axis", ORIGINAL_AXES)
def test_every_axis_name_the_original_uses_still_works(axis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert lookalike_axis(axis) is None
        target = axis_target(axis)
    assert target in (None, "N_SAMPLES", "GAMMA", "WIDTH", "DEPTH")


# --- 2. the original's ResNet flow: cross-entropy on one output ----------------------------------


class OneOutputNet(torch.nn.Module):
    def __init__(self, in_channels=1, width=8, num_blocks=2, d_out=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.output_layer = torch.nn.Linear(width, d_out)

    def forward(self, x):
        return self.output_layer(self.conv(x).relu().mean((2, 3)))


def test_cross_entropy_on_normalized_float_labels_is_refused_naming_the_fix():
    """One output against float labels: the cross-entropy over one class is 0 whatever the
    network does, so the original trained nothing. Refused before training."""
    seen = []

    def images(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            seen.append(step)
            Xb = torch.randn(bsz, 1, 6, 6, generator=gen)
            yb = torch.randint(0, 2, (bsz,), generator=gen).float()
            return Xb, yb / torch.linalg.norm(yb)

        return batch_fn

    assert float(torch.nn.CrossEntropyLoss()(torch.randn(5, 1), torch.rand(5, 1))) == 0.0
    cfg = {**config(MODEL_CLASS=OneOutputNet), "in_channels": 1, "num_blocks": 2}
    del cfg["LOSS"]
    cfg["LOSS_CLASS"] = torch.nn.CrossEntropyLoss  # the original's spelling
    with pytest.warns(FutureWarning, match="LOSS_CLASS .*use LOSS"):
        with pytest.raises(SweepError) as err:
            sweep([[0]], ["trial"], cfg, images)
    text = str(err.value)
    assert "LOSS=CrossEntropyLoss" in text and "integer class labels" in text, text
    assert "D_OUT" in text and "MSELoss" in text
    assert max(seen) == 0
