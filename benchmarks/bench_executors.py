"""Wall time of one 40-job sweep on each executor: local workers, a SLURM array, two-node Ray.

The sweep: the demo's quadratic target at tiny size (WIDTH 64, MAX_ITER 300, N_TEST 500), ntrain
in {32, 64, 128, 256, 512} x 4 trials x GAMMA in {1, 0.1} = 40 jobs, on DEVICES=["cpu"] with
WORKERS_PER_DEVICE=2. Every executor trains the same groups (one per sample size, split to two
slots): 2 long-lived worker processes take them in turn, or each is a SLURM array task (2 CPUs:
2 run at a time), or a Ray task on a two-node Ray cluster with one CPU per node.
Each run starts from an empty run folder and ends when every record is stored; the difference
is the executor's overhead (sbatch, scheduling, a fresh interpreter per task, its exit, polling
the run folder). The runs alternate, the best of ``--repeats`` counts, and the
script checks that both executors give the same test losses.

    python benchmarks/bench_executors.py                  # the cluster that sbatch reaches
    python benchmarks/bench_executors.py --start-cluster  # a single-node cluster, as the tests
                                                          # start it (root, slurm-wlm installed)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.cli.demo import quadratic_bfn

ITERATORS = [[32, 64, 128, 256, 512], range(4), [1.0, 0.1]]
NAMES = ["ntrain", "trial", "GAMMA"]


def sweep(executor: str, run_dir: Path):
    cfg = base_args(
        WIDTH=64, MAX_ITER=300, LR=0.2, N_TEST=500, ONLINE=False, LOSS_CHECKPOINTS=[0.5, 0.2],
        DEVICES=["cpu"], WORKERS_PER_DEVICE=2, EXECUTOR=executor, SAVE_DIR=str(run_dir),
        RAY_ADDRESS=os.environ.get("RAY_ADDRESS") if executor == "ray" else None,
    )  # fmt: skip
    start = time.perf_counter()
    result = run_job_iterator(
        ITERATORS, NAMES, vars(cfg), {"base_bfn": quadratic_bfn, "d": 16}, progress=False
    )
    return time.perf_counter() - start, result


def _clusters_module():
    path = Path(__file__).resolve().parent.parent / "tests" / "clusters.py"
    spec = importlib.util.spec_from_file_location("clusters", path)
    clusters = importlib.util.module_from_spec(spec)
    sys.modules["clusters"] = clusters  # its dataclass looks its module up there
    spec.loader.exec_module(clusters)
    return clusters


@contextlib.contextmanager
def test_clusters(folder: Path):
    """The tests' single-node SLURM and two-node Ray clusters (tests/clusters.py)."""
    clusters = _clusters_module()
    reason = clusters.missing_slurm()
    if reason:
        raise SystemExit(f"cannot start a SLURM cluster: {reason}")
    ray_folder = Path(tempfile.mkdtemp(prefix="msray", dir="/tmp"))  # short socket paths
    with clusters.running_slurm(folder), clusters.running_ray(ray_folder) as ray_cluster:
        os.environ.update({**clusters.RAY_ENV, "RAY_ADDRESS": ray_cluster.address})
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-cluster", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "slurm").mkdir()
        cluster = test_clusters(tmp / "slurm") if args.start_cluster else contextlib.nullcontext()
        times: dict[str, list[float]] = {"local": [], "slurm": [], "ray": []}
        losses = {}
        with cluster:
            for i in range(args.repeats):
                for executor in times:
                    seconds, result = sweep(executor, tmp / f"{executor}-{i}")
                    assert len(result.records) == 40 and not result.failed, result.failed[:1]
                    if executor == "slurm":
                        tasks = len(list((tmp / f"slurm-{i}/slurm/submitit").iterdir()))
                    times[executor].append(seconds)
                    losses[executor] = [r.test_loss for r in result.records]
    assert losses["local"] == losses["slurm"] == losses["ray"], "the executors disagree"
    local = min(times["local"])
    print(f"40-job sweep in {tasks} groups (2 local workers / {tasks} SLURM array tasks / "
          f"{tasks} Ray tasks on 2 nodes)")  # fmt: skip
    print(f"best of {args.repeats} runs each, alternating")
    for name, label in (("local", "local workers"), ("slurm", "SLURM array"), ("ray", "Ray")):
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"  {label + ':':15s}{min(times[name]):6.1f} s   (all runs: {runs})")
    for name in ("slurm", "ray"):
        best = min(times[name])
        print(f"  {name} / local: {best / local:.2f}; extra wall time per group: "
              f"{(best - local) / tasks:.1f} s")  # fmt: skip
    print("  same test losses on all: yes")


if __name__ == "__main__":
    sys.exit(main())
