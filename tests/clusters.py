"""Real clusters for the tests: a single-node SLURM cluster started from scratch.

``slurm_cluster`` (module-scoped) writes a slurm.conf and a munge key into a temporary folder,
starts ``munged``, ``slurmctld`` and ``slurmd`` as this process's children, waits until
``sinfo`` shows the node idle, points ``SLURM_CONF`` at the config (so that sbatch, squeue,
scancel and submitit talk to this cluster), and afterwards stops every daemon by its pid and
cancels leftover jobs. Where the SLURM binaries are missing the tests skip with the reason; in
CI (``CI=true``, where ``.ci/install_slurm.sh`` installs them) that is an error instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")


@dataclass
class SlurmCluster:
    """A running single-node cluster: its config, folder, node name and partition."""

    conf: Path
    folder: Path
    node: str
    partition: str
    cpus: int

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str) -> str:
        """Run a SLURM command against this cluster and return its stdout."""
        out = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(parts)


def missing_slurm() -> str | None:
    """Why a SLURM cluster cannot start here, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root (SlurmUser=root)"
    absent = [b for b in (*DAEMONS, *COMMANDS) if _which(b) is None]
    if absent:
        return (
            f"SLURM is not installed ({', '.join(absent)} missing); "
            "`bash .ci/install_slurm.sh` installs it (Debian: slurm-wlm, munge)"
        )
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(folder: Path, node: str, cpus: int, partition: str) -> Path:
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    lines = [
        "ClusterName=modelscape-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also delays a requeued job's restart (120 s by default)
        f"AuthInfo=socket={folder / 'munge.socket'},cred_expire=10",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        # short cycles: the tests wait on the scheduler and on time limits
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "MessageTimeout=30",
        "KillWait=5",
        "MinJobAge=600",  # finished jobs stay visible to squeue while a test runs
        "InactiveLimit=0",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start_munged(folder: Path) -> subprocess.Popen:
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    return subprocess.Popen(
        [
            _which("munged"),
            "--foreground",
            "--force",  # runs as root, in a folder munge would otherwise find too permissive
            f"--socket={folder / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def _wait(what: str, ready, timeout: float, cluster: SlurmCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    logs = cluster.log_tail() if cluster is not None else ""
    raise RuntimeError(f"the test SLURM cluster did not start: {what} after {timeout:.0f}s\n{logs}")


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        states = cluster.command("sinfo", "--noheader", "--node", cluster.node, "-o", "%T")
    except RuntimeError:
        return False
    return states.strip() == "idle"


def _cancel_all(cluster: SlurmCluster) -> None:
    """Cancel every job and wait until none is left running (its processes end with it)."""
    subprocess.run(["scancel", "--user", "root"], env=cluster.env(), capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if not cluster.command("squeue", "--noheader", "-o", "%i").split():
                return
        except RuntimeError:
            return
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):  # slurmd, then slurmctld, then munged
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def running_slurm(folder: Path) -> Iterator[SlurmCluster]:
    """Start a single-node cluster with its files in ``folder``; stop it on exit.

    ``SLURM_CONF`` points at it meanwhile. Usable outside pytest (``benchmarks/`` does).
    """
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(
        conf=_write_config(folder, node, os.cpu_count() or 1, "debug"),
        folder=folder,
        node=node,
        partition="debug",
        cpus=os.cpu_count() or 1,
    )
    env = cluster.env()
    procs: list[subprocess.Popen] = []
    before = os.environ.get("SLURM_CONF")
    try:
        procs.append(_start_munged(folder))
        _wait("munged's socket", (folder / "munge.socket").exists, 20)
        for daemon in ("slurmctld", "slurmd"):
            # -D: stay in the foreground as our child, so it is stopped by its pid
            args = [_which(daemon), "-D", "-f", str(cluster.conf)]
            args += ["-i"] if daemon == "slurmctld" else []  # ignore stale state
            with open(folder / f"{daemon}.out", "w") as log:
                procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        _wait("the node idle in sinfo", lambda: _node_idle(cluster), 60, cluster)
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if procs and procs[-1].poll() is None:
            _cancel_all(cluster)
        _stop(procs)
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A single-node SLURM cluster for the tests of one module; ``SLURM_CONF`` points at it."""
    reason = missing_slurm()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests, but {reason}.")
        pytest.skip(reason)
    with running_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
