"""A run folder's accidents: deleted or replaced mid-sweep, or left with a half-written checkpoint.

Each test runs a real sweep (in a subprocess where it is killed), does to the folder what a
user or a cluster would (``rm -rf``, a SIGKILL mid-write), and checks what survives, value by
value.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from sweeps import config, quadratic_bfn

from modelscape import load, run_sweep
from modelscape.errors import StoreError

# A wide model checkpointed after every step: each checkpoint takes long enough to write that
# a SIGKILL can land while its temporary file exists.
WIDE = """
import sys
from modelscape import base_args, run_sweep
sys.path.insert(0, sys.argv[2])
from sweeps import quadratic_bfn

cfg = vars(base_args(WIDTH=1536, MAX_ITER=40, N_SAMPLES=8, N_TEST=16, LR=0.01,
                     DEVICES=["cpu"], LOSS_CHECKPOINTS=[1e-9], BATCHED="off",
                     SAVE_DIR=sys.argv[1], CHECKPOINT_EVERY=1e-9))
run_sweep([[0]], ["trial"], cfg, {"base_bfn": quadratic_bfn}, progress=False)
"""
TESTS = Path(__file__).resolve().parents[1]  # where sweeps.py lives


def wide_config(save_dir):
    return config(WIDTH=1536, MAX_ITER=40, N_SAMPLES=8, N_TEST=16, LR=0.01,
                  SAVE_DIR=str(save_dir), CHECKPOINT_EVERY=1e-9)  # fmt: skip


def kill_while_writing_a_checkpoint(tmp_path, run) -> list[Path]:
    """Run the wide sweep in a subprocess and SIGKILL it while a checkpoint's temporary file
    exists; the temporary files it left behind."""
    script = tmp_path / "wide.py"
    script.write_text(WIDE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(5):
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(TESTS)], env=env)
        folder = run / "checkpoints"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if folder.is_dir() and any(".tmp" in p for p in os.listdir(folder)):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        left = sorted(folder.glob("*.tmp*"))
        if proc.returncode == -signal.SIGKILL and left:
            return left
    pytest.fail("could not SIGKILL the sweep while a checkpoint was being written")


def test_a_checkpoint_left_half_written_by_a_killed_sweep_is_cleared_by_the_rerun(tmp_path):
    run = tmp_path / "run"
    left = kill_while_writing_a_checkpoint(tmp_path, run)
    # a temporary file of a writer that still runs is kept: it may yet be renamed into place
    alive = subprocess.Popen(["sleep", "60"])
    live = run / "checkpoints" / f"other.pt.tmp{alive.pid}"
    live.write_bytes(b"being written")
    try:
        result = run_sweep([[0]], ["trial"], wide_config(run), {"base_bfn": quadratic_bfn},
                           progress=False)  # fmt: skip
    finally:
        alive.kill()
        alive.wait()
    assert not any(p.exists() for p in left)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [live.name]
    reference = run_sweep([[0]], ["trial"], wide_config(tmp_path / "ref"),
                          {"base_bfn": quadratic_bfn}, progress=False)  # fmt: skip
    stored = load(run)
    for r in (result, stored):
        assert r.record(0).status == "ok"
        assert r.record(0).test_loss == reference.record(0).test_loss
        assert r.record(0).train_loss == reference.record(0).train_loss


def slow_bfn(bsz, gen, X=None, y=None, d=6, **kwargs):
    """``quadratic_bfn``, a little slower per step, so that a sweep lasts long enough to have
    its folder deleted under it."""
    inner = quadratic_bfn(bsz, gen, d=d)

    def batch_fn(step):
        time.sleep(0.002)
        return inner(step)

    return batch_fn


def delete_when_stored(run: Path, at_least: int, how: str) -> threading.Thread:
    """In another thread: once ``at_least`` records are stored, ``rm -rf`` the run folder (and,
    for ``how="replace"``, make a new empty folder in its place)."""

    def work():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(load(run).records) >= at_least:
                    break
            except (FileNotFoundError, StoreError):
                pass
            time.sleep(0.01)
        subprocess.run(["rm", "-rf", str(run)], check=True)
        if how == "replace":
            run.mkdir()

    thread = threading.Thread(target=work)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["delete", "replace"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_folder_deleted_mid_sweep_stops_the_sweep_with_a_store_error(tmp_path, how, workers):
    run = tmp_path / "run"
    cfg = config(SAVE_DIR=str(run), MAX_ITER=200, WORKERS_PER_DEVICE=workers)
    thread = delete_when_stored(run, 2, how)
    try:
        with pytest.raises(StoreError, match="deleted or replaced") as err:
            run_sweep([list(range(12))], ["trial"], cfg, {"base_bfn": slow_bfn}, progress=False)
    finally:
        thread.join()
    assert str(run) in str(err.value)
    assert "Rerun the sweep" in str(err.value)
    # nothing was written into the new folder in its place, and a new sweep may use it
    assert not (run / "results.sqlite").exists()
    result = run_sweep([[0, 1]], ["trial"], config(SAVE_DIR=str(run), MAX_ITER=20),
                       {"base_bfn": quadratic_bfn}, progress=False)  # fmt: skip
    stored = load(run)
    assert [r.test_loss for r in stored.records] == [r.test_loss for r in result.records]
    assert torch.isfinite(torch.tensor([r.test_loss for r in stored.records])).all()
