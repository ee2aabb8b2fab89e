"""Real clusters for the tests: a single-node SLURM cluster and a two-node Ray cluster.

``slurm_cluster`` (module-scoped) writes a slurm.conf and a munge key into a temporary folder,
starts ``munged``, ``slurmctld`` and ``slurmd`` as this process's children, waits until
``sinfo`` shows the node idle, points ``SLURM_CONF`` at the config (so that sbatch, squeue,
scancel and submitit talk to this cluster), and afterwards stops every daemon by its pid and
cancels leftover jobs. Where the SLURM binaries are missing the tests skip with the reason; in
CI (``CI=true``, where ``.ci/install_slurm.sh`` installs them) that is an error instead.

``ray_cluster`` (module-scoped) runs ``ray start --head --num-cpus 1`` and a second
``ray start --address ... --num-cpus 1`` on this machine (a second raylet is a second node),
with a private temp folder so that no other Ray user on the machine attaches to it. Every process
of the cluster inherits a marker in its environment (``RAY_MARKER``), by which ``ray_processes``
finds them all (Ray renames its agents' command lines) and the fixture stops them by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
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


RAY_MARKER = "MODELSCAPE_TEST_RAY"
# Explicit, so the cluster behaves alike whether or not ~/.ray/auth_token exists; a dead node is
# noticed after ~2 s instead of ~30 s.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class RayNode:
    node_id: str
    raylet_socket: str


@dataclass
class RayCluster:
    """A running two-node Ray cluster on this machine."""

    address: str
    folder: Path
    marker: str
    head: RayNode
    second: RayNode

    def driver_env(self, marker: str) -> dict[str, str]:
        """The environment of a driver process that connects to this cluster; ``marker`` tags
        the processes it starts (see ``ray_processes``)."""
        env = {k: v for k, v in os.environ.items() if k != RAY_MARKER}
        return {**env, **RAY_ENV, "RAY_ADDRESS": self.address, RAY_MARKER: marker}

    def kill_second_node(self) -> int:
        """SIGKILL the second node's raylet together with its workers, as when a machine dies
        (a worker of a killed raylet would otherwise run on for a moment); returns its pid."""
        flag = f"--raylet_socket_name={self.second.raylet_socket}"
        for pid in ray_processes(self.marker):
            if flag in _cmdline(pid):
                children = [p for p in ray_processes(self.marker) if _parent(p) == pid]
                for victim in (*children, pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                return pid
        raise RuntimeError(f"no raylet runs with {flag}")


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return -1


def ray_processes(marker: str) -> list[int]:
    """Every live process whose environment has ``RAY_MARKER=marker``."""
    tag = f"{RAY_MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0") and not _zombie(entry):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _zombie(entry: Path) -> bool:
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ray(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(
            f"ray {' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return out.stdout


def _ray_nodes(env: dict[str, str]) -> list[RayNode]:
    """The alive nodes, asked from a short-lived driver (this process never joins Ray)."""
    code = (
        "import json, ray; ray.init(log_to_driver=False); print(json.dumps([(n['NodeID'], "
        "n['RayletSocketName']) for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(f"could not list the Ray nodes:\n{out.stderr[-2000:]}")
    return [RayNode(*n) for n in json.loads(out.stdout.strip().splitlines()[-1])]


def stop_processes(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each pid, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            pids = [
                p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(Path(f"/proc/{p}"))
            ]
            time.sleep(0.2)


def _node_ports() -> list[str]:
    """One CPU and free ports for a node's agents: two nodes on one machine must not share the
    defaults (nor take those of another Ray on this machine)."""
    args = ["--num-cpus", "1", "--num-gpus", "0"]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port"):  # fmt: skip
        args += [flag, str(_free_port())]
    return args


@contextlib.contextmanager
def running_ray(folder: Path) -> Iterator[RayCluster]:
    """Start a two-node Ray cluster (one CPU per node) with its files in ``folder``; stop it on
    exit. Usable outside pytest (``benchmarks/`` does)."""
    marker = uuid.uuid4().hex
    env = {**os.environ, **RAY_ENV, RAY_MARKER: marker}
    env.pop("RAY_ADDRESS", None)
    try:
        _ray(["start", "--head", "--port", str(_free_port()), "--temp-dir", str(folder),
              "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
              "--ray-client-server-port", str(_free_port()), *_node_ports()], env)  # fmt: skip
        address = (folder / "ray_current_cluster").read_text().strip()
        _ray(["start", "--address", address, *_node_ports()], env)
        nodes = _ray_nodes({**env, "RAY_ADDRESS": address})
        if len(nodes) != 2:
            raise RuntimeError(f"the test Ray cluster has {len(nodes)} nodes, not 2: {nodes}")
        head = next(n for n in nodes if n.raylet_socket.endswith("/raylet"))
        second = next(n for n in nodes if n is not head)
        yield RayCluster(address, folder, marker, head, second)
    finally:
        stop_processes(ray_processes(marker))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster on this machine for the tests of one module."""
    pytest.importorskip("ray")
    # a short path: Ray's socket paths under it must stay within the OS limit (107 bytes)
    folder = Path(tempfile.mkdtemp(prefix="msray", dir="/tmp"))
    try:
        with running_ray(folder) as cluster:
            yield cluster
    finally:
        shutil.rmtree(folder, ignore_errors=True)
