"""Real SIGKILLs: of the parent half-way through a sweep, and of a long job mid-training."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.models.parametrize import weight_layers
from modelscape.store import load

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

REPO = Path(__file__).resolve().parents[2]

SWEEP = """
import sys, time, torch
from modelscape import parse_args, run_sweep

def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        time.sleep(0.01)  # slow enough to be killed mid-way; the values do not depend on it
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1] + 0.3 * Xb[:, 2]
    return batch_fn

def first_weights(model, **kwargs):
    return torch.cat([p.detach().flatten()[:3] for p in model.parameters()])

# BATCHED is left at its default: stacked groups are bit-identical whatever their composition
hp = parse_args(["--WIDTH", "16", "--N_SAMPLES", "16", "--N_TEST", "32", "--LR", "0.05",
                 "--DEVICES", "cpu", "--LOSS_CHECKPOINTS", "1e-12"] + sys.argv[1:])
hp.otherreturns = {"w": first_weights}
run_sweep([range(hp.NUM_TRIALS), [1.0, 0.5]], ["trial", "GAMMA"], hp, {"base_bfn": bfn})
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(SWEEP)
    return path


def start(script, run_dir, *flags, stderr=subprocess.PIPE):
    return subprocess.Popen(
        [sys.executable, str(script), "--SAVE_DIR", str(run_dir), *flags],
        cwd=REPO,
        stderr=stderr,
        text=True,
    )


def finish(script, run_dir, *flags):
    proc = start(script, run_dir, *flags)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return err


def wait_for(condition, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def n_stored(run_dir):
    try:
        return len(load(run_dir).records)
    except FileNotFoundError:
        return 0


def children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_same(a, b):
    assert [r.key for r in a.records] == [r.key for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert ra.status == rb.status == "ok"
        assert (ra.seed, ra.steps, ra.train_loss, ra.test_loss) == (
            rb.seed,
            rb.steps,
            rb.train_loss,
            rb.test_loss,
        )
        np.testing.assert_array_equal(ra.timekeys, rb.timekeys)
        for name in ra.grabs:
            assert ra.grabs[name].tobytes() == rb.grabs[name].tobytes()
        assert ra.curves.keys() == rb.curves.keys() if ra.curves else rb.curves is None
        for name in ra.curves or {}:
            assert ra.curves[name].tobytes() == rb.curves[name].tobytes()


def test_parent_sigkilled_half_way_then_the_rerun_trains_only_the_missing_jobs(script, tmp_path):
    # One job at a time on each of 2 workers: records arrive in pairs 3 s apart, so the kill
    # after the first 3 stored always leaves jobs unfinished (two stacks of 4 would finish
    # within milliseconds of each other, and a kill could come after both).
    flags = ["--MAX_ITER", "300", "--NUM_TRIALS", "4", "--BATCHED", "off"]
    flags += ["--WORKERS_PER_DEVICE", "2"]
    # the uninterrupted reference trains in one process: placement does not matter either
    reference_dir = tmp_path / "reference"
    reference = start(
        script, reference_dir, *flags[:-2], "--WORKERS_PER_DEVICE", "1", stderr=subprocess.DEVNULL
    )
    run_dir = tmp_path / "run"
    proc = start(script, run_dir, *flags)
    wait_for(lambda: n_stored(run_dir) >= 3, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r.key: r for r in load(run_dir).records}  # the store is readable, not corrupt
    assert 3 <= len(before) < 8
    deadline = time.monotonic() + 10
    while [p for p in workers if alive(p)]:  # orphaned workers notice and exit
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        time.sleep(0.05)

    finish(script, run_dir, *flags)
    resumed = load(run_dir)
    for key, old in before.items():  # stored jobs were not trained again
        assert resumed.record(*key).seconds == old.seconds
    assert reference.wait(timeout=120) == 0
    assert_same(resumed, load(reference_dir))
    assert len(resumed.records) == 8


def test_a_long_job_killed_mid_way_continues_from_its_checkpoint_bit_identically(script, tmp_path):
    flags = ["--MAX_ITER", "200", "--NUM_TRIALS", "1", "--CHECKPOINT_EVERY", "0.2",
             "--OPTIMIZER", "Adam", "--LR", "0.003", "--ONLYTHRESHOLDS", "False",
             "--EVAL_EVERY", "7", "--BATCHED", "off",
             "--WORKERS_PER_DEVICE", "1"]  # one process to kill  # fmt: skip
    reference_dir = tmp_path / "reference"
    reference = start(script, reference_dir, *flags, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "run"
    proc = start(script, run_dir, *flags)
    checkpoints = run_dir / "checkpoints"
    wait_for(lambda: len(list(checkpoints.glob("*.pt"))) == 1, proc)
    time.sleep(0.3)  # a few more checkpoints: the kill lands between (or during) saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert n_stored(run_dir) == 0

    err = finish(script, run_dir, *flags)
    steps = [int(s) for s in re.findall(r"from its checkpoint at step (\d+)", err)]
    assert len(steps) == 1 and 0 < steps[0] < 199, err
    assert not list(checkpoints.glob("*")), "checkpoints of finished jobs are removed"
    assert reference.wait(timeout=120) == 0
    resumed = load(run_dir)
    assert_same(resumed, load(reference_dir))
    # the job ran past the checkpoint: what it resumed from was not the end
    assert resumed.records[0].steps == 200


class DropoutMLP(torch.nn.Module):
    """Dropout draws from the global RNG, whose state the checkpoint must carry."""

    def __init__(self, d_in, d_out, width):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, width), torch.nn.ReLU(), torch.nn.Dropout(0.3)
        )
        self.readout = torch.nn.Linear(width, d_out)

    def forward(self, x):
        return self.readout(self.net(x))


INTERRUPT_AT = []  # the evaluation step at which the grab raises KeyboardInterrupt, once


def plain_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


def interrupting_grab(model, step, **kwargs):
    if INTERRUPT_AT and step == INTERRUPT_AT[0]:
        INTERRUPT_AT.clear()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a job
        time.sleep(5)  # the signal's KeyboardInterrupt arrives first
    return weight_layers(model)[-1][1].weight.detach().sum()  # the readout, in any model


@pytest.mark.parametrize(
    "settings",
    [
        dict(ONLINE=True, OPTIMIZER="SGD", MOMENTUM=0.9, MODEL_CLASS=DropoutMLP),
        dict(ONLINE=False, OPTIMIZER="Adam", LR=0.003),
    ],
    ids=["online-sgd-momentum-dropout", "offline-adam"],
)
def test_an_interrupted_job_resumes_from_its_checkpoint_in_process(settings, tmp_path, capsys):
    cfg = vars(base_args(WIDTH=16, MAX_ITER=60, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"],
                         LOSS_CHECKPOINTS=[1e-12], ONLYTHRESHOLDS=False, EVAL_EVERY=9,
                         CHECKPOINT_EVERY=1e-9, BATCHED="off", WORKERS_PER_DEVICE=1,
                         **settings))  # fmt: skip

    cfg["otherreturns"] = {"w": interrupting_grab}

    def sweep(run_dir):
        config = {**cfg, "SAVE_DIR": str(run_dir)}
        return run_job_iterator(
            [[0, 1]], ["trial"], config, {"base_bfn": plain_bfn}, progress=False
        )

    INTERRUPT_AT[:] = [36]  # an evaluation step (EVAL_EVERY=9): the last checkpoint is 35
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path / "run")
    assert "rerun the same sweep to continue" in capsys.readouterr().err
    resumed = sweep(tmp_path / "run")
    assert "job (trial=0) from its checkpoint at step 35" in capsys.readouterr().err
    assert_same(resumed, sweep(tmp_path / "reference"))
