"""Model families against a plain PyTorch loop: 16 jobs (4 LR x 4 trials), online Adam, batch
64, 100 steps, CENTER off on both sides, CPU, 2 threads.

Each case trains the same architecture twice in this process: with ``run_sweep`` (stacked where
the engine can, else one job at a time; ``trained_by`` is printed) and with the loop a
researcher writes by hand (build, Adam, step 100 times, one job after the other). The sides
alternate per repeat; the ratio is the median of the repeats' time(plain) / time(modelscape),
and both sides' median test losses are printed (different seeds, the same scale).

Bounds (``arithmetic_seconds``): the matrix products, convolutions and attention kernels one
side's training steps call, each replayed alone at its shapes (warm in cache: a lower bound),
for the whole sweep: ``arith`` for modelscape's (the stacked shapes), ``arith plain`` for the
plain loop's. ``bound`` = plain s / arith: the ratio modelscape would reach if its step were
nothing but its products; a target above it is bounded by this CPU's arithmetic rate.

Cases (``CASES``; add one by adding an entry):
  transformer     the built-in Transformer (its Dropout modules, p=0), width 32, sequences 16 x 8
  cnn-bn          a user's CNN with BatchNorm (conv-BN-ReLU twice), width 16, 3x16x16, 4
                  classes, stacked (BATCHED="on")
  mlp-dropout     a user's 3-hidden-layer GELU MLP with Dropout(0.1), width 256, 64 inputs
  mlp             the same MLP without Dropout
  mlp-center      the MLP with CENTER on (the default), which the plain loop does not do
  mlp-off         the MLP with BATCHED="off": the one-job path alone
  mlp-off-auto    the same with WORKERS_PER_DEVICE="auto" (one one-thread worker per core)
  cnn, resnet     the built-in CNN and ResNet, width 16, 3x16x16, 4 classes, as the defaults
                  train them (one job at a time on the CPU, in this process)
  cnn-auto, resnet-auto, cnn-bn-auto   the same and the BatchNorm CNN, WORKERS_PER_DEVICE="auto"
                  (one job at a time, one one-thread worker per core)
  cnn-stacked, resnet-stacked   the same, stacked (BATCHED="on")

    python benchmarks/bench_models.py                        # every case, 3 repeats
    python benchmarks/bench_models.py --cases transformer,cnn-bn
    python benchmarks/bench_models.py --quick                # 10 steps, one repeat (a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modelscape import run_sweep
from modelscape.models.builtin import constructor_kwargs, resolve_model_class, standard_kwargs

LRS = [1e-3, 3e-3, 1e-2, 3e-2]
TRIALS = 4
BATCH = 64


def sequence_bfn(bsz, gen, X=None, y=None, **kwargs):
    """Sequences of 16 tokens of 8 features; the target is a product of two token means."""

    def batch_fn(step):
        Xb = torch.randn(bsz, 16, 8, generator=gen)
        return Xb, Xb[:, :, 0].mean(1) * Xb[:, :, 1].mean(1) * 4

    return batch_fn


def image_bfn(bsz, gen, X=None, y=None, **kwargs):
    """3x16x16 images in 4 classes: the signs of two channels' means."""

    def batch_fn(step):
        Xb = torch.randn(bsz, 3, 16, 16, generator=gen)
        Xb[:, :2] += torch.randn(bsz, 2, 1, 1, generator=gen)
        m = Xb[:, :2].mean((2, 3)) > 0
        return Xb, (2 * m[:, 0] + m[:, 1]).long()

    return batch_fn


def vector_bfn(bsz, gen, X=None, y=None, **kwargs):
    """64 Gaussian inputs; the target is ``x0 * x1 + 0.5 * x2``."""

    def batch_fn(step):
        Xb = torch.randn(bsz, 64, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1] + 0.5 * Xb[:, 2]

    return batch_fn


class BNCNN(nn.Module):
    """A user's CNN: conv-BN-ReLU twice, global average pooling, a linear readout."""

    def __init__(self, in_shape, d_out, width):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )  # fmt: skip
        self.readout = nn.Linear(width, d_out)

    def forward(self, x):
        return self.readout(self.body(x).mean((2, 3)))


class UserMLP(nn.Module):
    """A user's MLP class: three hidden GELU layers with biases, optional Dropout."""

    def __init__(self, d_in, d_out, width, dropout=0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for a in (d_in, width, width):
            layers += [nn.Linear(a, width), nn.GELU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.readout = nn.Linear(width, d_out)

    def forward(self, x):
        return self.readout(self.body(x))


@dataclass(frozen=True)
class Case:
    model: str | type[nn.Module]
    bfn: Callable
    width: int
    depth: int = 2
    loss: str = "MSELoss"
    d_out: int = 1
    extra: dict = field(default_factory=dict)  # more config keys (model arguments, BATCHED)


ON = {"BATCHED": "on"}  # stacked even where BATCHED="auto" trains one job at a time
OFF = {"BATCHED": "off"}
AUTO = {"WORKERS_PER_DEVICE": "auto"}
CE = {"loss": "CrossEntropyLoss", "d_out": 4}

CASES = {
    "transformer": Case("Transformer", sequence_bfn, 32),
    "cnn-bn": Case(BNCNN, image_bfn, 16, **CE, extra=ON),
    "mlp-dropout": Case(UserMLP, vector_bfn, 256, extra={"DROPOUT": 0.1}),
    "mlp": Case(UserMLP, vector_bfn, 256),
    "mlp-center": Case(UserMLP, vector_bfn, 256, extra={"CENTER": True}),
    "mlp-off": Case(UserMLP, vector_bfn, 256, extra=OFF),
    "mlp-off-auto": Case(UserMLP, vector_bfn, 256, extra={**OFF, **AUTO}),
    "cnn": Case("CNN", image_bfn, 16, **CE),
    "cnn-stacked": Case("CNN", image_bfn, 16, **CE, extra=ON),
    "resnet": Case("ResNet", image_bfn, 16, **CE),
    "resnet-stacked": Case("ResNet", image_bfn, 16, **CE, extra=ON),
    "cnn-auto": Case("CNN", image_bfn, 16, **CE, extra=AUTO),
    "resnet-auto": Case("ResNet", image_bfn, 16, **CE, extra=AUTO),
    "cnn-bn-auto": Case(BNCNN, image_bfn, 16, **CE, extra=AUTO),
}


def config(case: Case, steps: int) -> dict:
    return {
        "MODEL_CLASS": case.model,
        "WIDTH": case.width,
        "DEPTH": case.depth,
        "NONLINEARITY": "relu" if case.model != "Transformer" else "gelu",
        "BIAS": True,
        "PARAMETRIZATION": "sp",
        "OPTIMIZER": "Adam",
        "LOSS": case.loss,
        "D_OUT": case.d_out if case.loss == "CrossEntropyLoss" else None,
        "ONLINE": True,
        "CENTER": False,
        "N_SAMPLES": BATCH,
        "N_TEST": 512,
        "MAX_ITER": steps,
        "LOSS_CHECKPOINTS": [1e-12],  # never reached: every job trains every step
        "DTYPE": "float32",
        "DEVICES": ["cpu"],
        **case.extra,
    }


def modelscape_side(case: Case, steps: int) -> tuple[float, list[float], set[str]]:
    start = time.perf_counter()
    result = run_sweep(
        [list(range(TRIALS)), LRS],
        ["trial", "LR"],
        config(case, steps),
        {"base_bfn": case.bfn},
        progress=False,
    )
    seconds = time.perf_counter() - start
    return seconds, [r.test_loss for r in result.records], {r.trained_by for r in result.records}


def plain_side(case: Case, steps: int, jobs: int | None = None) -> tuple[float, list[float]]:
    """The hand-written loop: each job built, trained and tested on its own (the first
    ``jobs`` of them; all by default)."""
    start = time.perf_counter()
    cfg = config(case, steps)
    losses = []
    for trial, lr in [(t, lr) for t in range(TRIALS) for lr in LRS][:jobs]:
        gen = torch.Generator().manual_seed(1000 + trial)
        X_te, y_te = case.bfn(cfg["N_TEST"], gen)(0)
        draw = case.bfn(BATCH, gen)
        cls = resolve_model_class(case.model)
        d_out = case.d_out
        kwargs = standard_kwargs(
            tuple(X_te.shape[1:]), d_out, case.width, case.depth, cfg["NONLINEARITY"], True
        )
        torch.manual_seed(trial)
        model = cls(**constructor_kwargs(cls, kwargs, cfg))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = getattr(nn, case.loss)()
        squeeze = case.loss == "MSELoss"
        for step in range(steps):
            X, y = draw(step)
            out = model(X)
            loss = loss_fn(out.squeeze(-1) if squeeze else out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(X_te)
            losses.append(float(loss_fn(out.squeeze(-1) if squeeze else out, y_te)))
    return time.perf_counter() - start, losses


ARITHMETIC = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward")


class _Products(TorchDispatchMode):
    """Records every product, convolution and attention call (op, arguments) that runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ARITHMETIC or name.startswith("_scaled_dot_product"):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _signature(call: tuple) -> tuple:
    func, args, _ = call
    return func, tuple(tuple(a.shape) if torch.is_tensor(a) else repr(a) for a in args)


def _replay_seconds(call: tuple, repeats: int = 5) -> float:
    """The time one recorded call takes, replayed ``repeats`` times on copies of its tensors."""
    own = lambda t: t.detach().clone() if torch.is_tensor(t) else t  # noqa: E731
    func, args, kwargs = call
    args, kwargs = torch.utils._pytree.tree_map(own, (args, kwargs))
    with torch.no_grad():  # replayed without autograd: its bookkeeping is not arithmetic
        func(*args, **kwargs)
        start = time.perf_counter()
        for _ in range(repeats):
            func(*args, **kwargs)
    return (time.perf_counter() - start) / repeats


def arithmetic_seconds(case: Case, steps: int, plain: bool) -> float:
    """The seconds the products of ``steps`` training steps of the sweep take alone (see the
    module's docstring). The calls are recorded over runs of 4 and 2 steps; the calls the
    longer run makes more often are two steps' (setup and the final test evaluation cancel),
    each distinct op and shapes timed once. The plain loop's for one job, times the jobs."""
    counts: list[dict[tuple, list]] = []
    for n in (4, 2):
        with _Products() as rec:
            if plain:
                plain_side(case, n, jobs=1)
            else:  # in this process, where the recorder sees them (two threads, no workers)
                here = {**case.extra, "WORKERS_PER_DEVICE": 1}
                modelscape_side(dataclasses.replace(case, extra=here), n)
        seen: dict[tuple, list] = {}
        for call in rec.calls:
            seen.setdefault(_signature(call), [call, 0])[1] += 1
        counts.append(seen)
    two_steps = 0.0
    for sig, (call, count) in counts[0].items():
        extra = count - counts[1].get(sig, [None, 0])[1]
        if extra > 0:
            two_steps += extra * _replay_seconds(call)
    jobs = TRIALS * len(LRS) if plain else 1
    return two_steps / 2 * steps * jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10 steps, one repeat")
    args = parser.parse_args()
    steps, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
    torch.set_num_threads(args.threads)
    print(
        f"{TRIALS * len(LRS)} jobs, {steps} steps, {args.threads} threads, torch "
        f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}"
    )
    head = (
        f"{'case':>12} {'plain s':>8} {'ms s':>8} {'ratio':>6} {'arith':>6} {'plain':>6} "
        f"{'bound':>6} {'plain loss':>11} {'ms loss':>9}"
    )
    print(f"{head}  trained_by")
    for name in args.cases.split(","):
        case = CASES[name]
        ratios, plain_t, ms_t = [], [], []
        for _ in range(repeats):  # paired: both sides in each repeat, alternating
            p_s, p_loss = plain_side(case, steps)
            m_s, m_loss, how = modelscape_side(case, steps)
            ratios.append(p_s / m_s)
            plain_t.append(p_s)
            ms_t.append(m_s)
        arith = arithmetic_seconds(case, steps, plain=False)
        arith_plain = arithmetic_seconds(case, steps, plain=True)
        plain_s = statistics.median(plain_t)
        print(
            f"{name:>12} {plain_s:8.2f} {statistics.median(ms_t):8.2f} "
            f"{statistics.median(ratios):5.2f}x {arith:6.2f} {arith_plain:6.2f} "
            f"{plain_s / arith:5.2f}x {statistics.median(p_loss):11.4g} "
            f"{statistics.median(m_loss):9.4g}  {', '.join(sorted(how))}"
        )


if __name__ == "__main__":
    main()
