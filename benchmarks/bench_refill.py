"""Refill benchmark: a threshold sweep with more jobs than a group holds, REFILL on against off.

The sweep: offline Gaussian inputs in d=8 with target ``x0*x1``; an MLP of WIDTH 64, DEPTH 2,
SGD, N_SAMPLES 128; one threshold (LOSS_CHECKPOINTS [0.15]) that LRs spread geometrically over
two decades reach at steps about two orders of magnitude apart (about 40 to 3,000), as in a
time-to-threshold sweep. The grid is ``trial x LR`` with LR the inner axis, so each group of
``MAX_GROUP`` jobs (set small here, as memory sets it on a GPU) holds fast and slow jobs alike.

Without refill the groups train one after another, each until its slowest job exits; with
refill one stream keeps ``MAX_GROUP`` jobs training, a waiting job taking the row of one that
exited. Both sides run in this process (one worker), interleaved, each the best of
``--repeats``. Printed: both times, the ratio, and both sides' median test losses (they agree:
a job's numbers do not depend on refill).

    python benchmarks/bench_refill.py              # 64 jobs, MAX_GROUP 8
    python benchmarks/bench_refill.py --quick      # 16 jobs, one repeat (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from modelscape import run_sweep
from modelscape.cli.demo import quadratic_bfn
from modelscape.engine.stacked import grouping

CONFIG = {
    "WIDTH": 64,
    "DEPTH": 2,
    "N_SAMPLES": 128,
    "N_TEST": 500,
    "MAX_ITER": 20_000,
    "LOSS_CHECKPOINTS": [0.15],
    "ONLINE": False,
    "DEVICES": ["cpu"],
    "d": 8,
}
LRS = [float(lr) for lr in np.round(np.geomspace(0.002, 0.4, 8), 5)]


def sweep(trials: int, refill: bool) -> tuple[float, list]:
    """Seconds for the whole sweep, and its records."""
    start = time.perf_counter()
    result = run_sweep(
        [list(range(trials)), LRS],
        ["trial", "LR"],
        {**CONFIG, "REFILL": refill},
        {"base_bfn": quadratic_bfn},
        progress=False,
    )
    return time.perf_counter() - start, result.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per LR (8 LRs)")
    parser.add_argument("--max-group", type=int, default=8, help="MAX_GROUP: jobs per stack")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 trials, one repeat")
    args = parser.parse_args()
    trials, repeats = (2, 1) if args.quick else (args.trials, args.repeats)
    torch.set_num_threads(1)
    grouping.MAX_GROUP = args.max_group
    times: dict[bool, list[float]] = {False: [], True: []}
    records: dict[bool, list] = {}
    for _ in range(repeats):
        for refill in (False, True):
            seconds, records[refill] = sweep(trials, refill)
            times[refill].append(seconds)
    steps = sorted(r.steps for r in records[True])
    off, on = min(times[False]), min(times[True])
    print(
        f"{len(steps)} jobs, MAX_GROUP {args.max_group}, exit steps {steps[0]}..{steps[-1]} "
        f"(median {statistics.median(steps):.0f}); load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':>12} {'seconds':>9} {'median test loss':>17}")
    for refill, best in ((False, off), (True, on)):
        loss = statistics.median(r.test_loss for r in records[refill])
        print(f"{'refill' if refill else 'no refill':>12} {best:9.2f} {loss:17.6g}")
    print(f"speedup (no refill / refill): {off / on:.2f}x")


if __name__ == "__main__":
    main()
