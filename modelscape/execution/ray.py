"""EXECUTOR="ray": each group of jobs is a Ray task, on a cluster or a local Ray instance.

Install with ``pip install 'modelscape[ray]'``. The executor connects to the cluster at
``RAY_ADDRESS`` when that is set, uses the Ray instance this process already started with
``ray.init(...)`` if there is one, and otherwise starts (and afterwards stops) a local instance.

A task asks for one CPU, or, when DEVICES lists CUDA ids, ``1 / WORKERS_PER_DEVICE`` of a GPU
(so WORKERS_PER_DEVICE tasks share a GPU) plus one CPU; Ray decides which machine and GPU each
task uses. On a cluster without GPUs, CUDA ids fall back to the CPU with a one-line notice (a
task asking for a GPU there would wait forever). The sweep is cloudpickled once and shared
through Ray's object store. Records come back to this process, which stays the only writer of
SAVE_DIR; checkpoints are written by the tasks under SAVE_DIR/checkpoints, so resuming a killed
job on another machine needs that folder on a shared filesystem.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from modelscape.engine import Checkpoints
from modelscape.errors import ExecutorError
from modelscape.execution.base import Executor, Records
from modelscape.execution.pickling import Payload
from modelscape.progress import notice
from modelscape.results import JobRecord


def _train_group_task(
    spec_blob: bytes,
    group_blob: bytes,
    use_gpu: bool,
    checkpoints: Checkpoints | None,
    sys_path: list[str],
) -> list[JobRecord]:
    """The body of one Ray task: train a group on the device Ray assigned."""
    # imported in the task: this function travels to Ray's workers by value
    import torch

    from modelscape.engine import train_group
    from modelscape.execution.base import join_sys_path
    from modelscape.execution.pickling import loads

    join_sys_path(sys_path)
    torch.set_num_threads(1)  # the task holds one CPU
    # Ray restricts CUDA_VISIBLE_DEVICES to the task's GPU, so it is always cuda:0 here
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    return list(train_group(loads(group_blob), loads(spec_blob), device, checkpoints))


class RayExecutor(Executor):
    """Train each group as a Ray task; see the module docstring for resources and addresses."""

    def __init__(
        self,
        devices: Sequence[int | str],
        workers_per_device: int = 1,
        checkpoints: Checkpoints | None = None,
    ):
        super().__init__(checkpoints)
        self.devices = list(devices)
        self.use_gpu = any(d != "cpu" for d in devices)
        self.gpu_fraction = 1.0 / workers_per_device

    def placement(self) -> list[str]:
        if self.use_gpu:
            return [f"ray GPU/{round(1 / self.gpu_fraction)} per task"]
        return ["ray CPU"]

    def _run(self, payload: Payload, records: Records) -> None:
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            address = os.environ.get("RAY_ADDRESS") or None
            options: dict[str, Any] = {} if address else {"include_dashboard": False}
            ray.init(address=address, **options)
        pending: dict[Any, int] = {}
        try:
            use_gpu = self.use_gpu and self._cluster_has_gpus(ray)
            task = ray.remote(_train_group_task).options(
                num_cpus=1,
                num_gpus=self.gpu_fraction if use_gpu else 0,
                max_retries=0,  # a job that crashes its worker is recorded as failed, not rerun
            )
            spec_ref = ray.put(payload.spec_blob)
            for gid in range(len(payload.groups)):
                blob = payload.group_blob(gid)
                ref = task.remote(spec_ref, blob, use_gpu, self.checkpoints, list(sys.path))
                pending[ref] = gid
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    gid = pending.pop(ref)
                    try:
                        for record in ray.get(ref):
                            records.add(gid, record)
                    except ray.exceptions.RayError as err:  # the task's worker died, or it raised
                        records.fail_rest(gid, err, "ray")
        finally:
            for ref in pending:  # Ctrl-C or an error: stop what is still queued or running
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    def _cluster_has_gpus(self, ray: Any) -> bool:
        if ray.cluster_resources().get("GPU", 0) > 0:
            return True
        notice(f"CUDA is not available; DEVICES={self.devices} runs on the CPU.")
        return False


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "EXECUTOR='ray' needs Ray: pip install 'modelscape[ray]' (or EXECUTOR='local')."
        ) from None
    return ray
