"""What a reader of results sees: a summary cut to length, classes by name, and a dataset that
carries its sweep's hyperparameters."""

import sys

import pytest
import torch
import xarray as xr

from modelscape.cli.args import base_args
from modelscape.cli.main import main as cli
from modelscape.runner import main
from modelscape.store import load


class SignSGD(torch.optim.SGD):
    """A user's optimizer class, swept as an axis."""


def linear_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, Xb[:, 0]

    return batch_fn


@pytest.fixture(scope="module")
def result(run_dir):
    return load(run_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run"
    args = base_args(WIDTH=8, MAX_ITER=3, N_SAMPLES=16, N_TEST=32, LR=0.05, DEVICES=["cpu"],
                     LOSS_CHECKPOINTS=[0.9], SAVE_DIR=str(folder), ONLINE=False)  # fmt: skip
    axes = [[SignSGD, torch.optim.SGD], range(25)]
    main(axes, ["OPTIMIZER", "trial"], args, {"base_bfn": linear_bfn}, progress=False)
    return folder


def test_summary_shows_its_first_rows_and_says_how_many_more(result):
    lines = result.summary().splitlines()
    assert lines[0] == "50 jobs: 50 ok"
    assert lines[1].startswith("trained: 25 single")  # SignSGD has no stacked version
    assert len(lines) == 2 + 1 + 40 + 1  # counts, how trained, header, 40 rows, the note
    assert lines[-1] == "... 10 more rows (summary(rows=None) shows all)"
    assert len(result.summary(rows=None).splitlines()) == 2 + 1 + 50
    assert len(result.summary(rows=5).splitlines()) == 2 + 1 + 5 + 1


def test_classes_show_by_their_qualified_name(result, run_dir, capsys):
    df = result.to_dataframe()
    assert set(df["OPTIMIZER"]) == {"SignSGD", "SGD"}
    assert "<class" not in result.summary(rows=None)
    assert list(result.to_xarray()["OPTIMIZER"].values) == ["SignSGD", "SGD"]
    assert cli(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "OPTIMIZER (2): SignSGD, SGD" in out and "<class" not in out


def test_the_dataset_and_its_netcdf_file_carry_the_hyperparameters(result, run_dir, tmp_path):
    attrs = result.to_xarray().attrs
    assert (attrs["WIDTH"], attrs["MAX_ITER"], attrs["LR"], attrs["N_SAMPLES"]) == (8, 3, 0.05, 16)
    assert attrs["ONLINE"] == "False" and attrs["LOSS_CHECKPOINTS"] == [0.9]
    assert "OPTIMIZER" not in attrs  # an axis: its values are the jobs', not one setting
    out = tmp_path / "r.nc"
    assert cli(["export", str(run_dir), "--format", "netcdf", "-o", str(out)]) == 0
    with xr.open_dataset(out) as ds:
        assert ds.attrs["WIDTH"] == 8 and ds.attrs["PARAMETRIZATION"] == attrs["PARAMETRIZATION"]


@pytest.mark.parametrize("fmt, module", [("parquet", "pyarrow"), ("netcdf", "scipy")])
def test_a_missing_extra_is_one_line_naming_it(run_dir, tmp_path, monkeypatch, capsys, fmt, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "netCDF4", None)
    argv = ["export", str(run_dir), "--format", fmt, "-o", str(tmp_path / "out")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"needs {module}, which is not installed: pip install 'modelscape-sweeps[{fmt}]'" in err
