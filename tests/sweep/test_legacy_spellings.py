"""The original's spellings at every boundary, and "nothing silently ignored" for the rest.

Each legacy key is checked by what it changes in a real tiny sweep (the model's width, the
optimizer's type, the run folder), not only by the warning it raises.
"""

import json

import pytest
import torch

from modelscape import HParamError, SweepError
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args, parse_args
from modelscape.sweep import hparams as H


def gaussian_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, generator=gen, device=gen.device)
        return Xb, Xb[:, 0]

    return batch_fn


def base(**extra):
    cfg = dict(MAX_ITER=2, N_SAMPLES=8, N_TEST=8, DEVICES=["cpu"], VERBOSE=False, WIDTH=16)
    cfg["otherreturns"] = {
        "width": lambda model, **kw: model.input_layer.weight.shape[0],
        "depth": lambda model, **kw: 1 + len(model.hidden_layers),
        "opt": lambda opt, **kw: ["SGD", "Adam", "RMSprop"].index(type(opt).__name__),
    }
    cfg.update(extra)
    return cfg


def run(cfg, iterators=([0],), names=("trial",), bfn=gaussian_bfn):
    return run_job_iterator(list(iterators), list(names), cfg, {"base_bfn": bfn}, progress=False)


def only(result, grab):
    values = set(result["extras"][grab]["config2outcome"].values())
    assert len(values) == 1, values
    return values.pop()


def test_width_and_depth_in_global_config_build_that_network():
    cfg = base()
    del cfg["WIDTH"]
    with pytest.warns(
        FutureWarning, match="width is the original modelscape's spelling; use WIDTH"
    ):
        result = run({**cfg, "width": 8, "depth": 3})
    assert only(result, "width") == 8 and only(result, "depth") == 3


def test_width_as_an_iterator_name_is_the_width_axis():
    with pytest.warns(FutureWarning, match="use WIDTH"):
        result = run(base(), iterators=[[8, 12]], names=["width"])
    outcomes = result["extras"]["width"]["config2outcome"]
    assert outcomes == {(8,): 8, (12,): 12}


def test_width_flag_and_config_file(tmp_path):
    with pytest.warns(FutureWarning, match="use WIDTH"):
        assert parse_args(["--width", "8"]).WIDTH == 8
    with pytest.warns(FutureWarning, match="use DEPTH"):
        assert parse_args(["--depth", "3"]).DEPTH == 3
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"width": 24, "DIM": 4}))
    with pytest.warns(FutureWarning, match="use D_IN"):
        args = parse_args(["--config", str(path)])
    assert args.WIDTH == 24 and args.D_IN == 4


def test_namespace_attributes_read_and_write_the_new_names():
    args = base_args()
    with pytest.warns(FutureWarning, match="use WIDTH"):
        assert args.width == 8192
    with pytest.warns(FutureWarning, match="use WIDTH"):
        args.width = 64
    assert args.WIDTH == 64 and "width" not in vars(args)
    with pytest.warns(FutureWarning, match="use OPTIMIZER"):
        args.OPTIMIZER_CLASS = torch.optim.Adam
    assert vars(args)["OPTIMIZER"] is torch.optim.Adam
    with pytest.raises(AttributeError):
        _ = args.not_an_attribute


@pytest.mark.parametrize(
    "key, value, index",
    [("optimizer", "Adam", 1), ("OPTIMIZER_CLASS", torch.optim.RMSprop, 2),
     ("optimizer_fn", torch.optim.Adam, 1), ("optimizer_class", "RMSprop", 2)],
)  # fmt: skip
def test_optimizer_keys_choose_the_optimizer(key, value, index):
    with pytest.warns(FutureWarning, match=f"{key} is the original.*use OPTIMIZER"):
        result = run(base(**{key: value}))
    assert only(result, "opt") == index


def test_loss_and_optimizer_argument_keys_map_to_the_schema():
    with pytest.warns(FutureWarning):
        hps, user = H.split_config(
            {"loss_fn": torch.nn.L1Loss, "LOSS_CLASS": torch.nn.L1Loss, "momentum": 0.9,
             "weight_decay": 0.1, "EXPT_NAME": "runs/a", "dim": 4, "CLASSES": [0, 6]}
        )  # fmt: skip
    assert hps == {"LOSS": torch.nn.L1Loss, "MOMENTUM": 0.9, "WEIGHT_DECAY": 0.1,
                   "SAVE_DIR": "runs/a", "D_IN": 4}  # fmt: skip
    assert user == {"CLASSES": [0, 6]}


def test_loss_key_changes_the_loss_that_trains():
    ys = torch.full((8,), 3.0)
    fixed = {"X_te": torch.zeros(8, 4), "y_te": ys, "CENTER": True}
    with pytest.warns(FutureWarning, match="loss is the original"):
        l1 = run(base(loss="L1Loss", **fixed))
    mse = run(base(**fixed))
    # centered: the output starts at 0, so the test losses are |3| and 3**2 before any step
    # moves them much (2 steps of lr 0.01)
    assert only(l1, "width") == 16
    l1_loss = next(iter(l1["losses"]["config2outcome"].values()))
    mse_loss = next(iter(mse["losses"]["config2outcome"].values()))
    assert l1_loss == pytest.approx(3.0, rel=0.05) and mse_loss == pytest.approx(9.0, rel=0.05)


def test_model_file_and_name_load_the_class(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(
        "import torch.nn as nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, d_in, d_out):\n"
        "        super().__init__()\n"
        "        self.input_layer = nn.Linear(d_in, 5)\n"
        "        self.hidden_layers = []\n"
        "        self.output_layer = nn.Linear(5, d_out)\n"
        "    def forward(self, x):\n"
        "        return self.output_layer(self.input_layer(x))\n"
    )
    with pytest.warns(FutureWarning, match=f"MODEL_CLASS='{path}:Tiny'"):
        result = run(base(MODEL_FILE=str(path), MODEL_NAME="Tiny"))
    assert only(result, "width") == 5
    with pytest.raises(HParamError, match="MODEL_FILE and MODEL_NAME come as a pair"):
        run(base(MODEL_FILE=str(path)))


def test_expt_name_is_the_run_folder(tmp_path):
    folder = tmp_path / "my-expt"
    with pytest.warns(FutureWarning, match="EXPT_NAME is the original.*use SAVE_DIR"):
        run(base(EXPT_NAME=str(folder)))
    assert folder.is_dir() and any(folder.iterdir())


def test_dim_must_match_the_data():
    with pytest.warns(FutureWarning, match="DIM is the original"):
        run(base(DIM=4))
    with pytest.warns(FutureWarning), pytest.raises(SweepError, match="D_IN=7 .DIM in the orig"):
        run(base(DIM=7))


def test_post_init_fn_upper_case_is_called():
    calls = []

    def post(model, opt, **kw):
        calls.append(type(model).__name__)
        return model, opt

    with pytest.warns(FutureWarning, match="use post_init_fn"):
        run(base(POST_INIT_FN=post))
    assert calls == ["MLP"]


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"GAMA": 2.0}, "'GAMA' is not a hyperparameter, but looks like GAMMA"),
        ({"lr": 0.1}, "'lr' is not a hyperparameter, but looks like LR"),
        ({"gamma": 2.0}, "'gamma' is not a hyperparameter, but looks like GAMMA"),
        ({"Width": 8}, "'Width' is not a hyperparameter, but looks like WIDTH"),
        ({"max_iter": 5}, "'max_iter' is not a hyperparameter, but looks like MAX_ITER"),
        ({"OPTIMIZER_INSTANCE": object()}, "OPTIMIZER_INSTANCE .the original"),
        ({"loss_instance": object()}, "loss_instance .the original"),
        ({"WIDTH": 8, "width": 16}, "WIDTH is given twice"),
        ({"MODEL_NAME": "X"}, "come as a pair"),
        ({"MODEL_CLASS": "MLP", "MODEL_FILE": "a.py", "MODEL_NAME": "X"}, "keep one"),
    ],
)
def test_lookalikes_and_conflicts_fail_before_training(extra, match):
    drawn = []

    def counting_bfn(bsz, gen, X=None, y=None, **kwargs):
        drawn.append(bsz)
        return gaussian_bfn(bsz, gen)

    with pytest.raises(HParamError, match=match):
        with pytest.warns(FutureWarning) if "width" in extra else _no_op():
            run(base(**extra), bfn=counting_bfn)
    assert drawn == []


def test_lookalike_flags_fail_with_the_name():
    with pytest.raises(SystemExit):
        parse_args(["--lr", "0.1"])
    with pytest.raises(HParamError, match="GAMMA"):
        base_args(GAMA=2.0)


def test_user_keys_of_the_original_examples_stay_user_keys():
    keys = {"N_TOT": 5000, "CLASSES": [[0], [6]], "NORMALIZED": True, "mup_param": "mup",
            "num_blocks": 3, "in_channels": 1, "TARGET_MONOMIALS": [],
            "datasethps": {}}  # fmt: skip
    hps, user = H.split_config(keys)
    assert hps == {} and user == keys


def test_d_out_is_the_legacy_spelling_of_D_OUT_and_stays_visible_to_user_code():
    with pytest.warns(
        FutureWarning, match="d_out is the original modelscape's spelling; use D_OUT"
    ):
        hps, user = H.split_config({"d_out": 10, "N_TOT": 5000})
    assert hps == {"D_OUT": 10} and user == {"N_TOT": 5000, "d_out": 10}


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_docs_list_every_legacy_spelling_and_optimizer_rule():
    from pathlib import Path

    from modelscape.models.parametrize import OPTIMIZER_RULES

    docs = Path(__file__).resolve().parents[2] / "docs"
    migrating = (docs / "migrating.md").read_text()
    section = migrating.split("## The original's spellings", 1)[1].split("\n## ", 1)[0]
    for old, new in {**H.DEPRECATED_NAMES, **H.LEGACY_MODEL_FILE}.items():
        assert f"`{old}`" in section and f"`{new}`" in section, old
    parametrizations = (docs / "parametrizations.md").read_text()
    rules = parametrizations.split("| rule | update | optimizers |", 1)[1].split("\n\n", 1)[0]
    for cls, rule in OPTIMIZER_RULES.items():
        row = next(line for line in rules.splitlines() if f"`{cls.__name__}`" in line)
        assert row.startswith("  | SGD column |" if rule == "sgd" else "  | Adam column"), cls


def test_an_extra_option_cannot_take_a_legacy_spelling():
    with pytest.raises(HParamError, match="DIM is the original modelscape's spelling of D_IN"):
        parse_args([], extra={"DIM": (16, "input dimension")})


def test_optimizer_argument_as_config_key_reaches_the_optimizer_with_a_warning():
    """The original passed ``eps``/``betas`` as config keys; they land in OPTIMIZER_KWARGS."""
    config = {"OPTIMIZER": "Adam", "eps": 0.5, "betas": (0.0, 0.5)}
    with pytest.warns(FutureWarning, match=r"OPTIMIZER_KWARGS=\{'eps': 0.5, 'betas'"):
        hps, user = H.split_config(config)
    assert hps["OPTIMIZER_KWARGS"] == {"eps": 0.5, "betas": (0.0, 0.5)}
    assert user == {"eps": 0.5, "betas": (0.0, 0.5)}  # still a user key for batch functions
    with pytest.raises(H.HParamError, match="given twice"):
        H.split_config({"OPTIMIZER": "Adam", "eps": 0.5, "OPTIMIZER_KWARGS": {"eps": 0.1}})
    plain, _ = H.split_config({"OPTIMIZER": "SGD", "eps": 0.5})  # SGD takes no eps
    assert "OPTIMIZER_KWARGS" not in plain
