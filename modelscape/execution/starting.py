"""How ``LocalExecutor`` starts a worker process: a fork of this process or a fresh interpreter.

A fresh interpreter imports torch and the sweep's modules anew, about 1.3 s a worker, which is a
quarter of a short CPU sweep. A fork starts in milliseconds with them already imported, so on a
CPU the jobs can be spread over one-thread workers at no startup cost (small models use two
cores better as two jobs than as one job's two threads). Forking is safe only where the child
needs nothing a fork cannot carry, so ``fork_unsafe`` lists the cases that start fresh instead:

- not Linux (macOS system libraries are not fork-safe, Windows has no fork);
- more than one torch thread per worker: GNU OpenMP's thread pool, which torch's CPU builds
  use, does not survive a fork, and a child that starts a parallel region after its parent
  used one hangs (seen: a fused SGD step with 2 threads). With one thread torch, oneDNN and
  MKL run inline and never enter a parallel region;
- a worker on a GPU, or CUDA already initialized here (a forked child cannot use CUDA);
- MODELSCAPE_WORKER_START=fresh in the environment (the escape hatch, for a parent whose own
  threads hold locks a child would need).

Either way the worker runs ``worker.main`` and speaks the same protocol: it prints its address
on its stdout (a pipe the parent reads), then serves the sweep over an authenticated
connection. A forked worker inherits the sweep's spec as it is; a fresh one receives it
cloudpickled (``pickling.Payload``), so only a fresh one needs the sweep's objects to pickle.
The job groups travel pickled to both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

START_ENV = "MODELSCAPE_WORKER_START"
#: what ``ps``, ``top`` and /proc/<pid>/comm call a forked worker (its command line is the
#: parent's); a fresh worker's command line names ``modelscape.execution.worker``
WORKER_NAME = "modelscape-wkr"


def fork_unsafe(devices: Sequence[str], threads: int) -> str | None:
    """Why workers on ``devices`` with ``threads`` torch threads each must start as fresh
    interpreters; None when a fork is safe."""
    if os.environ.get(START_ENV, "") == "fresh":
        return f"{START_ENV}=fresh"
    if not sys.platform.startswith("linux"):
        return f"fork is not safe on {sys.platform}"
    if threads != 1:
        return f"workers use {threads} torch threads (OpenMP's pool does not survive a fork)"
    if any(not d.startswith("cpu") for d in devices):
        return "a worker uses a GPU"
    import torch

    if torch.cuda.is_initialized():
        return "CUDA is initialized in this process"
    return None


class ForkedProcess:
    """A forked worker, with the parts of ``subprocess.Popen`` the executor uses."""

    def __init__(self, pid: int, stdout_fd: int):
        self.pid = pid
        self.stdout = os.fdopen(stdout_fd, "r")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (minus the signal number if a signal ended it), as ``Popen.wait``."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def fork_worker(authkey: bytes, spec: Any, close: Iterable[int] = ()) -> ForkedProcess:
    """A worker forked from this process, serving the sweep ``spec`` it inherits (its torch
    threads come with the sweep's settings); ``close``: file descriptors of other workers'
    connections, which the child must not hold open (a worker notices its parent's end closing
    only when no other process holds a copy)."""
    # torch's optimizers import TorchDynamo when the first is built (1.1 s): once here, not in
    # every worker, and the workers of later sweeps start warm
    import torch._dynamo  # noqa: F401

    read_fd, write_fd = os.pipe()
    close = list(close)
    with warnings.catch_warnings():
        # Python 3.12+ warns when a process with threads forks: torch's idle thread pool and a
        # progress bar's monitor are threads here. The child runs only the worker below, which
        # takes no lock those threads hold, with one torch thread of its own.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        os.close(write_fd)
        return ForkedProcess(pid, read_fd)
    code = 1
    try:
        os.setsid()  # Ctrl-C reaches only the parent, which then stops the workers
        _name_process(WORKER_NAME)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(read_fd)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        os.dup2(write_fd, 1)
        os.close(write_fd)
        # the parent's stream objects may be a notebook's or a test runner's: write to the fds
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        from modelscape.execution.worker import main  # sets its torch threads from init

        main(authkey, spec)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _name_process(name: str) -> None:
    """Set this process's name (Linux ``prctl(PR_SET_NAME)``, 15 bytes at most)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass  # a name for people reading ps; training does not depend on it


def spawn_worker(authkey: bytes, threads: int) -> subprocess.Popen:
    """A worker in a fresh interpreter, with ``threads`` torch threads."""
    from modelscape.execution.worker import AUTHKEY_ENV

    env = dict(os.environ)
    env[AUTHKEY_ENV] = authkey.hex()
    # native thread pools size themselves at import, before torch.set_num_threads runs
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-c", "from modelscape.execution.worker import main; main()"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        # its own session: Ctrl-C reaches only the parent, which then stops the workers
        start_new_session=True,
    )
