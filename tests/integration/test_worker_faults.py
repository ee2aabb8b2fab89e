"""Worker deaths and hung jobs, with real worker processes and real signals.

A worker that dies at any moment never stops the sweep: the jobs it lost are retried from
their checkpoints (a stacked group split in two), up to MAX_RETRIES; only jobs that exhaust
their retries are failed, with the signal and the count. JOB_TIMEOUT stops a hung job.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from sweeps import config, rel, trial_sweep

from modelscape import HParamError, SweepError, load
from modelscape.execution.starting import WORKER_NAME

REPO = Path(__file__).resolve().parents[2]
PARENT = os.getpid()


@pytest.fixture(autouse=True)
def one_core():
    """Pin this process, and so its workers, to one core while a test runs.

    A worker gets cores // workers torch threads. On a shared, loaded 2-core machine two
    spinning OpenMP threads per worker made tiny jobs 50 times slower than one thread, which
    the timing-based checks here (JOB_TIMEOUT, kills after a delay) cannot absorb.
    """
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


def make_bfn(kill_trial=None, kill_step=5, once=None, hang_trial=None):
    """x0 * x1 on 5 inputs. In a worker process (never in this one), the job ``kill_trial``
    SIGKILLs its own worker at ``kill_step``: every time, or only once if ``once`` is a marker
    path. The job ``hang_trial`` sleeps for an hour at step 2."""

    def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
        def batch_fn(step):
            in_worker = os.getpid() != PARENT
            if in_worker and trial == kill_trial and step == kill_step:
                if once is None or not os.path.exists(once):
                    if once is not None:
                        Path(once).touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            if in_worker and trial == hang_trial and step == 2:
                time.sleep(3600)
            Xb = torch.randn(bsz, 5, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]

        return batch_fn

    return bfn


def sweep(cfg, trials=range(4), bfn=None, **kwargs):
    grabs = {"pid": lambda **kw: os.getpid(), "w": lambda model, **kw: model.output_layer.weight}
    return trial_sweep(cfg, trials, bfn or make_bfn(), grabs, **kwargs)


def assert_same_numbers(reference, result, keys):
    for key in keys:
        a, b = reference.record(*key), result.record(*key)
        assert a.status == b.status == "ok", (key, b.error)
        assert (a.steps, a.train_loss, a.test_loss) == (b.steps, b.train_loss, b.test_loss)
        assert a.grabs["w"].tobytes() == b.grabs["w"].tobytes()


# The worker that trains trial 0 dies after it has sent that job's record and reported itself
# idle, before it receives its next group: the window in which the parent's send used to raise
# BrokenPipeError and stop every worker. To hit the window every time, the job's grab (which
# runs in the worker just before the record is sent) stops the parent with SIGSTOP, arranges
# for the worker to SIGKILL itself once it is blocked waiting for the next group, and starts a
# watcher that resumes the parent once the worker is dead. The parent then reads the record and
# the "done" message of a dead worker and sends it the next group.
KILL_AFTER_SEND = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, threading, time
    import torch
    from modelscape import run_sweep, base_args

    SAVE_DIR, MARK = sys.argv[1], sys.argv[2]
    PARENT = os.getpid()
    WATCHER = '''
    import os, signal, sys, time
    pid, parent = int(sys.argv[1]), int(sys.argv[2])
    def state(p):
        try:
            with open(f"/proc/{p}/status") as f:
                return next(l.split()[1] for l in f if l.startswith("State:"))
        except (FileNotFoundError, StopIteration):
            return "gone"
    while state(pid) not in ("Z", "X", "gone"):
        time.sleep(0.01)
    os.kill(parent, signal.SIGCONT)
    '''

    def state(pid):
        with open(f"/proc/{pid}/status") as f:
            return next(l.split()[1] for l in f if l.startswith("State:"))

    def waiting_for_next_group(main_id):
        frame = sys._current_frames().get(main_id)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "recv" and code.co_filename.endswith("connection.py"):
                return True
            frame = frame.f_back
        return False

    def die_when_idle(main_id):
        deadline = time.monotonic() + 60
        while not waiting_for_next_group(main_id) and time.monotonic() < deadline:
            time.sleep(0.005)
        open(MARK, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

    def trap(trial, **kw):
        if os.getpid() != PARENT and trial == 0 and not os.path.exists(MARK):
            parent = os.getppid()
            os.kill(parent, signal.SIGSTOP)
            while state(parent) != "T":
                time.sleep(0.001)
            subprocess.Popen([sys.executable, "-c", WATCHER, str(os.getpid()), str(parent)],
                             start_new_session=True)
            main_id = threading.main_thread().ident
            threading.Thread(target=die_when_idle, args=(main_id,), daemon=True).start()
        return float(os.getpid())

    def bfn(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            Xb = torch.randn(bsz, 5, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]
        return batch_fn

    cfg = vars(base_args(WIDTH=16, MAX_ITER=30, N_SAMPLES=32, N_TEST=64, DEVICES=["cpu"],
                         LOSS_CHECKPOINTS=[1e-9], BATCHED="off", SAVE_DIR=SAVE_DIR))
    cfg["otherreturns"] = {"pid": trap}
    # a long tag makes each group's message over 16 KiB: it is then written in two parts, and
    # the second write to the dead worker fails with BrokenPipeError instead of being buffered
    result = run_sweep([[0, 1, 2, 3], ["x" * 40000]], ["trial", "tag"], cfg, {"base_bfn": bfn},
                       use_mp=True, progress=False)
    print(json.dumps({str(r.key[0]): [r.status, float(r.grabs.get("pid", -1))]
                      for r in result.records}))
    """
)


def test_a_worker_dying_after_sending_its_record_does_not_stop_the_sweep(tmp_path):
    script = tmp_path / "kill_after_send.py"
    script.write_text(KILL_AFTER_SEND)
    mark = tmp_path / "worker_died"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tmp_path / "run"), str(mark)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert mark.exists(), done.stderr  # the worker did die in the window
    assert done.returncode == 0, done.stderr
    assert "BrokenPipeError" not in done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert [outcome[str(t)][0] for t in range(4)] == ["ok"] * 4
    # trial 0 was trained by the worker that died; the other jobs by its replacement
    pids = {t: outcome[str(t)][1] for t in range(4)}
    assert pids[0] != pids[1] and pids[1] == pids[2] == pids[3]
    assert [r.status for r in load(tmp_path / "run").records] == ["ok"] * 4


def test_a_stacked_group_whose_worker_dies_is_retried_from_its_checkpoints(tmp_path, capfd):
    reference = sweep(config(BATCHED="on"))
    once = tmp_path / "killed_once"
    cfg = config(BATCHED="on", SAVE_DIR=str(tmp_path / "run"), CHECKPOINT_EVERY=1e-9)
    result = sweep(cfg, bfn=make_bfn(kill_trial=2, kill_step=40, once=str(once)), use_mp=True)
    assert once.exists()  # the worker was killed once, mid-training
    assert_same_numbers(reference, result, [(t,) for t in range(4)])
    err = capfd.readouterr().err
    assert "killed by SIGKILL" in err and "retry 1 of MAX_RETRIES=1" in err
    # the retry continued from the checkpoints the stack wrote at the end of its first 32-step
    # window, it did not start over
    assert "from its checkpoint at step 31" in err
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_only_jobs_that_exhaust_max_retries_fail_and_a_dead_group_is_split(tmp_path, capfd):
    reference = sweep(config(BATCHED="on"))
    # trial 0 kills its worker every time it reaches step 5
    cfg = config(BATCHED="on", MAX_RETRIES=2, CHECKPOINT_EVERY=1e-9, SAVE_DIR=str(tmp_path / "r"))
    result = sweep(cfg, bfn=make_bfn(kill_trial=0), use_mp=True)
    failed = result.record(0)
    assert failed.status == "failed"
    assert "killed by SIGKILL" in failed.error and "3 times" in failed.error
    assert "MAX_RETRIES=2" in failed.error and "RETRY_FAILED" in failed.error
    # the group of 4 died, then its half [0, 1], then [0] alone: trial 1 survived the split.
    # [2, 3] still trained stacked, so bit for bit as before; trial 1 alone trained in the
    # one-job loop, whose rounding differs from the stacked engine's
    assert_same_numbers(reference, result, [(2,), (3,)])
    alone, stacked = result.record(1), reference.record(1)
    assert alone.status == "ok" and alone.steps == stacked.steps
    assert alone.test_loss == pytest.approx(stacked.test_loss, rel=1e-4)
    err = capfd.readouterr().err
    assert err.count("killed by SIGKILL") >= 3


def test_without_retries_a_killed_job_fails_at_once_with_the_signal():
    result = sweep(config(MAX_RETRIES=0), bfn=make_bfn(kill_trial=1), use_mp=True)
    status = {r.key[0]: r.status for r in result.records}
    assert status == {0: "ok", 1: "failed", 2: "ok", 3: "ok"}
    assert "killed by SIGKILL" in result.record(1).error
    assert "MAX_RETRIES=0" in result.record(1).error


def test_a_hung_job_is_stopped_after_job_timeout_on_a_worker_process():
    start = time.perf_counter()
    # one worker in total: JOB_TIMEOUT makes it a worker process so that it can be stopped
    result = sweep(config(JOB_TIMEOUT=10.0), bfn=make_bfn(hang_trial=1))
    assert time.perf_counter() - start < 120
    status = {r.key[0]: r.status for r in result.records}
    assert status == {0: "ok", 1: "failed", 2: "ok", 3: "ok"}
    error = result.record(1).error
    assert "JOB_TIMEOUT=10" in error and "raise JOB_TIMEOUT" in error
    assert {int(r.grabs["pid"]) for r in result.records if r.status == "ok"} != {os.getpid()}


def slow_bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
    """``make_bfn``'s data, 10 ms a draw: a stack of 16 jobs takes ~0.3 s per job."""
    inner = make_bfn()(bsz, gen, trial=trial)

    def batch_fn(step):
        time.sleep(0.01)
        return inner(step)

    return batch_fn


def test_job_timeout_is_per_job_so_a_large_stack_longer_than_it_finishes(tmp_path):
    cfg = config(BATCHED="auto", MAX_ITER=30, SAVE_DIR=str(tmp_path / "run"), JOB_TIMEOUT=1.5)
    start = time.perf_counter()
    result = sweep(cfg, trials=range(16), bfn=slow_bfn)
    seconds = time.perf_counter() - start
    assert result.trained_by == {"stacked": 16}
    # the stack trained longer than JOB_TIMEOUT, and nothing was stopped
    assert sum(r.seconds for r in result.records) > 2 * 1.5
    reference = sweep(config(BATCHED="auto", MAX_ITER=30), trials=range(16), bfn=slow_bfn)
    stored = load(tmp_path / "run")
    for r in (result, stored):
        assert [x.status for x in r.records] == ["ok"] * 16
        assert_same_numbers(reference, r, [(t,) for t in range(16)])
    assert seconds < 120


def test_a_hanging_job_times_out_alone_and_its_stack_mates_finish(tmp_path, capfd):
    cfg = config(BATCHED="auto", MAX_ITER=30, SAVE_DIR=str(tmp_path / "run"), JOB_TIMEOUT=3.0)
    result = sweep(cfg, bfn=make_bfn(hang_trial=1))
    stored = load(tmp_path / "run")
    # in this process nothing hangs: the same stack, untimed
    reference = sweep(config(BATCHED="auto", MAX_ITER=30), bfn=make_bfn(hang_trial=1))
    for r in (result, stored):
        assert {x.key[0]: x.status for x in r.records} == {0: "ok", 1: "failed", 2: "ok", 3: "ok"}
        assert "JOB_TIMEOUT=3" in r.record(1).error
        assert r["errors"].keys() == {(1,)}
        for t in (0, 2, 3):
            assert r.record(t).steps == reference.record(t).steps == 30
            # a mate left alone by the split trains in the one-job loop: float rounding apart
            assert rel(r.record(t).test_loss, reference.record(t).test_loss) < 1e-5
            assert r["losses"]["config2outcome"][(t,)] == result.record(t).test_loss
    assert "ran past JOB_TIMEOUT=3 s per job with 4 unfinished jobs" in capfd.readouterr().err


def test_job_timeout_cannot_be_silently_ignored_in_this_process():
    with pytest.raises((SweepError, HParamError)) as err:
        sweep(config(JOB_TIMEOUT=4.0), use_mp=False)
    assert "JOB_TIMEOUT" in str(err.value) and "use_mp=False" in str(err.value)


CTRL_C = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from modelscape import run_sweep, base_args

    SAVE_DIR, STARTED = sys.argv[1], sys.argv[2]

    def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
        def batch_fn(step):
            if trial == 1 and step == 3:
                open(STARTED, "w").close()
            if trial == 1 and step >= 3:
                time.sleep(0.05)
            Xb = torch.randn(bsz, 5, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]
        return batch_fn

    cfg = vars(base_args(WIDTH=16, MAX_ITER=2000, N_SAMPLES=32, N_TEST=64, DEVICES=["cpu"],
                         LOSS_CHECKPOINTS=[1e-9], BATCHED="off", SAVE_DIR=SAVE_DIR))
    run_sweep([[0, 1, 2]], ["trial"], cfg, {"base_bfn": bfn}, progress=False)
    print("finished")
    """
)


def test_ctrl_c_from_the_terminal_still_stops_a_sweep_in_this_process(tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    started = tmp_path / "started"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), str(started)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "finished" not in out
    assert "interrupted" in err and "rerun the same sweep to continue" in err
    # the job it was training is not recorded as failed: it is simply unfinished
    assert [r.key for r in load(tmp_path / "run").records] == [(0,)]


def _worker_children() -> list[int]:
    """This process's modelscape worker processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        fresh = "modelscape" in args and "worker" in args
        if ppid == os.getpid() and (fresh or name == WORKER_NAME):  # a fork's args are ours
            found.append(int(entry.name))
    return found


def test_the_parent_outlives_workers_killed_from_outside(tmp_path):
    """Kill the training worker from outside, twice, at whatever moment it is in."""
    killed = []

    def killer():
        for _ in range(2):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                alive = [p for p in _worker_children() if p not in killed]
                if alive:
                    time.sleep(1.0)
                    os.kill(alive[0], signal.SIGKILL)
                    killed.append(alive[0])
                    break
                time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    cfg = config(MAX_ITER=3000, CHECKPOINT_EVERY=0.2, MAX_RETRIES=3, SAVE_DIR=str(tmp_path / "r"))
    result = sweep(cfg, trials=range(3), use_mp=True)
    thread.join(timeout=5)
    assert len(killed) == 2
    assert [r.status for r in result.records] == ["ok"] * 3
    reference = sweep(config(MAX_ITER=3000), trials=range(3))
    assert_same_numbers(reference, result, [(t,) for t in range(3)])
