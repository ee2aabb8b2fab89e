"""The Quickstart's main job: `modelscape run` trains a real sweep and leaves a run folder."""

import subprocess
import sys

import numpy as np

import modelscape


def test_modelscape_run_writes_a_run_folder_table_and_plot(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "modelscape", "run", "--out", str(out), "--MAX_ITER", "300",
           "--NUM_TRIALS", "2", "--WIDTH", "64"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "20 jobs (20 ok)" in done.stdout and "GAMMA=0.1" in done.stdout
    assert (out / "learning_curve.png").stat().st_size > 10_000
    result = modelscape.load(out)
    assert len(result.records) == 20
    ds = result.to_xarray()
    assert ds.test_loss.dims == ("ntrain", "trial", "GAMMA")
    # a learning curve: more data, lower test loss (rich regime, mean over trials)
    curve = ds.test_loss.sel(GAMMA=1.0).mean("trial").values
    assert curve[-1] < curve[0] and np.all(np.isfinite(curve))

    changed = [("301" if a == "300" else a) for a in cmd]
    again = subprocess.run(changed, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "MAX_ITER: 300 in the run folder, 301 now" in again.stderr
    assert "Traceback" not in again.stderr
