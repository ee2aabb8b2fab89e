"""EXECUTOR="ray" on a real two-node Ray cluster on this machine (``tests/clusters.py``).

Each sweep runs in a driver process of its own, as a user's script would, so that what it
leaves behind after it exits can be checked. The test that kills a node runs last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from clusters import RAY_MARKER, RayCluster, ray_processes

from modelscape.errors import HParamError
from modelscape.store import load
from modelscape.sweep.hparams import resolve

pytest.importorskip("ray")

# The user's script. The batch function lives in __main__, so it travels to the nodes by value.
DRIVER = """
import json
import sys

import torch

from modelscape.cli.args import base_args
from modelscape.backend.job_iterator import main


def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


cfg = vars(base_args(WIDTH=16, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"],
                     LOSS_CHECKPOINTS=[0.5, 1e-9], **json.loads(sys.argv[1])))
# per trial, one short job and three long ones: each node's stacked group hands back a record
# early and the others much later
main([range(2), [100, 2400, 2500, 2600]], ["trial", "MAX_ITER"], cfg, {"base_bfn": bfn},
     progress=False)
"""


def start_driver(tmp_path: Path, env: dict[str, str], **overrides) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log = open(tmp_path / f"driver-{uuid.uuid4().hex[:6]}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(overrides)], env=env, stdout=log, stderr=log
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> None:
    rc = proc.wait(timeout=timeout)
    log = Path(proc.args[1]).parent.glob("driver-*.log")
    assert rc == 0, "\n".join(p.read_text()[-3000:] for p in log)


def left_behind(marker: str, grace: float = 10.0) -> list[str]:
    """The processes tagged ``marker`` still alive ``grace`` seconds after the driver exited."""
    deadline = time.monotonic() + grace
    while ray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [Path(f"/proc/{p}/cmdline").read_bytes()[:120].decode() for p in ray_processes(marker)]


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    """The same sweep trained by the local executor, for the bit-for-bit comparisons."""
    tmp = tmp_path_factory.mktemp("local")
    finish(start_driver(tmp, dict(os.environ), SAVE_DIR=str(tmp / "run")))
    return load(tmp / "run")


def assert_equal_records(result, local) -> None:
    """Every job as local training gave it: bit for bit when it trained the same way; a job
    retried alone after its stack was lost (trained_by "single") agrees to float rounding, as
    the one-job loop's products round differently from a stack's."""
    assert len(result.records) == len(local.records) == 8
    by_key = {r.key: r for r in local.records}
    for r in result.records:
        other = by_key[r.key]
        assert r.status == other.status == "ok", r.error
        assert r.steps == other.steps
        np.testing.assert_array_equal(r.timekeys, other.timekeys)
        if r.trained_by == other.trained_by:
            assert r.train_loss == other.train_loss and r.test_loss == other.test_loss
        else:
            assert r.trained_by == "single" and other.trained_by == "stacked"
            np.testing.assert_allclose(r.test_loss, other.test_loss, rtol=1e-5)
            np.testing.assert_allclose(r.train_loss, other.train_loss, rtol=1e-5)


def node_of(record, cluster: RayCluster) -> str:
    for name, node in (("head", cluster.head), ("second", cluster.second)):
        if record.device.endswith(f"on ray node {node.node_id}"):
            return name
    raise AssertionError(f"job {record.key} ran on no node of the cluster: {record.device!r}")


def test_a_sweep_uses_both_nodes_and_equals_local_training(ray_cluster, local_result, tmp_path):
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    env = ray_cluster.driver_env(marker)
    address = env.pop("RAY_ADDRESS")  # given as the hyperparameter here, as $RAY_ADDRESS below
    finish(start_driver(tmp_path, env, EXECUTOR="ray", RAY_ADDRESS=address,
                        SAVE_DIR=str(run_dir)))  # fmt: skip
    result = load(run_dir)
    assert_equal_records(result, local_result)
    # the 8 jobs form one stackable group; split to the cluster's 2 free CPUs, one per node
    nodes = [node_of(r, ray_cluster) for r in result.records]
    assert sorted(nodes) == ["head"] * 4 + ["second"] * 4
    assert {r.trained_by for r in result.records} == {"stacked"}
    assert left_behind(marker) == []


def test_ray_settings_need_the_ray_executor():
    with pytest.raises(HParamError, match="RAY_ADDRESS='host:6379' needs EXECUTOR='ray'"):
        resolve({"RAY_ADDRESS": "host:6379"})
    with pytest.raises(HParamError, match=r"MAX_RETRIES must be >= 0 \(0: no retry\), got -1"):
        resolve({"EXECUTOR": "ray", "MAX_RETRIES": -1})


def test_a_local_ray_started_by_the_sweep_leaves_no_process_behind(tmp_path):
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({RAY_MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"})
    proc = start_driver(tmp_path, env, EXECUTOR="ray", SAVE_DIR=str(tmp_path / "run"))
    started = []
    while proc.poll() is None:  # Ray's own processes exist while the sweep runs...
        started = started or [p for p in ray_processes(marker) if p != proc.pid]
        time.sleep(0.2)
    finish(proc)
    assert started, "the driver started no Ray process: it did not run a local Ray"
    assert left_behind(marker) == []  # ...and none of them outlives it
    assert len(load(tmp_path / "run").records) == 8


def test_killing_a_node_mid_sweep_loses_no_finished_job(ray_cluster, local_result, tmp_path):
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    proc = start_driver(tmp_path, ray_cluster.driver_env(marker), EXECUTOR="ray",
                        SAVE_DIR=str(run_dir), CHECKPOINT_EVERY=0.2, MAX_RETRIES=1)  # fmt: skip
    before: dict = {}
    deadline = time.monotonic() + 120
    while not any(node_of(r, ray_cluster) == "second" for r in before.values()):
        assert proc.poll() is None and time.monotonic() < deadline, "no job finished on node 2"
        time.sleep(0.1)
        try:
            before = {r.key: r for r in load(run_dir).records}
        except FileNotFoundError:  # the sweep has not created its run folder yet (or is doing so)
            pass
    ray_cluster.kill_second_node()
    finish(proc)
    result = load(run_dir)
    assert_equal_records(result, local_result)
    after = {r.key: r for r in result.records}
    for key, r in before.items():  # stored before the kill: kept, never trained again
        assert (after[key].device, after[key].seconds) == (r.device, r.seconds)
    nodes = [node_of(r, ray_cluster) for r in result.records]
    # the second node's unfinished jobs were retried, and finished, on the head node
    assert 1 <= nodes.count("second") < 4 and nodes.count("head") > 4
    assert left_behind(marker) == []
