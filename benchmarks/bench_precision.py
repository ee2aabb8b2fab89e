"""What PRECISION costs in accuracy: the canonical sweep's final test losses in each mode.

Runs cases of ``bench_sweep`` through modelscape once per PRECISION (fp32, tf32, bf16-mixed)
and prints, per case and mode, the relative difference of every job's final test loss from
its fp32 value (median and largest over the jobs), the median test loss and the time. On a CPU
tf32 is fp32 (TF32 exists on CUDA only), so its difference is 0.

    python benchmarks/bench_precision.py                       # the three canonical cases
    python benchmarks/bench_precision.py --cases w64,hea --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import modelscape

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sweep  # noqa: E402 - the sibling benchmark script, not a package

PRECISIONS = ("fp32", "tf32", "bf16-mixed")


def losses(case: bench_sweep.Case, steps: int, precision: str) -> tuple[float, dict]:
    config = {**bench_sweep.sweep_config(case, steps), "PRECISION": precision}
    start = time.perf_counter()
    result = modelscape.run_sweep(*case.axes, config, bench_sweep.BFN, progress=False)
    seconds = time.perf_counter() - start
    assert all(r.status == "ok" for r in result.records)
    return seconds, {r.key: r.test_loss for r in result.records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="MAX_ITER of every job")
    parser.add_argument("--cases", default="w64,w256,online", help="bench_sweep case keys")
    args = parser.parse_args()
    print(
        "| case | PRECISION | median rel. diff. from fp32 | largest | median test loss | s |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    for case in bench_sweep.select(args.cases):
        reference = None
        for precision in PRECISIONS:
            seconds, got = losses(case, args.steps, precision)
            reference = reference or got
            diff = np.array([abs(got[k] - v) / abs(v) for k, v in reference.items()])
            print(
                f"| {case.name} | {precision} | {np.median(diff):.2e} | {diff.max():.2e} | "
                f"{statistics.median(got.values()):.4f} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
