"""Where jobs run. An executor takes groups of jobs and hands each finished record back.

- ``InProcessExecutor`` trains in the calling process on one device: the debug executor, and
  the default when a sweep has one worker in total.
- ``LocalExecutor`` runs WORKERS_PER_DEVICE long-lived worker processes per entry of DEVICES.
  Workers pull groups from the parent one at a time and stream records back; the parent is the
  only writer of results. A worker that dies has its unfinished jobs recorded as failed and is
  replaced. Ctrl-C stops handing out jobs and shuts every worker down.
- ``RayExecutor`` (EXECUTOR="ray") submits groups as Ray tasks (see ``modelscape.ray_executor``).

Every executor produces the same records: a job's seed and data depend only on its identity,
never on the worker or the order.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, wait

import torch

from modelscape import hparams as H
from modelscape import serialization
from modelscape.checkpoint import Checkpoints
from modelscape.engine import failed_record, resolve_device, train_group
from modelscape.jobs import Job, SweepError
from modelscape.results import JobRecord
from modelscape.sweep import SweepSpec
from modelscape.worker import AUTHKEY_ENV

OnRecord = Callable[[JobRecord], None]


class Executor(ABC):
    """Runs groups of jobs somewhere and calls ``on_record`` in this process for each result."""

    @abstractmethod
    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        """Train every group; return once every job's record has been passed to ``on_record``."""

    def placement(self) -> list[str]:
        """The device of each worker, for the progress bar."""
        return []


class InProcessExecutor(Executor):
    """Train every group in this process, one after another, on ``device``."""

    def __init__(self, device: torch.device, checkpoints: Checkpoints | None = None):
        self.device = device
        self.checkpoints = checkpoints

    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        for group in groups:
            for record in train_group(group, spec, self.device, self.checkpoints):
                on_record(record)

    def placement(self) -> list[str]:
        return [str(self.device)]


class WorkerDied(RuntimeError):
    """A worker process ended (killed, out of memory, crashed) while training a job."""


@dataclass
class _Worker:
    device: str
    proc: subprocess.Popen
    conn: Connection
    ready: bool = False
    gid: int | None = None  # the group in flight
    left: list[Job] = field(default_factory=list)  # its jobs with no record yet


class LocalExecutor(Executor):
    """``workers_per_device`` worker processes for each of ``devices`` (``"cpu"``, ``"cuda:1"``).

    Each worker gets ``threads`` torch threads; the default shares this machine's cores evenly,
    so that workers do not oversubscribe them.
    """

    def __init__(
        self,
        devices: Sequence[str],
        workers_per_device: int = 1,
        checkpoints: Checkpoints | None = None,
        *,
        threads: int | None = None,
    ):
        self.slots = [str(d) for d in devices for _ in range(workers_per_device)]
        self.checkpoints = checkpoints
        self.threads = threads or max(1, available_cores() // len(self.slots))
        self._authkey = secrets.token_bytes(32)
        self._startup_deaths = 0

    def placement(self) -> list[str]:
        return list(self.slots)

    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        # pickle everything before the first worker starts, so that a bad object fails fast
        spec_blob = serialization.dumps(spec, "the sweep's functions and data")
        blobs = [serialization.dumps(list(g), "a job") for g in groups]
        procs = [self._spawn() for _ in self.slots]  # all import torch at the same time
        workers: list[_Worker] = []
        try:
            for proc, device in zip(procs, self.slots):
                workers.append(self._connect(proc, device, spec_blob))
            self._loop(workers, groups, blobs, spec_blob, on_record)
        finally:
            _shutdown(workers)
            for proc in procs[len(workers) :]:
                proc.kill()
                proc.wait()

    def _loop(self, workers, groups, blobs, spec_blob, on_record) -> None:
        pending = deque(range(len(groups)))
        while pending or any(w.gid is not None for w in workers):
            for w in workers:
                if w.ready and w.gid is None and pending:
                    w.gid = pending.popleft()
                    w.left = list(groups[w.gid])
                    w.conn.send((w.gid, blobs[w.gid]))
            by_conn = {w.conn: w for w in workers}
            for conn in wait(list(by_conn)):
                w = by_conn[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._bury(w, on_record)
                    i = workers.index(w)
                    if pending:  # a replacement carries on with the remaining groups
                        workers[i] = self._connect(self._spawn(), w.device, spec_blob)
                    else:
                        del workers[i]
                    continue
                self._handle(w, message, on_record)

    def _handle(self, w: _Worker, message: tuple, on_record: OnRecord) -> None:
        kind = message[0]
        if kind == "ready":
            w.ready = True
            self._startup_deaths = 0
        elif kind == "record":
            record = message[2]
            w.left = [j for j in w.left if j.key != record.key]
            on_record(record)
        elif kind == "group_error":
            for job in w.left:
                on_record(failed_record(job, RuntimeError(message[2]), w.device))
            w.left = []
        elif kind == "done":
            w.gid = None
        elif kind == "fatal":
            raise SweepError(
                f"a worker on {w.device} could not load the sweep's functions:\n{message[1]}"
                "Functions from your own modules must import in a fresh interpreter (the "
                "worker's sys.path is the parent's); define them in the script or notebook "
                "instead to send them by value."
            )

    def _bury(self, w: _Worker, on_record: OnRecord) -> None:
        """Record the unfinished jobs of a worker whose connection broke as failed."""
        try:
            code = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # alive but unreachable: it cannot be used again
            w.proc.kill()
            code = w.proc.wait()
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        for job in w.left:
            err = WorkerDied(
                f"the worker process on {w.device} died ({how}) while training this job: it "
                "was killed (out of memory?) or crashed. RETRY_FAILED=True reruns it."
            )
            on_record(failed_record(job, err, w.device))
        w.gid, w.left = None, []
        if not w.ready:
            self._startup_died(how)
        _close(w)

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env[AUTHKEY_ENV] = self._authkey.hex()
        # native thread pools size themselves at import, before torch.set_num_threads runs
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return subprocess.Popen(
            [sys.executable, "-c", "from modelscape.worker import main; main()"],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            # its own session: Ctrl-C reaches only the parent, which then stops the workers
            start_new_session=True,
        )

    def _connect(self, proc: subprocess.Popen, device: str, spec_blob: bytes) -> _Worker:
        while True:
            address = proc.stdout.readline().strip()  # empty when the worker died at startup
            if address:
                break
            proc.stdout.close()
            self._startup_died(f"exit code {proc.wait()}")
            proc = self._spawn()
        w = _Worker(device=device, proc=proc, conn=Client(address, authkey=self._authkey))
        init = {
            "sys_path": list(sys.path),
            "threads": self.threads,
            "device": device,
            "spec": spec_blob,
            "checkpoints": self.checkpoints,
        }
        w.conn.send(init)
        return w

    def _startup_died(self, how: str) -> None:
        self._startup_deaths += 1
        if self._startup_deaths > 2 * len(self.slots):
            raise SweepError(
                f"worker processes keep dying before they start ({how}); see their errors "
                "above, or train in this process (use_mp=False) to debug."
            )


def _close(w: _Worker) -> None:
    w.conn.close()
    if w.proc.stdout is not None:
        w.proc.stdout.close()


def _shutdown(workers: Sequence[_Worker], grace: float = 5.0) -> None:
    """Stop idle workers politely and busy ones with SIGTERM; leave no process behind."""
    for w in workers:
        if w.gid is not None or not w.ready:
            w.proc.terminate()
            continue
        try:
            w.conn.send(None)
        except OSError:
            w.proc.terminate()
    for w in workers:
        try:
            w.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        _close(w)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask on Linux)."""
    if sys.platform.startswith("linux"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def executor_for(
    hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
) -> Executor:
    """The executor EXECUTOR, DEVICES and WORKERS_PER_DEVICE ask for.

    One worker in total trains in this process, several in worker processes; ``use_mp``
    (the original's flag) forces one or the other.
    """
    if hp.EXECUTOR == "ray":
        from modelscape.ray_executor import RayExecutor

        return RayExecutor(hp.DEVICES, hp.WORKERS_PER_DEVICE, checkpoints)
    if hp.EXECUTOR == "slurm":
        from modelscape.slurm_executor import SlurmExecutor

        return SlurmExecutor(
            hp.SAVE_DIR, hp.SLURM, checkpoints, devices=hp.DEVICES,
            workers_per_device=hp.WORKERS_PER_DEVICE, detach=hp.DETACH,
        )  # fmt: skip
    devices = [_device(d) for d in hp.DEVICES]
    n_workers = len(devices) * hp.WORKERS_PER_DEVICE
    if use_mp is False or (use_mp is None and n_workers == 1):
        return InProcessExecutor(devices[0], checkpoints)
    return LocalExecutor([str(d) for d in devices], hp.WORKERS_PER_DEVICE, checkpoints)


def _device(spec: int | str) -> torch.device:
    device = resolve_device(spec)
    if spec != "cpu" and device.type == "cpu":
        print(
            f"modelscape: CUDA is not available; DEVICES entry {spec} runs on the CPU.",
            file=sys.stderr,
        )
    return device
