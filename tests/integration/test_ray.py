"""EXECUTOR="ray" on a real local Ray instance with 2 CPUs: same records as training locally."""

import os
import signal

import numpy as np
import pytest
import torch

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.store import load

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    # no GPUs even on a machine that has them, so the CPU fallback is tested everywhere
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_results_and_store_equal_local_training(local_ray, tmp_path):
    offset = 0.25  # a closure value: the batch function travels by value

    def bfn(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            Xb = torch.randn(bsz, 4, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1] + offset

        return batch_fn

    def grabs():
        return {"pid": lambda **kw: os.getpid(), "w": lambda model, **kw: model.output_layer.weight}

    cfg = vars(base_args(WIDTH=16, MAX_ITER=40, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"],
                         LOSS_CHECKPOINTS=[0.5, 1e-9], BATCHED="off"))  # fmt: skip
    iterators, names = [range(3), [1.0, 0.5]], ["trial", "GAMMA"]
    run_dir = tmp_path / "ray-run"
    on_ray = run_job_iterator(
        iterators,
        names,
        {**cfg, "EXECUTOR": "ray", "SAVE_DIR": str(run_dir), "otherreturns": grabs()},
        {"base_bfn": bfn},
        progress=False,
    )
    assert ray.is_initialized()  # the executor leaves a Ray instance it did not start running
    local = run_job_iterator(
        iterators, names, {**cfg, "otherreturns": grabs()}, {"base_bfn": bfn}, progress=False
    )
    stored = load(run_dir)
    for ra, rl, rs in zip(on_ray.records, local.records, stored.records):
        assert ra.key == rl.key == rs.key and ra.status == rl.status == "ok"
        assert ra.train_loss == rl.train_loss == rs.train_loss
        assert ra.test_loss == rl.test_loss == rs.test_loss
        np.testing.assert_array_equal(ra.timekeys, rl.timekeys)
        assert ra.grabs["w"].tobytes() == rl.grabs["w"].tobytes() == rs.grabs["w"].tobytes()
    ray_pids = {int(r.grabs["pid"]) for r in on_ray.records}
    assert os.getpid() not in ray_pids  # trained in Ray's worker processes
    assert len({r.test_loss for r in local.records}) == 6


def _too_slow(signum, frame):
    raise TimeoutError("the Ray tasks did not finish: they wait for a GPU the cluster lacks")


def test_cuda_devices_fall_back_to_the_cpu_on_a_cluster_without_gpus(local_ray, capsys):
    def bfn(bsz, gen, X=None, y=None, **kwargs):
        return lambda step: (x := torch.randn(bsz, 3, generator=gen), x[:, 0] * x[:, 1])

    cfg = vars(base_args(WIDTH=8, MAX_ITER=10, N_SAMPLES=8, N_TEST=16, LOSS_CHECKPOINTS=[0.5],
                         BATCHED="off"))  # fmt: skip
    assert cfg["DEVICES"] == [0]  # the default asks for a GPU
    iterators, names = [range(2)], ["trial"]
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(60)
    try:
        on_ray = run_job_iterator(
            iterators, names, {**cfg, "EXECUTOR": "ray"}, {"base_bfn": bfn}, progress=False
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert (
        "modelscape: CUDA is not available; DEVICES=[0] runs on the CPU." in capsys.readouterr().err
    )
    local = run_job_iterator(
        iterators, names, {**cfg, "DEVICES": ["cpu"]}, {"base_bfn": bfn}, progress=False
    )
    for ra, rl in zip(on_ray.records, local.records, strict=True):
        assert ra.key == rl.key and ra.status == rl.status == "ok"
        assert ra.train_loss == rl.train_loss and ra.test_loss == rl.test_loss
