"""EXECUTOR="local": ``LocalExecutor`` runs long-lived worker processes on this machine.

WORKERS_PER_DEVICE workers per entry of DEVICES (forks of this process or fresh interpreters,
``starting.py``; each runs ``worker.py``)
pull groups from the parent one at a time and stream records back; the parent is the only
writer of results. A worker that dies, whatever its timing, is replaced; its unfinished jobs
are retried from their checkpoints up to MAX_RETRIES times, a group split in two
(``retries.py``), and JOB_TIMEOUT stops a hung one: a group has JOB_TIMEOUT seconds per
unfinished job until its next record, and one that runs past that is split in two like a dead
worker's, until the job that hangs is alone and fails. Ctrl-C stops handing out jobs and
shuts every worker down. With one worker in total (and no JOB_TIMEOUT), ``from_hparams`` picks
``InProcessExecutor`` instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, wait

import torch

from modelscape.engine import failed_record, resolve_device, why_single
from modelscape.errors import ExecutorError, WorkerDied
from modelscape.execution.base import Executor, Records, local_device
from modelscape.execution.inprocess import InProcessExecutor
from modelscape.execution.pickling import Payload
from modelscape.execution.progress import notice
from modelscape.execution.retries import Retries, exhausted_message, retry_notice, split_in_two
from modelscape.execution.starting import ForkedProcess, fork_unsafe, fork_worker, spawn_worker
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec


@dataclass
class _Worker:
    device: str
    proc: subprocess.Popen | ForkedProcess
    conn: Connection
    ready: bool = False
    gid: int | None = None  # the group in flight
    sent: bool = False  # whether that group reached the worker
    deadline: float = math.inf  # JOB_TIMEOUT for each unfinished job, from the last news


class LocalExecutor(Executor):
    """``workers_per_device`` worker processes for each of ``devices`` (``"cpu"``, ``"cuda:1"``).

    Each worker gets ``threads`` torch threads; the default shares this machine's cores evenly,
    so that workers do not oversubscribe them. Jobs lost to a dead worker are retried up to
    ``max_retries`` times (``retries.py``). With ``job_timeout`` > 0, a group has that
    many seconds for each of its unfinished jobs to produce its next record (a stack of 64 jobs
    of 1 s each may take 64 s); a worker that runs past it is stopped, and its unfinished jobs
    train again split in two (from their checkpoints), until a job that times out alone fails.
    """

    stops_hung_jobs = True
    shares_out_pairs = True

    def __init__(
        self,
        devices: Sequence[int | str],
        workers_per_device: int = 1,
        checkpoints: Checkpoints | None = None,
        *,
        threads: int | None = None,
        max_retries: int = 1,
        job_timeout: float = 0.0,
    ):
        super().__init__(checkpoints)
        self.slots = [str(d) for d in devices for _ in range(workers_per_device)]
        self.threads = threads or max(1, available_cores() // len(self.slots))
        self.job_timeout = job_timeout
        self._retries = Retries(max_retries)
        self._authkey = secrets.token_bytes(32)
        self._startup_deaths = 0
        #: how workers start: "fork" or "fresh" (``starting.py``), and why not fork
        self.fresh_reason = fork_unsafe(self.slots, self.threads)
        self.start_method = "fresh" if self.fresh_reason else "fork"
        self.inherits_spec = self.start_method == "fork"
        self._spec: SweepSpec | None = None  # what forked workers inherit
        self._parent_fds: set[int] = set()  # our ends of the workers' pipes and connections

    @classmethod
    def from_hparams(
        cls, hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
    ) -> Executor:
        devices = [local_device(d) for d in hp.DEVICES]
        per_device = hp.WORKERS_PER_DEVICE
        n_workers = len(devices) * per_device
        if use_mp is False and hp.JOB_TIMEOUT > 0:
            raise ExecutorError(
                f"JOB_TIMEOUT={hp.JOB_TIMEOUT:g} can stop a hung job only on a worker process, "
                "but use_mp=False trains in this process: drop use_mp=False, or set "
                "JOB_TIMEOUT=0."
            )
        # a job that hangs in this process could not be stopped: JOB_TIMEOUT asks for a worker
        if use_mp is False or (use_mp is None and n_workers == 1 and hp.JOB_TIMEOUT <= 0):
            return InProcessExecutor(devices[0], checkpoints)
        return cls(
            [str(d) for d in devices],
            per_device,
            checkpoints,
            max_retries=hp.MAX_RETRIES,
            job_timeout=hp.JOB_TIMEOUT,
        )

    def placement(self) -> list[str]:
        return list(self.slots)

    def _run(self, payload: Payload, records: Records) -> None:
        self._spec = payload.spec
        procs = [self._spawn() for _ in self.slots]  # all import torch at the same time
        workers: list[_Worker] = []
        try:
            for proc, device in zip(procs, self.slots):
                workers.append(self._connect(proc, device, payload.spec_blob))
            self._loop(workers, payload, records)
        finally:
            _shutdown(workers)
            self._parent_fds.clear()
            for proc in procs[len(workers) :]:
                proc.kill()
                proc.wait()

    def _loop(self, workers: list[_Worker], payload: Payload, records: Records) -> None:
        pending = deque(range(len(payload.groups)))
        while pending or any(w.gid is not None for w in workers):
            for w in list(workers):
                if w.ready and w.gid is None and pending:
                    self._assign(w, pending.popleft(), payload)
                    if not w.sent:  # it died after its last group, before this one
                        self._lost(w, workers, pending, payload, records)
            by_conn = {w.conn: w for w in workers}
            for conn in wait(list(by_conn), timeout=self._wait_limit(workers)):
                w = by_conn[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._lost(w, workers, pending, payload, records)
                    continue
                self._handle(w, message, payload, records)
            self._stop_overdue(workers, pending, payload, records)

    def _assign(self, w: _Worker, gid: int, payload: Payload) -> None:
        w.gid = gid
        self._extend_deadline(w, len(payload.groups[gid]))
        try:
            w.conn.send((gid, payload.group_blob(gid)))
            w.sent = True
        except OSError:
            w.sent = False

    def _extend_deadline(self, w: _Worker, unfinished: int) -> None:
        """JOB_TIMEOUT from now for each unfinished job of the worker's group: a stack trains
        its jobs together, so its first record may come only after all of them are done."""
        if self.job_timeout > 0:
            w.deadline = time.monotonic() + self.job_timeout * max(1, unfinished)

    def _handle(self, w: _Worker, message: tuple, payload: Payload, records: Records) -> None:
        kind = message[0]
        if kind == "ready":
            w.ready = True
            self._startup_deaths = 0
        elif kind == "record":
            records.add(message[1], message[2])
            self._extend_deadline(w, len(records.left(message[1])))
        elif kind == "group_error":
            records.fail_rest(message[1], RuntimeError(message[2]), w.device)
        elif kind == "done":
            w.gid = None
        elif kind == "fatal":
            raise ExecutorError(
                f"a worker on {w.device} could not load the sweep's functions:\n{message[1]}"
                "Functions from your own modules must import in a fresh interpreter (the "
                "worker's sys.path is the parent's); define them in the script or notebook "
                "instead to send them by value."
            )

    def _lost(self, w: _Worker, workers, pending: deque, payload: Payload, records) -> None:
        """A worker's connection broke: retry or fail its unfinished jobs, and replace it."""
        how = _ended(w.proc)
        if w.gid is not None and not w.sent:  # the group never reached it: not a retry
            pending.appendleft(w.gid)
        elif w.gid is not None:
            self._retry(w, how, pending, payload, records)
        w.gid = None
        if not w.ready:
            self._startup_died(how)
        self._close(w)
        self._replace(w, workers, pending, payload)

    def _retry(self, w: _Worker, how: str, pending: deque, payload: Payload, records) -> None:
        again, exhausted = self._retries.after_death(records.left(w.gid))
        for job in exhausted:
            deaths = self._retries.count(job)
            message = exhausted_message(w.device, how, deaths, self._retries.max_retries)
            records.add(w.gid, failed_record(job, WorkerDied(message), w.device))
        if again:
            attempt = max(self._retries.count(job) for group in again for job in group)
            notice(retry_notice(w.device, how, again, attempt, self._retries.max_retries))
            # the payload and the records number groups alike: both append the new ones
            gids = [payload.add_group(g) for g in again]
            for group in again:
                records.regroup(w.gid, group)
            pending.extendleft(reversed(gids))

    def _replace(self, w: _Worker, workers, pending: deque, payload: Payload) -> None:
        i = workers.index(w)
        if pending:  # a replacement carries on with the remaining groups
            workers[i] = self._connect(self._spawn(), w.device, payload.spec_blob)
        else:
            del workers[i]

    def _wait_limit(self, workers: Sequence[_Worker]) -> float | None:
        """Seconds until the first busy worker runs past its deadline (None: no limit)."""
        busy = [w.deadline for w in workers if w.gid is not None and w.sent]
        if self.job_timeout <= 0 or not busy:
            return None
        return max(0.0, min(busy) - time.monotonic())

    def _stop_overdue(self, workers, pending: deque, payload: Payload, records) -> None:
        if self.job_timeout <= 0:
            return
        now = time.monotonic()
        for w in list(workers):
            if w.gid is None or not w.sent or now < w.deadline:
                continue
            w.proc.kill()
            w.proc.wait()
            left = records.left(w.gid)
            if len(left) > 1:  # which job hangs is not known: split, as after a death
                halves = split_in_two(left)
                notice(
                    f"the worker on {w.device} ran past JOB_TIMEOUT={self.job_timeout:g} s per "
                    f"job with {len(left)} unfinished jobs; it was stopped, and they train again "
                    f"from their checkpoints in groups of {len(halves[0])} and {len(halves[1])}."
                )
                gids = [payload.add_group(g) for g in halves]
                for group in halves:
                    records.regroup(w.gid, group)
                pending.extendleft(reversed(gids))
            else:
                err = JobTimedOut(
                    f"JOB_TIMEOUT={self.job_timeout:g} s passed without this job finishing on "
                    f"the worker on {w.device}, so the worker was stopped; raise JOB_TIMEOUT if "
                    "the job is only slow, or find where the batch function, the model or a "
                    "grab hangs."
                )
                records.fail_rest(w.gid, err, w.device)
            w.gid = None
            self._close(w)
            self._replace(w, workers, pending, payload)

    def _spawn(self) -> subprocess.Popen | ForkedProcess:
        if self.start_method == "fork":
            proc = fork_worker(self._authkey, self._spec, close=self._parent_fds)
        else:
            proc = spawn_worker(self._authkey, self.threads)
        self._parent_fds.add(proc.stdout.fileno())
        return proc

    def _connect(
        self, proc: subprocess.Popen | ForkedProcess, device: str, spec_blob: bytes
    ) -> _Worker:
        init = {
            "sys_path": list(sys.path),
            "threads": self.threads,
            "device": device,
            "spec": spec_blob,
            "checkpoints": self.checkpoints,
        }
        while True:
            address = proc.stdout.readline().strip()  # empty when the worker died at startup
            if address:
                try:
                    conn = Client(address, authkey=self._authkey)
                    self._parent_fds.add(conn.fileno())
                    conn.send(init)
                    return _Worker(device=device, proc=proc, conn=conn)
                except (OSError, EOFError):  # it died between printing its address and now
                    proc.kill()
            self._parent_fds.discard(proc.stdout.fileno())
            proc.stdout.close()
            self._startup_died(_ended(proc))
            proc = self._spawn()

    def _close(self, w: _Worker) -> None:
        self._parent_fds.difference_update((w.conn.fileno(), w.proc.stdout.fileno()))
        _close(w)

    def _startup_died(self, how: str) -> None:
        self._startup_deaths += 1
        if self._startup_deaths > 2 * len(self.slots):
            raise ExecutorError(
                f"worker processes keep dying before they start ({how}); see their errors "
                "above, or train in this process (use_mp=False) to debug."
            )


class JobTimedOut(RuntimeError):
    """A job ran longer than JOB_TIMEOUT on a worker process, which was stopped."""


def _ended(proc: subprocess.Popen) -> str:
    """How a worker process ended (killing it if it is alive but unreachable)."""
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"


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


def one_at_a_time(group: Sequence[Job], hp: H.HParams, spec: SweepSpec) -> bool:
    """Whether ``group`` trains one job at a time (``engine.why_single``) on DEVICES."""
    if hp.BATCHED == "on":
        return False  # stacked, or an error that names why not when it trains
    devices = {resolve_device(d).type for d in hp.DEVICES}
    device = torch.device("cpu") if devices == {"cpu"} else None
    return why_single(group, device, spec) is not None


def workers_per_device(hp: H.HParams, groups: Sequence[Sequence[Job]], spec: SweepSpec) -> int:
    """WORKERS_PER_DEVICE, or where it is "auto" the number this sweep trains fastest with.

    One, except on this machine's CPU (EXECUTOR="local", DEVICES CPU only) when every group
    trains one job at a time (convolutional models, BATCHED="off", optimizers without a stacked
    version) and there are at least as many jobs as cores: then one worker per core, one torch
    thread each. Small models use two cores better as two jobs than as one job's two threads
    (``bench_models.py``, the one-at-a-time cases on 2 cores: 1.2-1.5x sooner,
    benchmarks/NOTES.md), and a forked worker starts in milliseconds (``starting.py``). A
    stack's products already use every thread, so stacks keep one worker, in this process.
    Where workers would start as fresh interpreters (1.3 s each), or with fewer jobs than cores
    (a worker would get several threads, which rules out a fork), one it is.
    """
    if hp.WORKERS_PER_DEVICE != "auto":
        return hp.WORKERS_PER_DEVICE
    jobs = sum(len(g) for g in groups)
    cores = available_cores()
    if hp.EXECUTOR != "local" or cores < 2 or jobs < cores or fork_unsafe(["cpu"], 1):
        return 1
    if any(resolve_device(d).type != "cpu" for d in hp.DEVICES):
        return 1
    if not all(one_at_a_time(g, hp, spec) for g in groups):
        return 1
    return max(1, cores // len(hp.DEVICES))


def workers_hint(hp: H.HParams, groups: Sequence[Sequence[Job]], spec: SweepSpec) -> str | None:
    """What to say when WORKERS_PER_DEVICE=1 trained, in this process, a sweep that "auto"
    would spread over one-thread workers (None when there is nothing to say)."""
    if hp.WORKERS_PER_DEVICE != 1 or len(hp.DEVICES) != 1 or hp.JOB_TIMEOUT > 0:
        return None
    workers = workers_per_device(dataclasses.replace(hp, WORKERS_PER_DEVICE="auto"), groups, spec)
    if workers < 2:
        return None
    jobs = sum(len(g) for g in groups)
    return (
        f"{jobs} jobs trained one at a time in this process; WORKERS_PER_DEVICE='auto' would "
        f"train {workers} at a time on this CPU's {workers} cores (one thread each), usually "
        "1.2-1.5x sooner for small models (docs/running-sweeps.md)."
    )
