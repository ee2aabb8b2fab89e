"""GPU benchmarks: modelscape against a hand-written loop on one device, in one run.

Three cases, each against the plain loop (``bench_sweep.train_plain``: one job at a time, the
job's own model, data and torch optimizer) in the same run:

- ``many``: 256 jobs of width 256 (16 LR x 16 trials, sp, SGD, offline, N_SAMPLES 256):
  job-steps per second of each side. The plain loop trains the first ``PLAIN_JOBS`` of them
  (a rate, so fewer jobs measure it as well).
- ``wide``: 8 jobs of width 4096 (offline, N_SAMPLES 4096, sp, SGD) in each PRECISION (fp32,
  tf32, bf16-mixed): TFLOP/s (6 x samples x weights per step) against this device's measured
  matmul peak in the same precision. Steady state: the time of a long run minus that of a
  short one, so setup, compilation and the final evaluation drop out.
- ``hea``: the HEA-like case of ``bench_sweep`` (muP, GAMMA=10, online SGD, width 256, the
  16-job N x trial grid) with more steps.

It prints a markdown table and appends it, with the device and the time, to ``--notes``
(``benchmarks/NOTES.md``; ``--notes ''`` appends nothing). The whole run takes a few minutes on
an H200. ``--quick`` runs every case at a tiny size on the CPU in seconds (a smoke test of the
script and of every precision path; its numbers mean nothing).

    python benchmarks/bench_gpu.py            # on cuda:0
    python benchmarks/bench_gpu.py --quick    # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import modelscape
from modelscape import engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sweep  # noqa: E402 - the sibling benchmark script, not a package

PRECISIONS = ("fp32", "tf32", "bf16-mixed")
PEAK_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class Sizes:
    """What a run trains; ``--quick`` shrinks every number."""

    many_jobs: int = 256  # a square grid: sqrt(many_jobs) LRs x sqrt(many_jobs) trials
    many_width: int = 256
    many_samples: int = 256
    many_steps: int = 500
    plain_jobs: int = 16
    wide_jobs: int = 8
    wide_width: int = 4096
    wide_samples: int = 4096
    wide_steps: tuple[int, int] = (20, 120)
    hea_steps: int = 1000
    peak_n: int = 8192


QUICK = Sizes(16, 32, 64, 20, 4, 2, 64, 128, (4, 12), 20, 256)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """TF32 matmuls on for ``tf32`` only, as modelscape's PRECISION sets them; restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(precision: str, device: torch.device, n: int) -> float:
    """The device's n^3 matmul rate in TFLOP/s in this precision (best of several)."""
    dtype = PEAK_DTYPE[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    with matmul_precision(precision):
        a @ b
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best / 1e12


def config(device: torch.device, width: int, steps: int, **hparams) -> dict:
    return {
        "ONLINE": False,
        "WIDTH": width,
        "DEPTH": 2,
        "OPTIMIZER": "SGD",
        "LOSS": "MSELoss",
        "MAX_ITER": steps,
        "LOSS_CHECKPOINTS": [0.0],
        "N_TEST": 1000,
        "ONLYTHRESHOLDS": True,
        "CENTER": False,
        "DEVICES": ["cpu" if device.type == "cpu" else device.index or 0],
        **hparams,
    }


def run_modelscape(axes, cfg: dict, device: torch.device) -> tuple[float, list[float]]:
    """(seconds, test losses) of a sweep through ``run_sweep``."""
    sync(device)
    start = time.perf_counter()
    result = modelscape.run_sweep(*axes, cfg, bench_sweep.BFN, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    bad = [(r.key, r.status, r.error) for r in result.records if r.status != "ok"]
    assert not bad, bad
    return seconds, [r.test_loss for r in result.records]


def run_plain(axes, cfg: dict, device: torch.device, n_jobs: int) -> tuple[float, list[float]]:
    """(seconds, test losses) of the first ``n_jobs`` jobs as hand-written loops."""
    _, _, jobs, spec = bench_sweep.plan(*axes, cfg, bench_sweep.BFN)
    precision = cfg.get("PRECISION", "fp32")
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    sync(device)
    start = time.perf_counter()
    with matmul_precision(precision):
        losses = [
            bench_sweep.train_plain(engine.setup_job(job, spec, device), cfg["MAX_ITER"], autocast)
            for job in jobs[:n_jobs]
        ]
    sync(device)
    return time.perf_counter() - start, losses


def case_many(device: torch.device, sizes: Sizes) -> list[str]:
    side = round(sizes.many_jobs**0.5)
    axes = ([[0.02 * 1.2**i for i in range(side)], list(range(side))], ["LR", "trial"])
    cfg = config(device, sizes.many_width, sizes.many_steps, N_SAMPLES=sizes.many_samples)
    t_ms, loss_ms = run_modelscape(axes, cfg, device)
    t_plain, loss_plain = run_plain(axes, cfg, device, sizes.plain_jobs)
    rate_ms = side * side * sizes.many_steps / t_ms
    rate_plain = sizes.plain_jobs * sizes.many_steps / t_plain
    name = f"{side * side} jobs, width {sizes.many_width}"
    medians = statistics.median(loss_plain), statistics.median(loss_ms[: sizes.plain_jobs])
    return [
        f"| {name} | fp32 | {rate_plain:,.0f} job-steps/s | {rate_ms:,.0f} job-steps/s | "
        f"{rate_ms / rate_plain:.1f}x | - | - | "
        f"{medians[0]:.4f} / {medians[1]:.4f} |"
    ]


def case_wide(device: torch.device, sizes: Sizes) -> list[str]:
    rows = []
    axes = ([list(range(sizes.wide_jobs))], ["trial"])
    width, n = sizes.wide_width, sizes.wide_samples
    flop_per_step = 6.0 * bench_sweep.weights(width) * n * sizes.wide_jobs
    short, long = sizes.wide_steps
    for precision in PRECISIONS:
        peak = matmul_peak(precision, device, sizes.peak_n)
        results = {}
        for side, fn in (("plain", run_plain), ("ms", run_modelscape)):
            times, losses = [], []
            for steps in (short, long):
                cfg = config(device, width, steps, N_SAMPLES=n, LR=0.05, PRECISION=precision)
                args = (axes, cfg, device) + ((sizes.wide_jobs,) if side == "plain" else ())
                seconds, loss = fn(*args)
                times.append(seconds)
                losses = loss
            per_step = max(times[1] - times[0], 1e-9) / (long - short)
            results[side] = (flop_per_step / per_step / 1e12, statistics.median(losses))
        (tf_plain, loss_plain), (tf_ms, loss_ms) = results["plain"], results["ms"]
        rows.append(
            f"| {sizes.wide_jobs} jobs, width {width} | {precision} | {tf_plain:.1f} TFLOP/s | "
            f"{tf_ms:.1f} TFLOP/s | {tf_ms / tf_plain:.2f}x | {peak:.1f} | "
            f"{tf_plain / peak:.0%} / {tf_ms / peak:.0%} | {loss_plain:.4f} / {loss_ms:.4f} |"
        )
    return rows


def case_hea(device: torch.device, sizes: Sizes) -> list[str]:
    case = next(c for c in bench_sweep.CASES if c.key == "hea")
    if sizes is QUICK:
        case = replace(case, width=32)
    cfg = bench_sweep.sweep_config(case, sizes.hea_steps)
    cfg["DEVICES"] = config(device, 1, 1)["DEVICES"]
    t_ms, loss_ms = run_modelscape(case.axes, cfg, device)
    n_jobs = len(loss_ms)
    t_plain, loss_plain = run_plain(case.axes, cfg, device, n_jobs)
    return [
        f"| {case.name}, width {case.width} | fp32 | {t_plain:.2f} s | {t_ms:.2f} s | "
        f"{t_plain / t_ms:.1f}x | - | - | "
        f"{statistics.median(loss_plain):.4f} / {statistics.median(loss_ms):.4f} |"
    ]


CASES = {"many": case_many, "wide": case_wide, "hea": case_hea}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke)")
    parser.add_argument("--device", default=None, help="default: cuda:0 (cpu with --quick)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: many,wide,hea")
    parser.add_argument(
        "--notes", default=str(Path(__file__).with_name("NOTES.md")), help="'' to skip"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.quick else "cuda:0"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --quick for a CPU smoke run")
    sizes = QUICK if args.quick else Sizes()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"`bench_gpu.py{' --quick' if args.quick else ''}`, {name}, torch {torch.__version__}"
        + (f", load average {os.getloadavg()[0]:.1f}" if device.type == "cpu" else ""),
        "",
        "| case | precision | plain | modelscape | ratio | peak TFLOP/s | % peak plain / ms "
        "| median test loss plain / ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    for key in args.cases.split(","):
        for row in CASES[key.strip()](device, sizes):
            print(row, flush=True)
            lines.append(row)
    if args.notes:
        with open(args.notes, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
