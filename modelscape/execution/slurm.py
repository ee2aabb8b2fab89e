"""EXECUTOR="slurm": each group of jobs is one task of a SLURM job array, submitted by submitit.

Install with ``pip install 'modelscape-sweeps[slurm]'`` and run from a machine that can ``sbatch``
(a login node). ``SLURM`` takes submitit's own parameter names (``timeout_min``,
``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ...; submitit's defaults,
such as ``timeout_min=5``, apply to the rest). A task trains on its GPU when SLURM gave it one
and DEVICES lists CUDA ids, else on the CPU with ``SLURM_CPUS_PER_TASK`` threads.

The run folder (SAVE_DIR, on a file system every node shares) is where the tasks and this
process meet; nothing else connects them:

- ``slurm/sweep-<digest>.pkl``: the sweep's functions and data, cloudpickled once;
- ``slurm/tasks.json``: the SLURM id and job list of every task whose jobs are not all stored;
- ``slurm/records/``: one file per finished job, written atomically by its task. This process
  (the only SQLite writer) stores each one and empties the file, which stays as a marker so that
  a requeued task skips the jobs it already finished;
- ``slurm/submitit/``: submitit's pickles and each task's stdout and stderr;
- ``checkpoints/``: job checkpoints, which a requeued task resumes from.

The tasks do not need this process: if it dies, rerunning the same sweep stores what they wrote,
watches the tasks still queued or running and submits only the jobs no task holds. With DETACH it
submits and returns; ``modelscape show SAVE_DIR`` or a rerun collects. A task preempted or timed
out is requeued by submitit and continues from its checkpoints; a task that ends otherwise has
its unfinished jobs recorded as failed, with SLURM's state and the end of its stderr.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelscape.engine import failed_record, train_group
from modelscape.errors import ExecutorError, HParamError, StoreError
from modelscape.execution.base import Executor, Records, join_sys_path
from modelscape.execution.pickling import Payload, dumps, loads
from modelscape.results.records import JobRecord
from modelscape.store import RunStore, key_id
from modelscape.store.checkpoints import Checkpoints
from modelscape.store.files import write_atomic
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import Job

SLURM_DIR = "slurm"
TASKS_FILE = "tasks.json"
RECORDS_DIR = "records"
SUBMITIT_DIR = "submitit"
POLL_SECONDS = 1.0  # how often the record files are listed
STATE_SECONDS = 5.0  # how often squeue is asked about the tasks
# SLURM states after which a task never runs again (a preempted or timed-out task that submitit
# requeues shows as PENDING or REQUEUED instead)
ENDED = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
)  # fmt: skip


class SlurmTaskFailed(RuntimeError):
    """A SLURM array task ended (cancelled, crashed, out of time) before a job finished."""


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ExecutorError(
            "EXECUTOR='slurm' needs submitit: pip install 'modelscape-sweeps[slurm]'."
        ) from None
    return submitit


def parameter_names() -> list[str]:
    """The names ``SLURM`` accepts: submitit's, as its ``AutoExecutor`` spells them."""
    submitit = _submitit()
    generic = set(submitit.AutoExecutor._valid_parameters())
    specific = {f"slurm_{n}" for n in submitit.SlurmExecutor._valid_parameters()}
    init = inspect.signature(submitit.SlurmExecutor.__init__).parameters
    specific |= {f"slurm_{n}" for n in init if n not in ("self", "folder")}
    return sorted(generic | specific)


def _init_names() -> set[str]:
    init = inspect.signature(_submitit().SlurmExecutor.__init__).parameters
    return {f"slurm_{n}" for n in init if n not in ("self", "folder")}


def slurm_folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / SLURM_DIR


def _records_dir(run_dir: str | os.PathLike) -> Path:
    return slurm_folder(run_dir) / RECORDS_DIR


def _marked(run_dir: str | os.PathLike, kid: str) -> bool:
    """True once a job's record file has been stored (it is then emptied)."""
    path = _records_dir(run_dir) / f"{kid}.pkl"
    return path.is_file() and path.stat().st_size == 0


def _record_path(run_dir: str | os.PathLike, key: tuple) -> Path:
    return _records_dir(run_dir) / f"{key_id(key)}.pkl"


@dataclass
class GroupTask:
    """The body of one array task: train a group of jobs, writing each record to the run folder.

    submitit calls ``checkpoint()`` when the task is preempted or about to time out; returning
    the task itself makes submitit requeue it, and the requeued task skips the jobs whose record
    files exist and resumes the others from their checkpoints.
    """

    run_dir: str
    spec_file: str
    group: bytes  # the cloudpickled list of jobs
    checkpoints: Checkpoints
    use_gpu: bool
    sys_path: list[str]

    def __call__(self) -> int:
        join_sys_path(self.sys_path)
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        device = torch.device("cpu")
        if self.use_gpu and torch.cuda.is_available():
            device = torch.device("cuda", 0)  # SLURM restricts CUDA_VISIBLE_DEVICES to its GPUs
        elif self.use_gpu:
            print("modelscape: this SLURM task has no GPU; it trains on the CPU.", file=sys.stderr)
        spec = loads(Path(self.spec_file).read_bytes())
        jobs = loads(self.group)
        todo = [j for j in jobs if not _record_path(self.run_dir, j.key).exists()]
        if todo:
            for record in train_group(todo, spec, device, self.checkpoints):
                blob = dumps(record, "a record")
                write_atomic(_record_path(self.run_dir, record.key), blob)
        return len(todo)

    def checkpoint(self) -> Any:
        return _submitit().helpers.DelayedSubmission(self)


@dataclass
class _Task:
    """A submitted array task, as ``tasks.json`` keeps it."""

    slurm_id: str  # "1234_5" (or "1234" for a one-task submission)
    jobs: list[str]  # key ids
    folder: str  # submitit's folder pattern, which locates the task's logs

    def stderr_tail(self, lines: int = 20) -> str:
        paths = _submitit().core.utils.JobPaths(self.folder, job_id=self.slurm_id, task_id=0)
        for path in (paths.stderr, paths.stdout):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                return f"the end of {path}:\n" + "\n".join(tail)
        return f"no log was written ({paths.stderr} does not exist)"


def _load_tasks(run_dir: str | os.PathLike) -> list[_Task]:
    path = slurm_folder(run_dir) / TASKS_FILE
    if not path.is_file():
        return []
    return [_Task(**t) for t in json.loads(path.read_text())]


def _save_tasks(run_dir: str | os.PathLike, tasks: Sequence[_Task]) -> None:
    data = [vars(t) for t in tasks]
    write_atomic(slurm_folder(run_dir) / TASKS_FILE, json.dumps(data, indent=1).encode())


def task_states(ids: Sequence[str]) -> dict[str, str] | None:
    """SLURM's state of each task id; ``"GONE"`` for one SLURM no longer knows.

    None when squeue itself failed (the controller is busy or unreachable): nothing is decided
    on that round.
    """
    if not ids:
        return {}
    arrays = sorted({i.split("_")[0] for i in ids})
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T",
         "--jobs", ",".join(arrays)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    states = {}
    for line in out.stdout.splitlines():
        name, _, state = line.strip().partition("|")
        for slurm_id in _expand_ids(name):
            states[slurm_id] = state.split()[0] if state else "UNKNOWN"
    gone = [i for i in ids if i not in states]
    states.update(_accounting_states(gone))
    return {i: states.get(i, "GONE") for i in ids}


def _expand_ids(name: str) -> Iterator[str]:
    from submitit.slurm.slurm import read_job_id

    for parts in read_job_id(name):
        if len(parts) == 3:
            yield from (f"{parts[0]}_{i}" for i in range(int(parts[1]), int(parts[2]) + 1))
        else:
            yield "_".join(parts)


def _accounting_states(ids: Sequence[str]) -> dict[str, str]:
    """Ask sacct about tasks squeue has forgotten; empty where accounting is off."""
    if not ids:
        return {}
    out = subprocess.run(
        ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State",
         "--jobs", ",".join(ids)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        name, _, state = line.partition("|")
        if name in ids and state:
            states[name] = state.split()[0]
    return states


def _waits(job: Job, unstored: Mapping[str, Job], held: set[str]) -> bool:
    """A job with no stored record that no live task holds: it must be submitted."""
    kid = key_id(job.key)
    return kid in unstored and kid not in held


class SlurmExecutor(Executor):
    """Submit groups as a SLURM job array and collect their records from the run folder."""

    def __init__(
        self,
        run_dir: str | os.PathLike | None,
        settings: Mapping[str, Any],
        checkpoints: Checkpoints | None,
        *,
        devices: Sequence[int | str] = ("cpu",),
        workers_per_device: int = 1,
        detach: bool = False,
    ):
        if run_dir is None:
            raise ExecutorError(
                "EXECUTOR='slurm' needs SAVE_DIR: a run folder on a file system that the "
                "cluster's nodes share, where the tasks write their results."
            )
        self.run_dir = Path(run_dir).resolve()
        if checkpoints is None:  # built by hand: the run folder's, at the default interval
            checkpoints = Checkpoints(self.run_dir / "checkpoints", H.DEFAULTS["CHECKPOINT_EVERY"])
        super().__init__(checkpoints)
        self.slots = [f"slurm {d}" for d in devices for _ in range(workers_per_device)]
        self.use_gpu = any(d != "cpu" for d in devices)
        self.detach = detach
        self.waits = not detach
        self._executor = self._make_executor(dict(settings))

    @classmethod
    def from_hparams(
        cls, hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
    ) -> SlurmExecutor:
        return cls(
            hp.SAVE_DIR, hp.SLURM, checkpoints, devices=hp.DEVICES,
            workers_per_device=hp.WORKERS_PER_DEVICE, detach=hp.DETACH,
        )  # fmt: skip

    def _make_executor(self, settings: dict[str, Any]) -> Any:
        submitit = _submitit()
        names = parameter_names()
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise HParamError(
                f"SLURM: {', '.join(map(repr, unknown))} is not a submitit parameter. "
                f"Valid names: {', '.join(names)}."
            )
        init = {k: settings.pop(k) for k in _init_names() & set(settings)}
        folder = slurm_folder(self.run_dir) / SUBMITIT_DIR / "%j"
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm", **init)
        except RuntimeError as err:  # no srun: not on a SLURM cluster
            raise ExecutorError(
                f"EXECUTOR='slurm' needs SLURM's commands (sbatch, squeue, srun) on PATH; run "
                f"the sweep on the cluster's login node ({err})."
            ) from None
        try:
            executor.update_parameters(**{"name": "modelscape", **settings})
        except (AssertionError, NameError, ValueError, TypeError) as err:
            raise HParamError(f"SLURM={settings!r}: {err}") from None
        return executor

    def placement(self) -> list[str]:
        return list(self.slots)

    @classmethod
    def check(cls, hp: H.HParams) -> None:
        super().check(hp)
        if hp.SAVE_DIR is None:
            raise ExecutorError(
                "EXECUTOR='slurm' needs SAVE_DIR: a run folder on a file system that the "
                "cluster's nodes share, where the tasks write their results."
            )
        unknown = sorted(set(hp.SLURM) - set(parameter_names()))
        if unknown:
            raise HParamError(
                f"SLURM: {', '.join(map(repr, unknown))} is not a submitit parameter. "
                f"Valid names: {', '.join(parameter_names())}."
            )

    @classmethod
    def collect(cls, run_dir: str | os.PathLike) -> str | None:
        """Store the records that SLURM tasks wrote into a run folder since anyone last looked
        (a sweep submitted with DETACH)."""
        return collect(run_dir)

    def _run(self, payload: Payload, records: Records) -> None:
        """Submit the groups no task holds and wait for every record; with DETACH, submit and
        return (a rerun of the sweep, or ``modelscape show``, collects)."""
        watching = self._attach(payload, records)
        if self.detach:
            ids = " ".join(sorted({t.slurm_id.split("_")[0] for t in watching.tasks}))
            print(
                f"modelscape: detached; SLURM job(s) {ids or '(none left)'} train on without "
                f"this process. `modelscape show {self.run_dir}` or rerunning the sweep collects.",
                file=sys.stderr,
            )
            return
        try:
            watching.until_done()
        except KeyboardInterrupt:
            print(
                "\nmodelscape: the SLURM tasks keep running; rerun the sweep to collect them "
                f"(scancel {' '.join(sorted({t.slurm_id.split('_')[0] for t in watching.tasks}))}"
                " stops them).",
                file=sys.stderr,
            )
            raise

    def _attach(self, payload: Payload, records: Records) -> Watch:
        """Watch the tasks of earlier runs that hold jobs of this sweep, and submit the rest.

        Tasks still queued or running keep their jobs (reattached); ended ones have their
        unfinished jobs recorded as failed; only jobs no task holds are submitted.
        """
        _records_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        gids = {key_id(j.key): gid for gid, g in enumerate(payload.groups) for j in g}
        jobs = {key_id(j.key): j for g in payload.groups for j in g}
        tasks = _load_tasks(self.run_dir)
        watching = Watch(self.run_dir, jobs, lambda kid, r: records.add(gids[kid], r))
        watching.add([t for t in tasks if any(k in jobs for k in t.jobs)])
        watching.check_states()
        held = {k for t in watching.tasks for k in t.jobs}
        new = [[j for j in g if _waits(j, watching.jobs, held)] for g in payload.groups]
        new = [g for g in new if g]
        if new:
            watching.add(self._submit(new, payload.spec_blob))
        others = [t for t in tasks if not any(k in jobs for k in t.jobs)]
        _save_tasks(self.run_dir, watching.tasks + others)
        return watching

    def _submit(self, groups: list[list[Job]], spec_blob: bytes) -> list[_Task]:
        digest = hashlib.sha256(spec_blob).hexdigest()[:16]
        spec_file = slurm_folder(self.run_dir) / f"sweep-{digest}.pkl"
        if not spec_file.is_file():
            write_atomic(spec_file, spec_blob)
        bodies = []
        for group in groups:
            for job in group:  # an emptied marker from an earlier try (RETRY_FAILED)
                _record_path(self.run_dir, job.key).unlink(missing_ok=True)
            bodies.append(
                GroupTask(
                    run_dir=str(self.run_dir),
                    spec_file=str(spec_file),
                    group=dumps(list(group), "a job"),
                    checkpoints=self.checkpoints,
                    use_gpu=self.use_gpu,
                    sys_path=list(sys.path),
                )
            )
        try:
            with self._executor.batch():
                submitted = [self._executor.submit(body) for body in bodies]
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            raise ExecutorError(
                f"SLURM refused the job array: {err}\nCheck the SLURM settings (partition, "
                "account, time limit, resources) against `sinfo` and your cluster's limits."
            ) from None
        folder = str(self._executor.folder)
        return [
            _Task(s.job_id, [key_id(j.key) for j in g], folder) for s, g in zip(submitted, groups)
        ]


class Watch:
    """Store the records of watched tasks as their files appear; fail jobs of ended tasks."""

    def __init__(
        self, run_dir: Path, jobs: Mapping[str, Job], on_record: Callable[[str, JobRecord], None]
    ):
        self.run_dir = run_dir
        self.jobs = dict(jobs)  # key id -> job, for the jobs still without a stored record
        self.on_record = on_record
        self.tasks: list[_Task] = []
        self._last_check = float("-inf")

    def add(self, tasks: Sequence[_Task]) -> None:
        self.tasks.extend(tasks)

    def until_done(self) -> None:
        while self.tasks:
            time.sleep(POLL_SECONDS)
            self.collect()
            if time.monotonic() - self._last_check >= STATE_SECONDS:
                self.check_states()
            self._settle()

    def collect(self) -> None:
        """Store every record file of a job this sweep waits for."""
        for path in sorted(_records_dir(self.run_dir).glob("*.pkl")):
            kid = path.stem
            if kid not in self.jobs or path.stat().st_size == 0:
                continue
            record = loads(path.read_bytes())
            self._store(kid, record)
            write_atomic(path, b"")  # stays as the task's "done" marker

    def check_states(self) -> None:
        """Ask SLURM about the watched tasks; record the unfinished jobs of ended ones as failed."""
        self._last_check = time.monotonic()
        states = task_states([t.slurm_id for t in self.tasks])
        if states is None:
            return
        self.collect()  # records written just before a task ended
        for task in self.tasks:
            state = states[task.slurm_id]
            if state not in ENDED and state != "GONE":
                continue
            left = [k for k in task.jobs if k in self.jobs]
            if left:
                err = SlurmTaskFailed(
                    f"SLURM task {task.slurm_id} ended ({state}) before this job finished; "
                    f"{task.stderr_tail()}\nRETRY_FAILED=True reruns it."
                )
            for kid in left:
                self._store(kid, failed_record(self.jobs[kid], err, f"slurm {task.slurm_id}"))
        self._settle()

    def _store(self, kid: str, record: JobRecord) -> None:
        self.jobs.pop(kid)
        self.on_record(kid, record)

    def _settle(self) -> None:
        """Forget tasks whose jobs are all stored, in memory and in ``tasks.json``."""
        done = [t for t in self.tasks if not any(k in self.jobs for k in t.jobs)]
        if not done:
            return
        self.tasks = [t for t in self.tasks if t not in done]
        keep = [t for t in _load_tasks(self.run_dir) if t not in done]
        _save_tasks(self.run_dir, keep)


def collect(run_dir: str | os.PathLike) -> str | None:
    """Store the records that SLURM tasks wrote into a run folder since anyone last looked.

    ``modelscape show`` calls this for sweeps submitted with DETACH. Returns a one-line summary
    (None when the run folder has no SLURM tasks), and leaves the files to a sweep that is
    running on the folder (it holds the lock and stores them itself).
    """
    folder = _records_dir(run_dir)
    if not folder.is_dir():
        return None
    tasks = _load_tasks(run_dir)
    pending = [p for p in sorted(folder.glob("*.pkl")) if p.stat().st_size > 0]
    if pending:
        try:
            store = RunStore.reopen(run_dir)
        except StoreError:
            return "slurm: a sweep process is collecting this run folder."
        try:
            for path in pending:
                store.add(loads(path.read_bytes()))  # then clears the job's checkpoint
                write_atomic(path, b"")
        finally:
            store.close()
    tasks = [t for t in tasks if not all(_marked(run_dir, k) for k in t.jobs)]
    _save_tasks(run_dir, tasks)
    ids = sorted({t.slurm_id.split("_")[0] for t in tasks})
    still = f"; tasks of SLURM job(s) {' '.join(ids)} may still run" if ids else ""
    return f"slurm: {len(pending)} new records stored{still} (rerun the sweep to finish it)."
