"""The failure boundary: which exceptions fail one job, and which stop the sweep.

``failure_boundary`` is the one place an exception raised while a job sets up, trains or
evaluates becomes that job's failed record (``failed_record``: its message, traceback and step),
so that one job never sinks the sweep; ``failure_of`` classifies an exception for the places
that fail several jobs at once (a stack, a group).

``SystemExit`` or ``KeyboardInterrupt`` raised by a batch function, a model or a grab (a stray
``sys.exit()``, an ``input()`` interrupted in a notebook) ends only that job, as a failed
record. A Ctrl-C from the terminal still stops the whole sweep: while a sweep trains in this
process, ``terminal_interrupts()`` notes that the SIGINT arrived, and ``stops_the_sweep`` asks
(it also lets through an exit raised by a signal handler, such as a SLURM requeue's).
Worker processes run in their own session, so a KeyboardInterrupt there is always user code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from collections.abc import Callable, Iterator

import numpy as np
import torch

from modelscape.results.records import JobRecord
from modelscape.sweep.jobs import Job

_TERMINAL = threading.Event()  # a SIGINT arrived while a sweep trained in this process
_WATCHING = threading.Event()  # terminal_interrupts() is noting SIGINTs
_IN_WORKER = threading.Event()  # this is a worker process, which no terminal reaches


class UserCodeExit(RuntimeError):
    """``SystemExit`` or ``KeyboardInterrupt`` raised inside user code while a job trained."""

    @classmethod
    def of(cls, err: BaseException) -> UserCodeExit:
        return cls(
            f"{type(err).__name__}({', '.join(repr(a) for a in err.args)}) was raised inside "
            "your code (the batch function, the model or a grab); it ends this job only. "
            "Raise an exception instead of calling sys.exit() in code a sweep runs."
        )


def mark_worker_process() -> None:
    """Called once by a worker process: every exit raised there comes from user code."""
    _IN_WORKER.set()


@contextlib.contextmanager
def terminal_interrupts() -> Iterator[None]:
    """Note a SIGINT that arrives while the block runs (in the main thread, default handler)."""
    default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if threading.current_thread() is not threading.main_thread() or not default:
        yield
        return
    _TERMINAL.clear()

    def on_sigint(signum: int, frame: object) -> None:
        _TERMINAL.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    _WATCHING.set()
    try:
        yield
    finally:
        _WATCHING.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stops_the_sweep(err: BaseException) -> bool:
    """Whether ``err`` must stop the sweep (True) rather than fail one job as user code's exit.

    It stops the sweep when a signal handler raised it: the terminal's Ctrl-C, or a scheduler's
    notice (submitit's handler for a SLURM timeout or preemption requeues the task and then
    calls ``sys.exit``, which must end the process, not the job).
    """
    if _raised_by_signal_handler(err):
        return True
    if not isinstance(err, KeyboardInterrupt) or _IN_WORKER.is_set():
        return False
    # unwatched (a custom SIGINT handler, a thread): stop the sweep, as a Ctrl-C would
    return _TERMINAL.is_set() if _WATCHING.is_set() else True


def _raised_by_signal_handler(err: BaseException) -> bool:
    """Whether a Python signal handler installed in this process is on ``err``'s traceback."""
    handlers = set()
    for number in signal.valid_signals():
        try:
            handler = signal.getsignal(number)
        except (OSError, ValueError):
            continue
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is not None:
            handlers.add(code)
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        tb = tb.tb_next
    return False


def failed_record(
    job: Job,
    err: BaseException,
    device: torch.device | str,
    trained_by: str = "",
    step: int | None = None,
) -> JobRecord:
    """The record of a job that raised: its message, traceback and the step it failed at.

    ``steps`` counts the steps trained before the failure (``step``; 0 when unknown).
    """
    where = "" if step is None else f" (at step {step})"
    return JobRecord(
        key=job.key,
        seed=job.seed,
        status="failed",
        device=str(device),
        timekeys=np.full(len(job.hp.LOSS_CHECKPOINTS), np.nan),
        steps=0 if step is None else step,
        error=f"{type(err).__name__}: {err}{where}",
        traceback="".join(traceback.format_exception(err)),
        trained_by=trained_by,
    )


def failure_of(err: BaseException) -> Exception:
    """What a failed record keeps of ``err``, raised while a job ran: the exception itself, or
    ``UserCodeExit`` for an exit raised in user code. Re-raises ``err`` when it must stop the
    sweep instead (a Ctrl-C from the terminal, a scheduler's exit, anything else that is not an
    ``Exception``)."""
    if isinstance(err, (SystemExit, KeyboardInterrupt)) and not stops_the_sweep(err):
        return UserCodeExit.of(err)
    if isinstance(err, Exception):
        return err
    raise err


class Failed:
    """What ``failure_boundary`` yields: ``record`` is the job's failed record once the block
    raised, else None."""

    record: JobRecord | None = None


@contextlib.contextmanager
def failure_boundary(
    job: Job,
    device: torch.device | str,
    trained_by: str = "",
    step: Callable[[], int | None] = lambda: None,
    passes: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> Iterator[Failed]:
    """Run a block for ``job``: an exception it raises becomes the job's failed record, at the
    step ``step()`` returns, and the block's caller goes on with the next job.

    ``passes``: exceptions a caller handles itself (the stacked engine splits a stack that ran
    out of memory). What must stop the sweep (``failure_of``) always propagates.
    """
    failed = Failed()
    try:
        yield failed
    except passes:
        raise
    except BaseException as err:  # noqa: BLE001 - isolation: one job never sinks the sweep
        failed.record = failed_record(job, failure_of(err), device, trained_by, step())
