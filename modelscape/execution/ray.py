"""EXECUTOR="ray": groups of jobs as Ray tasks, on a Ray cluster or a local Ray instance.

Install with ``pip install 'modelscape-sweeps[ray]'``. The executor connects to the cluster at the
``RAY_ADDRESS`` hyperparameter, else at the ``RAY_ADDRESS`` environment variable, else uses the
Ray instance this process already started with ``ray.init(...)``; with none of these it starts a
local instance and stops it (and every helper process Ray started) when the sweep ends.

- **Sized to the cluster.** The runner splits groups until there is one per free CPU of the
  cluster, or, when DEVICES lists CUDA ids and the cluster has GPUs, one per
  ``GPU x WORKERS_PER_DEVICE`` (a task then asks for ``1 / WORKERS_PER_DEVICE`` of a GPU and one
  CPU). On a cluster without GPUs, CUDA ids fall back to the CPU with a one-line notice (a task
  asking for a GPU there would wait forever).
- **Records stream back per job.** Each task hands every finished job's record to an inbox actor
  on this process's node as soon as the job ends, so a worker or node that dies costs only the
  jobs it had not finished.
- **Lost tasks are retried** (MAX_RETRIES times): the retry skips the jobs whose record the inbox
  already holds and continues the others from their checkpoints. A task that still fails has its
  unfinished jobs recorded as failed.

Each record's ``device`` says where the job ran (``"cpu on ray node <node id>"``). Records come
back to this process, which stays the only writer of SAVE_DIR; checkpoints are written by the
tasks under SAVE_DIR/checkpoints, so resuming a job on another machine needs that folder on a
shared file system.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from modelscape.errors import ExecutorError
from modelscape.execution.base import Executor, Records
from modelscape.execution.pickling import Payload
from modelscape.execution.progress import notice
from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep import hparams as H

POLL_SECONDS = 0.5  # how often the inbox is emptied while tasks run


class _Inbox:
    """A Ray actor (on the driver's node) that holds records until the driver takes them.

    A job's record is accepted once: a retried task asks ``done`` which jobs to skip.
    """

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._new: list[tuple[int, JobRecord]] = []

    def put(self, gid: int, kid: str, record: JobRecord) -> None:
        if kid not in self._done:
            self._done.add(kid)
            self._new.append((gid, record))

    def done(self, kids: list[str]) -> list[str]:
        return [k for k in kids if k in self._done]

    def take(self) -> list[tuple[int, JobRecord]]:
        new, self._new = self._new, []
        return new


def _train_group_task(
    spec_blob: bytes,
    group_blob: bytes,
    gid: int,
    inbox: Any,
    use_gpu: bool,
    checkpoints: Checkpoints | None,
    sys_path: list[str],
) -> int:
    """The body of one Ray task: train the jobs of a group that have no record yet, handing
    each record to ``inbox`` as it is made. Returns how many jobs it trained."""
    # imported in the task: this function travels to Ray's workers by value
    import ray
    import torch

    from modelscape.engine import train_group
    from modelscape.execution.base import join_sys_path
    from modelscape.execution.pickling import loads
    from modelscape.store import key_id

    join_sys_path(sys_path)
    torch.set_num_threads(1)  # the task holds one CPU
    # Ray restricts CUDA_VISIBLE_DEVICES to the task's GPU, so it is always cuda:0 here
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    node = ray.get_runtime_context().get_node_id()
    jobs = loads(group_blob)
    done = set(ray.get(inbox.done.remote([key_id(j.key) for j in jobs])))
    todo = [j for j in jobs if key_id(j.key) not in done]
    for record in train_group(todo, loads(spec_blob), device, checkpoints):
        record = dataclasses.replace(record, device=f"{record.device} on ray node {node}")
        # waited for, so that a record is safe in the inbox before the next job starts
        ray.get(inbox.put.remote(gid, key_id(record.key), record))
    return len(todo)


class RayExecutor(Executor):
    """Train groups as Ray tasks; see the module docstring for addresses, sizes and retries."""

    def __init__(
        self,
        devices: Sequence[int | str],
        workers_per_device: int = 1,
        checkpoints: Checkpoints | None = None,
        *,
        address: str | None = None,
        max_retries: int = 1,
    ):
        super().__init__(checkpoints)
        self.devices = list(devices)
        self.workers_per_device = workers_per_device
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.max_retries = max_retries
        self._use_gpu: bool | None = None  # known once connected
        self._started_here = False

    @classmethod
    def from_hparams(
        cls, hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
    ) -> RayExecutor:
        return cls(
            hp.DEVICES, hp.WORKERS_PER_DEVICE, checkpoints,
            address=hp.RAY_ADDRESS, max_retries=hp.MAX_RETRIES,
        )  # fmt: skip

    def placement(self) -> list[str]:
        """One slot per task the cluster can run at once (free CPUs, or GPUs x workers)."""
        ray = self._connect()
        if self._use_gpu:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            return [f"ray GPU/{self.workers_per_device}"] * (gpus * self.workers_per_device)
        return ["ray CPU"] * max(1, int(ray.available_resources().get("CPU", 0)))

    def _run(self, payload: Payload, records: Records) -> None:
        ray = self._connect()
        try:
            with _inbox_actor(ray) as inbox:
                self._train(ray, payload, records, inbox)
        finally:
            if self._started_here:
                ray.shutdown()
                self._started_here = False

    def _train(self, ray: Any, payload: Payload, records: Records, inbox: Any) -> None:
        task = ray.remote(_train_group_task).options(
            num_cpus=1,
            num_gpus=1 / self.workers_per_device if self._use_gpu else 0,
            max_retries=self.max_retries,  # a worker or node that died; not a Python error
            retry_exceptions=False,
        )
        spec_ref = ray.put(payload.spec_blob)
        pending: dict[Any, int] = {}
        for gid in range(len(payload.groups)):
            ref = task.remote(
                spec_ref, payload.group_blob(gid), gid, inbox, self._use_gpu, self.checkpoints,
                list(sys.path),
            )  # fmt: skip
            pending[ref] = gid
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                # every record of a finished task is in the inbox before the task returns
                for gid, record in ray.get(inbox.take.remote()):
                    records.add(gid, record)
                for ref in done:
                    gid = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as err:  # retries spent, or it raised
                        records.fail_rest(gid, err, "ray")
        finally:
            for ref in pending:  # Ctrl-C or an error: stop what is still queued or running
                ray.cancel(ref, force=True)

    def _connect(self) -> Any:
        """Ray, connected (on first use) as the module docstring says."""
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:  # "local": never attach to some other cluster running on this machine
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
                self._started_here = True
        if self._use_gpu is None:
            self._use_gpu = any(d != "cpu" for d in self.devices) and self._cluster_has_gpus(ray)
        return ray

    def _cluster_has_gpus(self, ray: Any) -> bool:
        if ray.cluster_resources().get("GPU", 0) > 0:
            return True
        notice(f"CUDA is not available; DEVICES={self.devices} runs on the CPU.")
        return False


@contextmanager
def _inbox_actor(ray: Any) -> Iterator[Any]:
    """An ``_Inbox`` actor on this process's node (a dead worker node cannot take it along)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    inbox = ray.remote(_Inbox).options(num_cpus=0, scheduling_strategy=here).remote()
    try:
        yield inbox
    finally:
        ray.kill(inbox)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "EXECUTOR='ray' needs Ray: pip install 'modelscape-sweeps[ray]' (or EXECUTOR='local')."
        ) from None
    return ray
