"""EXECUTOR="slurm" on a real single-node SLURM cluster (tests/clusters.py): same records as
training locally, closures by value, a cancelled task, a killed parent, DETACH, timeouts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.errors import HParamError, SweepError
from modelscape.execution.slurm import parameter_names, task_states
from modelscape.store import load

pytest.importorskip("submitit")

# A notebook cell: functions defined in __main__ cannot be imported by a SLURM task, so they
# must travel by value (cloudpickle), closure variables included.
# ``delay`` (seconds per batch) slows a sweep down without changing its numbers;
# ``first_run_delay`` slows only a SLURM task's first run, not its runs after a requeue.
CELL = """
import os
import time

import torch

offset = 0.25

def bfn(bsz, gen, X=None, y=None, delay=0.0, first_run_delay=0.0, **kwargs):
    def batch_fn(step):
        first_run = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        time.sleep(delay + (first_run_delay if first_run else 0.0))
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1] + offset
    return batch_fn
"""

ITERATORS, NAMES = [range(2), [1.0, 0.5]], ["trial", "GAMMA"]


def notebook_bfn(**static):
    """The batch function config of the notebook cell, with static keyword arguments."""
    namespace = {"__name__": "__main__"}
    exec(CELL, namespace)
    return {"base_bfn": namespace["bfn"], **static}


def submitted_ids(cluster) -> list[str]:
    """Every job SLURM has seen since the cluster started (finished ones included), sorted:
    squeue lists them in an order that changes as their states do."""
    out = cluster.command("squeue", "--noheader", "--states=all", "--array", "-o", "%i")
    return sorted(out.split())


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def running_tasks(run_dir: Path) -> list[str]:
    path = run_dir / "slurm" / "tasks.json"
    if not path.exists():
        return []
    tasks = json.loads(path.read_text())
    states = task_states([t["slurm_id"] for t in tasks]) or {}
    return [i for i, s in states.items() if s == "RUNNING"]


def config(**overrides):
    cfg = base_args(
        WIDTH=16, MAX_ITER=60, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"], WORKERS_PER_DEVICE=2,
        LOSS_CHECKPOINTS=[0.5, 1e-9], ONLYTHRESHOLDS=False, EVAL_EVERY=20,
    )  # fmt: skip
    return {**vars(cfg), **overrides}


@pytest.fixture(scope="module")
def local_result():
    """The reference: the same sweep trained in this process."""
    return run_job_iterator(
        ITERATORS, NAMES, config(), notebook_bfn(), use_mp=False, progress=False
    )


def assert_same(a, b):
    assert [r.key for r in a.records] == [r.key for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert_same_record(ra, rb)


def assert_same_record(ra, rb):
    assert ra.key == rb.key and ra.status == rb.status == "ok"
    assert ra.train_loss == rb.train_loss and ra.test_loss == rb.test_loss
    np.testing.assert_array_equal(ra.timekeys, rb.timekeys)
    assert ra.curves["test_loss"].tobytes() == rb.curves["test_loss"].tobytes()


def test_sweep_on_slurm_equals_local_bit_for_bit(slurm_cluster, local_result, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(EXECUTOR="slurm", SAVE_DIR=str(run_dir))
    on_slurm = run_job_iterator(ITERATORS, NAMES, cfg, notebook_bfn(), progress=False)
    assert len(on_slurm.records) == 4
    assert_same(on_slurm, local_result)
    assert_same(load(run_dir), local_result)
    devices = {r.device for r in on_slurm.records}
    assert devices == {"cpu"}
    assert len({r.test_loss for r in on_slurm.records}) == 4
    logs = sorted((run_dir / "slurm" / "submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # two array tasks, one per worker slot (DEVICES x WORKERS_PER_DEVICE)
    assert all("_" in p.parent.name for p in logs)  # array ids: <job>_<index>


def test_bad_slurm_settings_fail_before_anything_runs(slurm_cluster, tmp_path):
    cfg = config(EXECUTOR="slurm", SAVE_DIR=str(tmp_path / "run"), SLURM={"time_out_min": 1})
    before = submitted_ids(slurm_cluster)
    with pytest.raises(HParamError, match="time_out_min.*Valid names: .*timeout_min"):
        run_job_iterator(ITERATORS, NAMES, cfg, notebook_bfn(), progress=False)
    assert "slurm_partition" in parameter_names()
    assert not (tmp_path / "run" / "slurm" / "submitit").exists()
    assert submitted_ids(slurm_cluster) == before
    cfg["SLURM"] = {"slurm_partition": "nowhere"}  # a valid name, a value SLURM rejects
    with pytest.raises(SweepError, match="SLURM refused the job array.*(?i:invalid partition)"):
        run_job_iterator(ITERATORS, NAMES, cfg, notebook_bfn(), progress=False)
    assert submitted_ids(slurm_cluster) == before


def test_a_cancelled_task_fails_only_its_jobs_and_retry_failed_finishes_them(
    slurm_cluster, local_result, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = config(EXECUTOR="slurm", SAVE_DIR=str(run_dir))
    bfn = notebook_bfn(delay=0.05)  # each task trains for about 12 s
    box = {}
    sweep = threading.Thread(
        target=lambda: box.update(
            result=run_job_iterator(ITERATORS, NAMES, cfg, bfn, progress=False)
        )
    )
    sweep.start()
    wait_until(lambda: (run_dir / "slurm" / "tasks.json").exists(), 60, "the submission")
    wait_until(lambda: len(running_tasks(run_dir)) == 2, 60, "both tasks running")
    victim = sorted(running_tasks(run_dir))[1]
    slurm_cluster.command("scancel", victim)
    sweep.join(120)
    first = box["result"]
    failed = {r.key for r in first.failed}
    assert len(failed) == 2 and len(first.records) == 4
    for r in first.failed:
        assert f"SLURM task {victim} ended (CANCELLED" in r.error
        assert r.device == f"slurm {victim}"
    for r in first.records:
        if r.key not in failed:
            assert_same_record(r, local_result.record(*r.key))
    before = submitted_ids(slurm_cluster)
    again = run_job_iterator(ITERATORS, NAMES, {**cfg, "RETRY_FAILED": True}, bfn, progress=False)
    assert_same(again, local_result)
    new = [i for i in submitted_ids(slurm_cluster) if i not in before]
    assert len(new) == 1  # only the failed group was submitted again


PARENT = """
import json
import os
import re
import sys

from modelscape.backend.job_iterator import main

config, static = json.loads(sys.argv[1]), json.loads(sys.argv[2])
main([range(2), [1.0, 0.5]], ["trial", "GAMMA"], config, {"base_bfn": bfn, **static})
"""


def test_a_killed_parent_leaves_the_tasks_running_and_a_rerun_reattaches(
    slurm_cluster, local_result, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = config(EXECUTOR="slurm", SAVE_DIR=str(run_dir))
    script = tmp_path / "sweep.py"
    script.write_text(CELL + PARENT)
    static = {"delay": 0.05}
    parent = subprocess.Popen([sys.executable, str(script), json.dumps(cfg), json.dumps(static)])
    try:
        wait_until(lambda: len(running_tasks(run_dir)) == 2, 90, "both tasks running")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    before = submitted_ids(slurm_cluster)
    assert len(running_tasks(run_dir)) == 2  # the tasks outlive their parent
    rerun = run_job_iterator(ITERATORS, NAMES, cfg, notebook_bfn(**static), progress=False)
    assert_same(rerun, local_result)
    assert submitted_ids(slurm_cluster) == before  # reattached: nothing was submitted again
    assert json.loads((run_dir / "slurm" / "tasks.json").read_text()) == []


def test_detach_returns_at_once_and_show_then_a_rerun_collect(
    slurm_cluster, local_result, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = config(EXECUTOR="slurm", SAVE_DIR=str(run_dir), DETACH=True)
    bfn = notebook_bfn(delay=0.05)
    start = time.monotonic()
    detached = run_job_iterator(ITERATORS, NAMES, cfg, bfn, progress=False)
    assert time.monotonic() - start < 10 and detached.records == []
    ids = [t["slurm_id"] for t in json.loads((run_dir / "slurm" / "tasks.json").read_text())]
    assert len(ids) == 2
    wait_until(lambda: set(task_states(ids).values()) == {"COMPLETED"}, 120, "the tasks")
    shown = subprocess.run(
        [sys.executable, "-m", "modelscape", "show", str(run_dir)], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "jobs: 4 total, 4 done (4 ok, 0 diverged, 0 failed), 0 missing" in shown.stdout
    assert "slurm: 4 new records stored" in shown.stderr
    assert_same(load(run_dir), local_result)
    before = submitted_ids(slurm_cluster)
    collected = run_job_iterator(ITERATORS, NAMES, {**cfg, "DETACH": False}, bfn, progress=False)
    assert_same(collected, local_result)
    assert submitted_ids(slurm_cluster) == before


def test_a_task_out_of_time_is_requeued_and_continues_from_its_checkpoints(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    iterators = [range(2), [1.0]]
    # One task with both jobs and a 1-minute limit. SLURM sends submitit's signal 10 s before
    # the limit, or up to 30 s earlier (its timer's period): 20-50 s after the start, after
    # Python started. The first run is too slow to finish by then (0.2 s a batch, 300 steps).
    slurm = {"timeout_min": 1, "slurm_signal_delay_s": 10}
    cfg = config(EXECUTOR="slurm", SAVE_DIR=str(run_dir), WORKERS_PER_DEVICE=1, MAX_ITER=300,
                 CHECKPOINT_EVERY=1.0, SLURM=slurm)  # fmt: skip
    on_slurm = run_job_iterator(
        iterators, NAMES, cfg, notebook_bfn(first_run_delay=0.2), progress=False
    )
    local = run_job_iterator(
        iterators, NAMES, config(MAX_ITER=300), notebook_bfn(), use_mp=False, progress=False
    )
    assert_same(on_slurm, local)
    (log,) = (run_dir / "slurm" / "submitit").glob("*/*_log.out")
    (err,) = (run_dir / "slurm" / "submitit").glob("*/*_log.err")
    logs = log.read_text() + err.read_text()
    assert "Requeued job" in logs
    resumed = re.findall(r"resuming job \(.*\) from its checkpoint at step (\d+)", logs)
    assert len(resumed) == 2 and all(0 < int(step) < 300 for step in resumed)


def docs_snippet() -> str:
    """The docs' SLURM shell snippet (Running sweeps), between its markers."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "running-sweeps.md").read_text()
    block = text.split("<!-- slurm-snippet:begin -->")[1].split("<!-- slurm-snippet:end -->")[0]
    return block.split("```bash\n")[1].split("```")[0]


def test_the_docs_slurm_snippet_runs_on_the_cluster(slurm_cluster, tmp_path):
    run_dir = tmp_path / "demo"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the `modelscape` command
    env = {**os.environ, "RUN": str(run_dir), "PATH": path}
    before = submitted_ids(slurm_cluster)
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", docs_snippet()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "detached; SLURM job(s)" in out.stderr
    assert "30 jobs (30 ok)" in out.stdout and (run_dir / "learning_curve.png").is_file()
    new = [i for i in submitted_ids(slurm_cluster) if i not in before]
    # one array of at least two tasks, from the detached run; the rerun reattached to it
    assert len(new) >= 2 and len({i.split("_")[0] for i in new}) == 1
    result = load(run_dir)
    assert len(result.records) == 30 and not result.failed
