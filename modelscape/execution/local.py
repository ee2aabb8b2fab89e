"""EXECUTOR="local": ``LocalExecutor`` runs long-lived worker processes on this machine.

WORKERS_PER_DEVICE workers per entry of DEVICES (each a fresh interpreter, see ``worker.py``)
pull groups from the parent one at a time and stream records back; the parent is the only
writer of results. A worker that dies has its unfinished jobs recorded as failed and is
replaced. Ctrl-C stops handing out jobs and shuts every worker down. With one worker in total,
``from_hparams`` picks ``InProcessExecutor`` instead.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, wait

from modelscape import hparams as H
from modelscape.engine import Checkpoints
from modelscape.errors import ExecutorError, WorkerDied
from modelscape.execution.base import Executor, Records, local_device
from modelscape.execution.inprocess import InProcessExecutor
from modelscape.execution.pickling import Payload
from modelscape.execution.worker import AUTHKEY_ENV


@dataclass
class _Worker:
    device: str
    proc: subprocess.Popen
    conn: Connection
    ready: bool = False
    gid: int | None = None  # the group in flight


class LocalExecutor(Executor):
    """``workers_per_device`` worker processes for each of ``devices`` (``"cpu"``, ``"cuda:1"``).

    Each worker gets ``threads`` torch threads; the default shares this machine's cores evenly,
    so that workers do not oversubscribe them.
    """

    def __init__(
        self,
        devices: Sequence[int | str],
        workers_per_device: int = 1,
        checkpoints: Checkpoints | None = None,
        *,
        threads: int | None = None,
    ):
        super().__init__(checkpoints)
        self.slots = [str(d) for d in devices for _ in range(workers_per_device)]
        self.threads = threads or max(1, available_cores() // len(self.slots))
        self._authkey = secrets.token_bytes(32)
        self._startup_deaths = 0

    @classmethod
    def from_hparams(
        cls, hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
    ) -> Executor:
        devices = [local_device(d) for d in hp.DEVICES]
        n_workers = len(devices) * hp.WORKERS_PER_DEVICE
        if use_mp is False or (use_mp is None and n_workers == 1):
            return InProcessExecutor(devices[0], checkpoints)
        return cls([str(d) for d in devices], hp.WORKERS_PER_DEVICE, checkpoints)

    def placement(self) -> list[str]:
        return list(self.slots)

    def _run(self, payload: Payload, records: Records) -> None:
        procs = [self._spawn() for _ in self.slots]  # all import torch at the same time
        workers: list[_Worker] = []
        try:
            for proc, device in zip(procs, self.slots):
                workers.append(self._connect(proc, device, payload.spec_blob))
            self._loop(workers, payload, records)
        finally:
            _shutdown(workers)
            for proc in procs[len(workers) :]:
                proc.kill()
                proc.wait()

    def _loop(self, workers: list[_Worker], payload: Payload, records: Records) -> None:
        pending = deque(range(len(payload.groups)))
        while pending or any(w.gid is not None for w in workers):
            for w in workers:
                if w.ready and w.gid is None and pending:
                    w.gid = pending.popleft()
                    w.conn.send((w.gid, payload.group_blob(w.gid)))
            by_conn = {w.conn: w for w in workers}
            for conn in wait(list(by_conn)):
                w = by_conn[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._bury(w, records)
                    i = workers.index(w)
                    if pending:  # a replacement carries on with the remaining groups
                        workers[i] = self._connect(self._spawn(), w.device, payload.spec_blob)
                    else:
                        del workers[i]
                    continue
                self._handle(w, message, records)

    def _handle(self, w: _Worker, message: tuple, records: Records) -> None:
        kind = message[0]
        if kind == "ready":
            w.ready = True
            self._startup_deaths = 0
        elif kind == "record":
            records.add(message[1], message[2])
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

    def _bury(self, w: _Worker, records: Records) -> None:
        """Record the unfinished jobs of a worker whose connection broke as failed."""
        try:
            code = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # alive but unreachable: it cannot be used again
            w.proc.kill()
            code = w.proc.wait()
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        if w.gid is not None:
            err = WorkerDied(
                f"the worker process on {w.device} died ({how}) while training this job: it "
                "was killed (out of memory?) or crashed. RETRY_FAILED=True reruns it."
            )
            records.fail_rest(w.gid, err, w.device)
        w.gid = None
        if not w.ready:
            self._startup_died(how)
        _close(w)

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env[AUTHKEY_ENV] = self._authkey.hex()
        # native thread pools size themselves at import, before torch.set_num_threads runs
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return subprocess.Popen(
            [sys.executable, "-c", "from modelscape.execution.worker import main; main()"],
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
            raise ExecutorError(
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
