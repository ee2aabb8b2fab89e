"""Coordinate checks: the slopes that tell muP from SP and NTP, the table, the CLI."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from modelscape.__main__ import main
from modelscape.coord_check import coord_check, coord_slopes, plot_coord_check

WIDTHS = (128, 256, 512, 1024, 2048)


pytestmark = pytest.mark.usefixtures("one_thread")


def slopes(params, optimizer, lr):
    df = coord_check("MLP", WIDTHS, params=params, optimizer=optimizer, lr=lr, steps=3, seeds=2)
    table = coord_slopes(df, "change")
    return {(r.param, r.role): r.slope for r in table.itertuples()}


@pytest.fixture(scope="module")
def sgd_slopes():
    return slopes(["sp", "mup", "ntp"], "SGD", lr=0.1)


def test_mup_sgd_changes_are_flat_in_width(sgd_slopes):
    assert abs(sgd_slopes[("mup", "readout")]) < 0.2
    assert abs(sgd_slopes[("mup", "features")]) < 0.2


def test_mup_adam_changes_are_flat_in_width_and_ntp_adam_features_freeze():
    s = slopes(["mup", "ntp"], "Adam", lr=0.01)
    assert abs(s[("mup", "readout")]) < 0.2
    assert abs(s[("mup", "features")]) < 0.2
    # the README's claim for ntp under Adam: the kernel regime, hidden features move ~1/sqrt(n)
    assert s[("ntp", "features")] < -0.3


def test_sp_sgd_output_change_grows_with_width(sgd_slopes):
    assert sgd_slopes[("sp", "readout")] > 0.4


def test_ntp_sgd_hidden_change_shrinks_with_width(sgd_slopes):
    assert sgd_slopes[("ntp", "features")] < -0.3


def test_table_is_long_form_and_hooks_are_removed():
    built = []

    def factory(width):
        torch.manual_seed(0)
        built.append(nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)))
        return built[-1]

    df = coord_check(factory, [8, 16], params=["mup"], steps=2, seeds=1, in_shape=(4,), d_out=2)
    assert list(df.columns) == ["param", "optimizer", "width", "seed", "step", "layer", "role",
                                "quantity", "size"]  # fmt: skip
    layers = {"0": "readin", "2": "readout", "2:input": "features"}
    assert dict(zip(df.layer, df.role)) == layers
    # per width: 3 recorded layers x (3 activation rows + 2 change rows)
    assert len(df) == 2 * 3 * 5
    assert (df[(df.quantity == "change")]["size"] > 0).all()
    for model in built:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    fig = plot_coord_check(df)
    assert len(fig.axes) == 3


def test_cli_writes_the_plot_and_table(tmp_path):
    png, csv = tmp_path / "cc.png", tmp_path / "cc.csv"
    cmd = [sys.executable, "-m", "modelscape", "coord-check", "--widths", "32", "64",
           "--steps", "2", "--seeds", "1", "--params", "sp", "mup", "--out", str(png),
           "--csv", str(csv)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny run: threads only add start-up
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "slope" in out.stdout and "readout" in out.stdout
    assert len(csv.read_text().splitlines()) == 1 + 2 * 2 * 4 * 5


def test_cli_explains_a_model_the_parametrization_does_not_cover(tmp_path, capsys):
    argv = ["coord-check", "--model", "Transformer", "--in-shape", "5", "3", "--params", "mup",
            "--widths", "16", "32", "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main(argv) == 2
    assert "is attention (MultiheadAttention)" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
