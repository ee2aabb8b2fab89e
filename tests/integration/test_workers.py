"""Worker processes: placement-independent results, closures by value, dead workers, Ctrl-C."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modelscape import SweepError
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.engine.stacked.grouping import SLOWER_STACKED
from modelscape.execution.local import LocalExecutor, available_cores
from modelscape.execution.starting import START_ENV
from modelscape.store import load

REPO = Path(__file__).resolve().parents[2]


def config(**overrides):
    hp = dict(WIDTH=16, MAX_ITER=60, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[0.5, 1e-9], BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def make_bfn(d, kill=None):
    """A closure batch function; the job with values ``kill`` SIGKILLs its worker mid-job."""
    scale = torch.linspace(1.0, 2.0, d)

    def bfn(bsz, gen, X=None, y=None, trial=0, GAMMA=1.0, **kwargs):
        def batch_fn(step):
            if (trial, GAMMA) == kill and step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            Xb = torch.randn(bsz, d, generator=gen) * scale
            return Xb, Xb[:, 0] * Xb[:, 1]

        return batch_fn

    return bfn


def sweep(cfg, trials=range(4), gammas=(1.0, 0.5), bfn=None, **kwargs):
    grabs = {
        "pid": lambda **kw: os.getpid(),
        "w_norm": lambda model, **kw: model.output_layer.weight,
    }
    return run_job_iterator(
        [list(trials), list(gammas)],
        ["trial", "GAMMA"],
        {**cfg, "otherreturns": grabs},
        {"base_bfn": bfn or make_bfn(5)},
        progress=False,
        **kwargs,
    )


def assert_bit_identical(a, b, skip=()):
    by_key = {r.key: r for r in b.records}
    assert set(by_key) == {r.key for r in a.records}
    for ra in a.records:
        if ra.key in skip:
            continue
        rb = by_key[ra.key]
        assert ra.status == rb.status == "ok"
        assert (ra.seed, ra.steps) == (rb.seed, rb.steps)
        assert ra.train_loss == rb.train_loss and ra.test_loss == rb.test_loss
        np.testing.assert_array_equal(ra.timekeys, rb.timekeys)
        assert ra.grabs["w_norm"].tobytes() == rb.grabs["w_norm"].tobytes()


@pytest.mark.parametrize("batched", ["off", "auto"])
def test_one_and_two_workers_in_any_order_give_bit_identical_results(batched):
    cfg = config(BATCHED=batched)
    here = sweep({**cfg, "WORKERS_PER_DEVICE": 1})  # one worker: this process
    two = sweep({**cfg, "WORKERS_PER_DEVICE": 2}, trials=[3, 2, 1, 0], gammas=[0.5, 1.0])
    assert_bit_identical(here, two)
    assert {int(r.grabs["pid"]) for r in here.records} == {os.getpid()}
    two_pids = {int(r.grabs["pid"]) for r in two.records}
    assert len(two_pids) == 2 and os.getpid() not in two_pids
    # the jobs really differ from each other (a constant result would pass the checks above)
    assert len({r.test_loss for r in here.records}) == len(here.records)


def test_a_worker_killed_mid_job_fails_that_job_and_a_replacement_carries_on(tmp_path, capfd):
    # checkpoints every step, so that RETRY_FAILED can continue the killed job
    cfg = config(SAVE_DIR=str(tmp_path / "run"), CHECKPOINT_EVERY=1e-9)
    # one worker process: only a replacement can train the jobs after the killed one
    result = sweep(cfg, trials=range(4), bfn=make_bfn(5, kill=(0, 0.5)), use_mp=True)
    killed = [r for r in result.records if r.status == "failed"]
    assert [r.key for r in killed] == [(0, 0.5)]
    assert "died (killed by SIGKILL)" in killed[0].error and "RETRY_FAILED" in killed[0].error
    reference = sweep(config(), trials=range(4), bfn=make_bfn(5))
    assert_bit_identical(reference, result, skip={(0, 0.5)})
    pids = [int(r.grabs["pid"]) for r in result.records if r.status == "ok"]
    assert pids[0] != pids[1] and len(set(pids[1:])) == 1 and os.getpid() not in pids

    capfd.readouterr()
    retried = sweep({**cfg, "RETRY_FAILED": True}, trials=range(4), bfn=make_bfn(5))
    # the step-5 batch killed it, so its last checkpoint is after step 4
    assert "job (trial=0, GAMMA=0.5) from its checkpoint at step 4" in capfd.readouterr().err
    assert_bit_identical(reference, retried)
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def locked_grab_and_pid():
    lock = threading.Lock()

    def locked_grab(model, **kwargs):
        with lock:
            return float(os.getpid())

    return {"locked": locked_grab, "threads": lambda **kw: float(torch.get_num_threads())}


def test_an_unpicklable_closure_variable_is_named_before_any_fresh_worker_starts(monkeypatch):
    # workers that start as fresh interpreters (GPUs, or MODELSCAPE_WORKER_START=fresh) get
    # the sweep pickled; forked CPU workers inherit it (the next test)
    monkeypatch.setenv(START_ENV, "fresh")
    cfg = {**config(), "WORKERS_PER_DEVICE": 2, "otherreturns": locked_grab_and_pid()}
    start = time.perf_counter()
    with pytest.raises(SweepError) as err:
        run_job_iterator([[0]], ["trial"], cfg, {"base_bfn": make_bfn(3)}, progress=False)
    text = str(err.value)
    assert "otherreturns['locked'] uses 'lock'" in text and "lock" in text
    assert "Create such objects inside the function" in text
    assert time.perf_counter() - start < 5  # no worker was started


def test_cpu_workers_are_forks_that_inherit_the_sweep_unpickled(monkeypatch):
    monkeypatch.delenv(START_ENV, raising=False)
    cfg = {**config(), "otherreturns": locked_grab_and_pid()}
    executor = LocalExecutor(["cpu"], 2, threads=1)
    assert (executor.start_method, executor.fresh_reason) == ("fork", None)
    bfn = make_bfn(3)
    forked = run_job_iterator(
        [[0, 1, 2, 3]], ["trial"], cfg, {"base_bfn": bfn}, executor=executor, progress=False
    )
    pids = {int(r.grabs["locked"]) for r in forked.records}  # the lock never left this process
    assert len(pids) == 2 and os.getpid() not in pids
    assert {float(r.grabs["threads"]) for r in forked.records} == {1.0}
    here = run_job_iterator(
        [[0, 1, 2, 3]], ["trial"], cfg, {"base_bfn": bfn}, use_mp=False, progress=False
    )
    for a, b in zip(here.records, forked.records):
        assert (a.key, a.status, a.train_loss) == (b.key, "ok", b.train_loss)
        assert a.test_loss == b.test_loss

    # a forked child with more than one thread would hang in OpenMP: those start fresh
    assert LocalExecutor(["cpu"], 1, threads=2).start_method == "fresh"
    monkeypatch.setenv(START_ENV, "fresh")
    assert LocalExecutor(["cpu"], 2, threads=1).fresh_reason == f"{START_ENV}=fresh"


@pytest.mark.parametrize("model", ["CNN", "MLP"])
def test_auto_spreads_one_at_a_time_cpu_jobs_over_one_thread_workers_and_stacks_stay_here(
    model, capsys
):
    """Convolutional models train one job at a time on the CPU; WORKERS_PER_DEVICE="auto"
    trains them on a worker per core (one torch thread each). A stack of MLPs trains in this
    process with every thread. The numbers equal this process's with as many threads (oneDNN's
    convolution gradients round by thread count), and a sweep that "auto" would have spread out
    says so when it trains in this process."""
    cfg = {
        **config(MODEL_CLASS=model, BATCHED="auto", WIDTH=4, MAX_ITER=8),
        "otherreturns": locked_grab_and_pid(),
    }

    def image_bfn(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            Xb = torch.randn(bsz, 2, 4, 4, generator=gen)
            return Xb, Xb.mean((1, 2, 3))

        return batch_fn

    bfn = image_bfn if model == "CNN" else make_bfn(3)

    def run(**extra):
        return run_job_iterator(
            [[0, 1, 2, 3, 4]], ["trial"], {**cfg, **extra}, {"base_bfn": bfn}, progress=False
        )

    default = run(WORKERS_PER_DEVICE="auto")
    pids = {int(r.grabs["locked"]) for r in default.records}
    threads = {float(r.grabs["threads"]) for r in default.records}
    cores = available_cores()
    if model == "CNN" and 2 <= cores <= 5:  # a worker per core, when there are enough jobs
        assert len(pids) == cores and os.getpid() not in pids and threads == {1.0}
        assert {r.trained_by for r in default.records} == {str(SLOWER_STACKED)}
    else:
        assert model == "CNN" or {r.trained_by for r in default.records} == {"stacked"}
        assert pids == {os.getpid()} and threads == {float(torch.get_num_threads())}
    capsys.readouterr()
    threads_here = torch.get_num_threads()
    torch.set_num_threads(int(threads.pop()))
    try:
        here = run()  # the default: one worker, this process
    finally:
        torch.set_num_threads(threads_here)
    assert {int(r.grabs["locked"]) for r in here.records} == {os.getpid()}
    hinted = "WORKERS_PER_DEVICE='auto' would train" in capsys.readouterr().err
    assert hinted == (len(pids) > 1)
    for a, b in zip(here.records, default.records):
        assert (a.key, a.status, a.seed, a.trained_by) == (b.key, "ok", b.seed, b.trained_by)
        assert (a.train_loss, a.test_loss) == (b.train_loss, b.test_loss)
        np.testing.assert_array_equal(a.timekeys, b.timekeys)
    assert len({r.test_loss for r in here.records}) == 5


def locked_state_grab(model, **kwargs):
    return float(torch.are_deterministic_algorithms_enabled())


def nan_fill_grab(model, **kwargs):
    return float(torch.utils.deterministic.fill_uninitialized_memory)


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_turns_on_torch_deterministic_algorithms_while_training(deterministic):
    """... without torch's NaN fill of new tensors (a debugging aid that costs time)."""
    before = torch.are_deterministic_algorithms_enabled()
    grabs = {"det": locked_state_grab, "fill": nan_fill_grab}
    cfg = {**config(DETERMINISTIC=deterministic), "otherreturns": grabs}
    result = run_job_iterator([[0]], ["trial"], cfg, {"base_bfn": make_bfn(3)}, progress=False)
    assert float(result.records[0].grabs["det"]) == float(deterministic)
    assert float(result.records[0].grabs["fill"]) == float(not deterministic)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default, restored


def children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


SLOW_SWEEP = """
import sys, time, torch
from modelscape.cli.args import base_args
from modelscape.backend.job_iterator import main

def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        time.sleep(0.02)
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, Xb[:, 0]
    return batch_fn

cfg = vars(base_args(WIDTH=8, MAX_ITER=int(sys.argv[2]), N_SAMPLES=8, N_TEST=8, DEVICES=["cpu"],
                     WORKERS_PER_DEVICE=int(sys.argv[3]), LOSS_CHECKPOINTS=[1e-12],
                     SAVE_DIR=sys.argv[1], CHECKPOINT_EVERY=0.3))
main([range(int(sys.argv[4])), [1.0, 0.5]], ["trial", "GAMMA"], cfg, {"base_bfn": bfn})
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_sweep_and_leaves_no_worker_behind(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(SLOW_SWEEP))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), "100", "2", "6"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 or not (run_dir / "results.sqlite").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        workers = children(proc.pid)
        time.sleep(0.05)
    while not list((run_dir / "checkpoints").glob("*.pt")):  # both workers are mid-job
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not [pid for pid in workers if alive(pid)]
    n_done = len(load(run_dir).records)
    assert n_done < 12  # it stopped early, and what it stored still loads
