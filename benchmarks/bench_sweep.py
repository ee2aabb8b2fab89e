"""Sweep benchmarks: modelscape against a hand-written PyTorch loop, side by side in one run.

The canonical sweep: offline Gaussian inputs in d=32 with target ``x0*x1``; an MLP of
DEPTH=2, SGD, MSE loss; N_SAMPLES in {64, 128, 256, 512} with 4 trials each; MAX_ITER 500 with
an unreachable threshold, so every job runs all its steps; N_TEST 1000, ONLYTHRESHOLDS True.
Cases (``--cases`` picks some by key):

- ``w64``, ``w256``, ``online``: PARAMETRIZATION sp, LR 0.1, CENTER off; width 64 offline,
  width 256 offline, width 64 online (LR 0.05, a fresh batch of N_SAMPLES every step);
- ``hea``: the HEA workload, muP with GAMMA=10, online SGD (LR 0.05), width 256, biases,
  CENTER on, the same 16-job N x trial grid;
- ``ntp-adam``: NTP, Adam (LR 0.02), offline, width 256, CENTER on, the same grid;
- ``mixed``: 4 GAMMA x 4 LR x 2 trials in one sweep, muP, offline N_SAMPLES 256, width 128,
  CENTER on.

The baseline trains the same jobs in this process the way a researcher writes it: one model at
a time, ``opt.zero_grad(); loss.backward(); opt.step()``, the test loss only at the end. Each
job's data, initial weights, parametrized model and torch optimizer (with its per-layer LRs and
GAMMA's LR factor) come from ``engine.setup_job``, so both sides train the same models on the
same numbers and their median test losses agree to float rounding.

Printed per case: time(plain) / time(modelscape) from the best time of each side; the median
(and range) of the ratios of each repeat's two back-to-back runs; the achieved GFLOP/s of each
(6 x samples x weights per step, plus 2 x for the initial model's forward in online centering)
as a fraction of this machine's float32 GEMM peak (measured here); how long the sweep's
matrix products alone take at the stacked shapes (``gemm_seconds``) and which share of
modelscape's time that is; the median final test loss of each.
Timings are the best of ``--repeats`` interleaved runs, since other processes may share the
machine; the load average is printed with the table. Both sides run under the allocator
settings a sweep sets for its process (``engine.allocator``), set before the first run.

    python benchmarks/bench_sweep.py                    # every case
    python benchmarks/bench_sweep.py --cases hea,mixed  # some of them
    python benchmarks/bench_sweep.py --quick            # 100 steps, one repeat (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import modelscape
from modelscape import engine
from modelscape.cli.demo import quadratic_bfn
from modelscape.engine.allocator import keep_freed_memory
from modelscape.runner import plan

D = 32
SAMPLES = (64, 128, 256, 512)
TRIALS = 4
N_TEST = 1000
GRID = ([list(SAMPLES), list(range(TRIALS))], ["ntrain", "trial"])
MIXED_GRID = ([[0.5, 1.0, 2.0, 4.0], [0.0125, 0.025, 0.05, 0.1], [0, 1]], ["GAMMA", "LR", "trial"])
BFN = {"base_bfn": quadratic_bfn, "d": D}


@dataclass(frozen=True)
class Case:
    """One benchmark sweep: its axes and the hyperparameters that differ from the canonical."""

    key: str
    name: str
    width: int
    online: bool
    hparams: dict[str, Any] = field(default_factory=dict)
    axes: tuple = GRID


CASES = (
    Case("w64", "width 64, offline", 64, False, {"LR": 0.1}),
    Case("w256", "width 256, offline", 256, False, {"LR": 0.1}),
    Case("online", "width 64, online", 64, True, {"LR": 0.05}),
    Case(
        "hea",
        "HEA-like (muP, G=10)",
        256,
        True,
        {"PARAMETRIZATION": "mup", "GAMMA": 10.0, "LR": 0.05, "BIAS": True, "CENTER": True},
    ),
    Case(
        "ntp-adam",
        "NTP + Adam, w256",
        256,
        False,
        {"PARAMETRIZATION": "ntp", "OPTIMIZER": "Adam", "LR": 0.02, "CENTER": True},
    ),
    Case(
        "mixed",
        "mixed GAMMA x LR, w128",
        128,
        False,
        {"PARAMETRIZATION": "mup", "N_SAMPLES": 256, "CENTER": True},
        MIXED_GRID,
    ),
)


def weights(width: int) -> int:
    return D * width + width * width + width


def sweep_config(case: Case, steps: int) -> dict:
    return {
        "ONLINE": case.online,
        "WIDTH": case.width,
        "DEPTH": 2,
        "PARAMETRIZATION": "sp",
        "OPTIMIZER": "SGD",
        "LOSS": "MSELoss",
        "MAX_ITER": steps,
        "LOSS_CHECKPOINTS": [0.0],  # the EMA of a squared error never goes below 0
        "N_TEST": N_TEST,
        "ONLYTHRESHOLDS": True,
        "CENTER": False,
        "DEVICES": ["cpu"],
        **case.hparams,
    }


def jobs_of(case: Case, steps: int):
    _, _, jobs, spec = plan(*case.axes, sweep_config(case, steps), BFN)
    return jobs, spec


def sweep_flop(case: Case, steps: int) -> float:
    """6 x samples x weights per step (forward 2, backward 4), summed over the sweep; online
    centering adds the initial model's forward (2 x)."""
    per_sample = 8.0 if case.online and sweep_config(case, steps)["CENTER"] else 6.0
    jobs, _ = jobs_of(case, steps)
    return per_sample * weights(case.width) * steps * sum(j.hp.N_SAMPLES for j in jobs)


def gemm_peak() -> float:
    """This machine's float32 matrix-multiply rate in GFLOP/s (best of several 2048^3 runs)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def gemm_seconds(case: Case, steps: int, timed: int = 20) -> float:
    """How long the sweep's matrix products alone take at the stacked engine's shapes.

    Per step and sample count n (k jobs): each layer's forward product [k, n, fan_in] x
    [k, fan_in, fan_out] (twice with online centering: the initial model's forward), its
    weight gradient and, above the readin, its input gradient; timed over ``timed`` steps on
    the same tensors (so warm in cache: a lower bound) and scaled to ``steps``. The ratio of
    this to modelscape's time is the share of the GEMM rate the engine achieves.
    """
    jobs, _ = jobs_of(case, steps)
    counts: dict[int, int] = {}
    for job in jobs:
        counts[job.hp.N_SAMPLES] = counts.get(job.hp.N_SAMPLES, 0) + 1
    dims = [D, case.width, case.width, 1]  # DEPTH 2
    forwards = 2 if case.online and sweep_config(case, steps)["CENTER"] else 1
    work = []
    for n, k in counts.items():
        for layer, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
            a, w, g = (
                torch.randn(k, n, fan_in),
                torch.randn(k, fan_out, fan_in),
                torch.randn(k, n, fan_out),
            )
            work.append((a, w, g, layer > 0))

    def step() -> None:
        for a, w, g, input_grad in work:
            for _ in range(forwards):
                torch.bmm(a, w.mT)
            torch.bmm(g.mT, a)
            if input_grad:
                torch.bmm(g, w)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    return (time.perf_counter() - start) * steps / timed


def run_modelscape(case: Case, steps: int) -> tuple[float, float]:
    """(seconds, median test loss) of the sweep through modelscape's public API."""
    start = time.perf_counter()
    result = modelscape.run_sweep(*case.axes, sweep_config(case, steps), BFN, progress=False)
    seconds = time.perf_counter() - start
    bad = [
        (r.key, r.status, r.steps) for r in result.records if r.status != "ok" or r.steps != steps
    ]
    assert not bad, f"{case.key}: jobs that did not run all {steps} steps: {bad}"
    return seconds, statistics.median(r.test_loss for r in result.records)


def train_plain(problem: engine.Problem, steps: int, autocast: torch.dtype | None = None) -> float:
    """Train one job as a hand-written loop; its final test loss.

    The model, its torch optimizer (per-layer LRs of the parametrization, GAMMA's factor), the
    data and the centering offsets are the job's own; the output is ``(f(x) - f_0(x)) / GAMMA``
    as modelscape trains it. ``autocast``: run the forward pass and loss under
    ``torch.autocast`` in that dtype (mixed precision, as a researcher would write it).
    """
    model, opt, gamma = problem.model, problem.opt, problem.gamma
    X, y, f0 = problem.X_tr, problem.y_tr, problem.f0_tr
    for step in range(steps):
        if problem.batch_fn is not None:
            X, y = problem.batch_fn(step)
            if problem.model0 is not None:
                with torch.no_grad():
                    f0 = problem.model0(X)
        with torch.autocast(X.device.type, autocast or torch.float32, enabled=bool(autocast)):
            out = model(X)
            if f0 is not None:
                out = out - f0
            loss = nn.functional.mse_loss((out / gamma).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(problem.X_te)
        if problem.f0_te is not None:
            out = out - problem.f0_te
        return nn.functional.mse_loss((out / gamma).squeeze(-1), problem.y_te).item()


def run_plain(case: Case, steps: int) -> tuple[float, float]:
    """(seconds, median test loss) of the same sweep as a hand-written loop."""
    start = time.perf_counter()
    jobs, spec = jobs_of(case, steps)
    losses = [train_plain(engine.setup_job(job, spec, torch.device("cpu")), steps) for job in jobs]
    return time.perf_counter() - start, statistics.median(losses)


def select(keys: str | None) -> list[Case]:
    if not keys:
        return list(CASES)
    known = {c.key: c for c in CASES}
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(known)}")
    return [known[k] for k in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="MAX_ITER of every job")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side")
    parser.add_argument("--quick", action="store_true", help="100 steps, one repeat")
    parser.add_argument(
        "--cases", help="comma-separated case keys: " + ", ".join(c.key for c in CASES)
    )
    args = parser.parse_args()
    cases = select(args.cases)
    # modelscape keeps freed memory for reuse (engine/allocator.py), for the rest of the
    # process once a sweep ran; set it first, so that both sides run under the same allocator
    keep_freed_memory()
    steps, repeats = (100, 1) if args.quick else (args.steps, args.repeats)
    peak = gemm_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"float32 GEMM peak (2048^3): {peak:.1f} GFLOP/s")
    print(f"{steps} steps per job; load average at start {os.getloadavg()[0]:.1f}\n")
    print(
        f"| {'case':24s} | jobs | {'plain s':>8s} | {'ms s':>7s} | {'ratio':>6s} | "
        f"{'paired ratios':>19s} | {'plain %pk':>9s} | {'ms %pk':>7s} | {'GEMM s':>6s} | "
        f"{'ms GEMM share':>13s} | {'plain loss':>10s} | {'ms loss':>8s} |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        plain, ms = [], []
        for _ in range(repeats):
            plain.append(run_plain(case, steps))
            ms.append(run_modelscape(case, steps))
        t_plain, loss_plain = min(plain)
        t_ms, loss_ms = min(ms)
        # each repeat's two runs are seconds apart, so their ratio is what a shared machine's
        # changing speed disturbs least
        paired = sorted(p[0] / m[0] for p, m in zip(plain, ms))
        spread = f"{statistics.median(paired):.2f}x ({paired[0]:.2f}-{paired[-1]:.2f})"
        gflop = sweep_flop(case, steps) / 1e9
        n_jobs = len(jobs_of(case, steps)[0])
        gemm = gemm_seconds(case, steps)
        print(
            f"| {case.name:24s} | {n_jobs:4d} | {t_plain:8.2f} | {t_ms:7.2f} | "
            f"{t_plain / t_ms:5.2f}x | {spread:>19s} | {gflop / t_plain / peak:9.1%} | "
            f"{gflop / t_ms / peak:7.1%} | {gemm:6.2f} | {gemm / t_ms:13.1%} | "
            f"{loss_plain:10.4f} | {loss_ms:8.4f} |",
            flush=True,
        )
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
