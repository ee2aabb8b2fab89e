"""Throughput of the run folder: a sweep of 2,000 tiny jobs with SAVE_DIR, against the same
sweep kept in memory, in one process.

Each job trains a width-4 MLP for 2 steps, so the time is the sweep's own overhead: planning,
the preflight, storing every record durably (SQLite, one transaction per record) and clearing
its checkpoint. The two sides alternate, the best of ``--repeats`` counts, and both sides' test
losses are compared.

    python benchmarks/bench_store.py [--jobs 2000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from modelscape import base_args, run_sweep


def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        if X is not None:
            return X, y
        Xb = torch.randn(bsz, 3, generator=gen)
        return Xb, Xb[:, 0]

    return batch_fn


def sweep(jobs: int, save_dir: str | None):
    cfg = base_args(
        WIDTH=4, DEPTH=1, MAX_ITER=2, N_SAMPLES=8, N_TEST=8, ONLINE=False,
        LOSS_CHECKPOINTS=[1e-9], DEVICES=["cpu"], BATCHED="off", SAVE_DIR=save_dir,
    )  # fmt: skip
    start = time.perf_counter()
    result = run_sweep([range(jobs)], ["trial"], vars(cfg), {"base_bfn": bfn}, progress=False)
    return time.perf_counter() - start, [r.test_loss for r in result.records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    best = {"memory": float("inf"), "SAVE_DIR": float("inf")}
    losses = {}
    for _ in range(args.repeats):
        seconds, losses["memory"] = sweep(args.jobs, None)
        best["memory"] = min(best["memory"], seconds)
        with tempfile.TemporaryDirectory() as tmp:
            seconds, losses["SAVE_DIR"] = sweep(args.jobs, str(Path(tmp) / "run"))
        best["SAVE_DIR"] = min(best["SAVE_DIR"], seconds)
    assert losses["memory"] == losses["SAVE_DIR"], "the stored sweep trained other numbers"
    for side, seconds in best.items():
        print(f"{side:>9}: {args.jobs} jobs in {seconds:.2f} s ({args.jobs / seconds:.0f} jobs/s)")
    print(f"run folder overhead: {best['SAVE_DIR'] / best['memory']:.2f}x the in-memory sweep")


if __name__ == "__main__":
    main()
