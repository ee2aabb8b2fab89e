"""The canonical sweep benchmark: modelscape against a hand-written PyTorch loop, side by side.

The sweep (issue 5): offline Gaussian inputs in d=32 with target ``x0*x1``; an MLP of DEPTH=2,
PARAMETRIZATION sp, SGD at LR 0.1, MSE loss; N_SAMPLES in {64, 128, 256, 512} with 4 trials
each; MAX_ITER 500 with an unreachable threshold, so every job runs all its steps; N_TEST 1000,
ONLYTHRESHOLDS True, CENTER False. Three cases: width 64 offline, width 256 offline, width 64
online (LR 0.05, a fresh batch of N_SAMPLES every step).

The baseline trains the same sweep in this process the way a researcher writes it: one model at
a time, ``opt.zero_grad(); loss.backward(); opt.step()``, the test loss only at the end. It
takes each job's data and initial weights from ``engine.setup_job``, so both sides train the
same models on the same numbers and their median test losses agree to float rounding.

Printed per case: time(plain) / time(modelscape), the achieved GFLOP/s of each (6 x samples x
weights per step) as a fraction of this machine's float32 GEMM peak (measured here), and the
median final test loss of each. Timings are the best of ``--repeats`` interleaved runs, since
other processes may share the machine.

    python benchmarks/bench_sweep.py            # all three cases
    python benchmarks/bench_sweep.py --quick    # 100 steps, one repeat (a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import modelscape
from modelscape import engine
from modelscape.demo import quadratic_bfn
from modelscape.runner import plan

D = 32
SAMPLES = (64, 128, 256, 512)
TRIALS = 4
N_TEST = 1000


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    online: bool
    lr: float


CASES = (
    Case("width 64, offline", 64, False, 0.1),
    Case("width 256, offline", 256, False, 0.1),
    Case("width 64, online", 64, True, 0.05),
)


def weights(width: int) -> int:
    return D * width + width * width + width


def sweep_flop(case: Case, steps: int) -> float:
    """6 x samples x weights per step (forward 2, backward 4), summed over the sweep."""
    return 6.0 * weights(case.width) * steps * TRIALS * sum(SAMPLES)


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


def sweep_config(case: Case, steps: int) -> dict:
    return {
        "ONLINE": case.online,
        "WIDTH": case.width,
        "DEPTH": 2,
        "PARAMETRIZATION": "sp",
        "OPTIMIZER": "SGD",
        "LR": case.lr,
        "LOSS": "MSELoss",
        "MAX_ITER": steps,
        "LOSS_CHECKPOINTS": [0.0],  # the EMA of a squared error never goes below 0
        "N_TEST": N_TEST,
        "ONLYTHRESHOLDS": True,
        "CENTER": False,
        "DEVICES": ["cpu"],
    }


AXES = ([list(SAMPLES), range(TRIALS)], ["ntrain", "trial"])
BFN = {"base_bfn": quadratic_bfn, "d": D}


def run_modelscape(case: Case, steps: int) -> tuple[float, float]:
    """(seconds, median test loss) of the sweep through modelscape's public API."""
    start = time.perf_counter()
    result = modelscape.run_sweep(*AXES, sweep_config(case, steps), BFN, progress=False)
    seconds = time.perf_counter() - start
    assert all(r.steps == steps and r.status == "ok" for r in result.records)
    return seconds, statistics.median(r.test_loss for r in result.records)


def run_plain(case: Case, steps: int) -> tuple[float, float]:
    """(seconds, median test loss) of the same sweep as a hand-written loop.

    Each job's data and initial weights come from ``engine.setup_job``, exactly as modelscape
    draws them, so both sides train the same models on the same numbers and their test losses
    must agree to float rounding; the training loop itself is plain PyTorch.
    """
    start = time.perf_counter()
    _, _, jobs, spec = plan(*AXES, sweep_config(case, steps), BFN)
    losses = []
    for job in jobs:
        problem = engine.setup_job(job, spec, torch.device("cpu"))
        model = problem.model
        opt = torch.optim.SGD(model.parameters(), lr=case.lr)
        X, y = problem.X_tr, problem.y_tr
        for step in range(steps):
            if case.online:
                X, y = problem.batch_fn(step)
            loss = nn.functional.mse_loss(model(X).squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            test = nn.functional.mse_loss(model(problem.X_te).squeeze(-1), problem.y_te)
        losses.append(test.item())
    return time.perf_counter() - start, statistics.median(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="MAX_ITER of every job")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side")
    parser.add_argument("--quick", action="store_true", help="100 steps, one repeat")
    args = parser.parse_args()
    steps, repeats = (100, 1) if args.quick else (args.steps, args.repeats)
    peak = gemm_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"float32 GEMM peak (2048^3): {peak:.1f} GFLOP/s")
    print(f"{len(SAMPLES) * TRIALS} jobs per case, {steps} steps each\n")
    header = (
        f"{'case':20s} {'plain s':>8s} {'ms s':>7s} {'ratio':>6s} "
        f"{'plain %pk':>9s} {'ms %pk':>7s} {'plain loss':>10s} {'ms loss':>8s}"
    )
    print(header)
    for case in CASES:
        plain, ms = [], []
        for _ in range(repeats):
            plain.append(run_plain(case, steps))
            ms.append(run_modelscape(case, steps))
        t_plain, loss_plain = min(plain)
        t_ms, loss_ms = min(ms)
        gflop = sweep_flop(case, steps) / 1e9
        print(
            f"{case.name:20s} {t_plain:8.2f} {t_ms:7.2f} {t_plain / t_ms:5.2f}x "
            f"{gflop / t_plain / peak:9.1%} {gflop / t_ms / peak:7.1%} "
            f"{loss_plain:10.4f} {loss_ms:8.4f}"
        )


if __name__ == "__main__":
    main()
