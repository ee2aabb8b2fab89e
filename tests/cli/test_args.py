"""Hyperparameter parsing: the seed's CLI contract and its fixes."""

import json

import pytest

from modelscape.cli.args import base_args, parse_args
from modelscape.sweep import hparams as H


def test_defaults_match_the_original_readme():
    args = base_args()
    expected = {
        "ONLINE": True, "N_SAMPLES": [1024], "N_TRAIN": 4000, "N_TEST": 10_000,
        "ONLYTHRESHOLDS": True, "NUM_TRIALS": 1, "MAX_ITER": 100_000, "LR": 1e-2, "DEPTH": 2,
        "WIDTH": 8192, "GAMMA": 1.0, "DEVICES": [0], "SEED": 42, "LOSS_CHECKPOINTS": [0.15, 0.1],
        "EMA_SMOOTHER": 0.9, "DETERMINISTIC": True, "VERBOSE": False,
    }  # fmt: skip
    for name, value in expected.items():
        assert getattr(args, name) == value, name
        assert type(getattr(args, name)) is type(value), name


@pytest.mark.parametrize("text", ["False", "false", "0", "no"])
def test_booleans_parse_false(text):
    assert parse_args(["--ONLINE", text]).ONLINE is False


@pytest.mark.parametrize("text", ["True", "true", "1"])
def test_booleans_parse_true(text):
    assert parse_args(["--ONLINE", "False", "--ONLINE", text]).ONLINE is True


def test_bad_boolean_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--ONLINE", "maybe"])
    assert "boolean" in capsys.readouterr().err


def test_integers_accept_scientific_notation():
    args = parse_args(["--MAX_ITER", "1e5", "--WIDTH", "2.56e2"])
    assert args.MAX_ITER == 100_000 and isinstance(args.MAX_ITER, int)
    assert args.WIDTH == 256
    with pytest.raises(SystemExit):
        parse_args(["--WIDTH", "1.5"])


def test_swept_options_take_several_values():
    args = parse_args(["--GAMMA", "0.1", "1", "10", "--LR", "0.5"])
    assert args.GAMMA == [0.1, 1.0, 10.0]
    assert args.LR == 0.5  # one value stays a scalar
    assert parse_args(["--LOSS_CHECKPOINTS", "0.3"]).LOSS_CHECKPOINTS == [0.3]
    assert parse_args(["--DEVICES", "cpu", "1"]).DEVICES == ["cpu", 1]


def test_unknown_flag_lists_valid_names(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--WIDHT", "3"])
    err = capsys.readouterr().err
    assert "WIDHT" in err and "Did you mean WIDTH" in err and "N_SAMPLES" in err


def test_user_hyperparameters_without_editing_the_package():
    extra = {"DATASET": ("digits", "which data set"), "CLASSES": [0, 6], "NOISE": 0.1}
    args = parse_args(["--DATASET", "cifar", "--CLASSES", "3", "5", "--NOISE", "0.5"], extra)
    assert (args.DATASET, args.CLASSES, args.NOISE) == ("cifar", [3, 5], 0.5)
    assert parse_args([], extra).CLASSES == [0, 6]
    with pytest.raises(H.HParamError, match="already a built-in"):
        parse_args([], {"WIDTH": 3})


def test_config_file_then_explicit_flags_override(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("WIDTH: 64\nLR: 0.3\nONLINE: false\nGAMMA: [0.5, 2.0]\n")
    args = parse_args(["--config", str(yaml_file), "--LR", "0.7"])
    assert (args.WIDTH, args.LR, args.ONLINE, args.GAMMA) == (64, 0.7, False, [0.5, 2.0])
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"DEPTH": 3}))
    assert parse_args(["--config", str(json_file)]).DEPTH == 3


def test_config_file_rejects_unknown_and_mistyped_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("WIDTHH: 64\n")
    with pytest.raises(H.HParamError, match="Did you mean WIDTH"):
        parse_args(["--config", str(f)])
    f.write_text("WIDTH: wide\n")
    with pytest.raises(H.HParamError, match="WIDTH='wide'"):
        parse_args(["--config", str(f)])


def test_namespace_accepts_new_attributes_as_in_the_seed_examples():
    args = base_args()
    args.CLASSES = [0, 6]
    assert vars(args)["CLASSES"] == [0, 6]


def test_misspelled_seed_names_are_accepted_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="N_TRAIN"):
        args = parse_args(["--N_TRIAN", "77"])
    assert args.N_TRAIN == 77 and "N_TRIAN" not in vars(args)
    with pytest.warns(FutureWarning, match="DETERMINISTIC"):
        assert base_args(DETERMINSITIC=False).DETERMINISTIC is False


def test_base_args_overrides_are_validated():
    assert base_args(WIDTH=16).WIDTH == 16
    with pytest.raises(H.HParamError, match="unknown hyperparameter"):
        base_args(WDITH=16)
    with pytest.raises(H.HParamError, match="ONLINE"):
        base_args(ONLINE="yes")


def test_the_hyperparameter_table_is_generated_from_the_schema():
    table = H.markdown_table()
    assert table.count("\n") == len(H.FIELDS) + 1
    for name in H.FIELDS:
        assert f"`{name}`" in table


def test_the_hyperparameter_reference_is_current():
    from pathlib import Path

    page = Path(__file__).parents[2] / "docs" / "reference" / "hyperparameters.md"
    assert H.markdown_table() in page.read_text(), "run `python tools/update_readme_table.py`"


def test_yaml_numbers_in_scientific_notation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("LR: 1e-2\nMAX_ITER: 1e4\n")  # YAML reads both as strings
    args = parse_args(["--config", str(f)])
    assert args.LR == 0.01 and args.MAX_ITER == 10_000


def test_a_script_sets_its_own_defaults_which_flags_and_config_override(tmp_path, capsys):
    defaults = {"WIDTH": 128, "ONLINE": False, "GAMMA": [0.1, 1.0]}
    args = parse_args([], defaults=defaults)
    assert (args.WIDTH, args.ONLINE, args.GAMMA, args.DEPTH) == (128, False, [0.1, 1.0], 2)
    assert parse_args(["--WIDTH", "512"], defaults=defaults).WIDTH == 512
    config = tmp_path / "c.yaml"
    config.write_text("WIDTH: 64\n")
    args = parse_args(["--config", str(config)], defaults=defaults)
    assert args.WIDTH == 64 and args.ONLINE is False
    with pytest.raises(SystemExit):
        parse_args(["--help"], defaults=defaults)
    flat = " ".join(capsys.readouterr().out.split())
    assert "Width of every hidden layer. (default: 128)" in flat


def test_script_defaults_are_checked_like_flags():
    with pytest.raises(H.HParamError, match="Did you mean WIDTH"):
        parse_args([], defaults={"WIDHT": 128})
    with pytest.raises(H.HParamError, match="WIDTH"):
        parse_args([], defaults={"WIDTH": "wide"})
    args = parse_args([], extra={"OUT": ("a.png", "plot")}, defaults={"OUT": "b.png"})
    assert args.OUT == "b.png"


def test_extra_options_take_one_value_unless_declared_as_lists(capsys):
    extra = {"OUT": ("a.png", "plot file"), "SIZES": ([8, 16], "training-set sizes")}
    args = parse_args(["--OUT", "b.png", "--SIZES", "4"], extra=extra)
    assert args.OUT == "b.png" and args.SIZES == [4]
    with pytest.raises(SystemExit):
        parse_args(["--OUT", "b.png", "c.png"], extra=extra)
    err = capsys.readouterr().err
    assert "--OUT takes one value, so 'c.png' is left over" in err and "usage" not in err
    with pytest.raises(SystemExit):  # the same value given earlier, to an option that took it
        parse_args(["--WIDTH", "3", "--NUM_TRIALS", "2", "3"])
    assert "--NUM_TRIALS takes one value, so '3' is left over" in capsys.readouterr().err
