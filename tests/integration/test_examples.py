"""The examples run end to end at reduced size, and the notebook executes in a real kernel."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from sweeps import write_fake_cifar  # the real pickle format, tiny

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REDUCED = {
    "hea_learning_order.py": ["--N_TARGETS", "4", "--NUM_TRIALS", "1", "--WIDTH", "64"],
    "powerlaw_monomials.py": ["--SIZES", "16", "64", "--NUM_TRIALS", "1", "--MAX_ITER", "100"],
    "images.py": ["--SIZES", "16", "64", "--NUM_TRIALS", "1", "--MAX_ITER", "100"],
    "cnn_resnet.py": ["--MAX_ITER", "30", "--NUM_TRIALS", "1", "--WIDTH", "8", "--DEPTH", "1"],
    "custom_loss_optimizer.py": ["--MAX_ITER", "60", "--NUM_TRIALS", "1", "--WIDTH", "32"],
    "lr_transfer.py": ["--WIDTH", "32", "64", "--LR", "0.1", "1", "--MAX_ITER", "10"],
}


def run_example(name: str, out: Path, *flags: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *REDUCED[name], *flags, "--OUT", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning:" not in proc.stderr, proc.stderr[-3000:]  # none about its own config
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
    return proc.stdout


@pytest.mark.parametrize("name", sorted(set(REDUCED) - {"hea_learning_order.py", "lr_transfer.py"}))
def test_example_runs_and_saves_its_plot(name, tmp_path):
    out = run_example(name, tmp_path / "plot.png")
    assert "jobs:" in out and " ok" in out  # the summary's status counts


def test_images_example_reads_cifar10_from_datasetpath(tmp_path):
    write_fake_cifar(tmp_path / "data" / "cifar-10-batches-py", n_per_batch=60, n_test=50)
    flags = ["--DATASET", "cifar10", "--DATASETPATH", str(tmp_path / "data"), "--SIZES", "8", "16"]
    out = run_example("images.py", tmp_path / "cifar.png", *flags)
    assert "cifar10 classes [0, 6]: 70 training and 13 test images of shape (3, 32, 32)" in out


def test_images_example_without_cifar10_says_where_to_put_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "images.py"),
            "--DATASET",
            "cifar10",
            "--DATASETPATH",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "cifar-10-batches-py" in proc.stderr and "Traceback" not in proc.stderr


def test_hea_example_prints_a_positive_spearman_correlation(tmp_path):
    out = run_example("hea_learning_order.py", tmp_path / "hea.png")
    match = re.search(r"Spearman correlation .* over (\d+) monomials: (-?[\d.]+)", out)
    assert match, out
    assert int(match.group(1)) == 4
    # four targets spread over a factor 64 in HEA eigenvalue: learned in (nearly) that order
    assert float(match.group(2)) >= 0.6


def test_every_example_is_covered():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(REDUCED)


def test_lr_transfer_prints_the_best_lr_per_width_and_no_warning(tmp_path):
    out = run_example("lr_transfer.py", tmp_path / "lr.png")
    assert "PARAMETRIZATION  WIDTH  best_LR  test_loss" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("sp", "mup"))]) == 4


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_an_example_writes_under_runs_by_default(name):
    module = runpy.run_path(str(EXAMPLES / name), run_name="example")
    assert module["EXTRA"]["OUT"][0].startswith("runs/")


def test_notebook_executes(tmp_path):
    nb = nbformat.read(EXAMPLES / "notebook_example.ipynb", as_version=4)
    client = NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "'x0': 0.2364" in text  # the HEA eigenvalue cell
    assert "jobs=18, failed=0" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot rendered inline
    # the progress bar is a widget (tqdm.auto), not a text bar written to stderr
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("name", ["images.py", "cnn_resnet.py"])
def test_an_example_without_scikit_learn_names_the_extra(name):
    blocked = (
        "import runpy, sys; sys.modules['sklearn'] = None; sys.argv = [sys.argv[1]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'modelscape-sweeps[data]'" in proc.stderr
