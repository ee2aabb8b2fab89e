"""Dropout and BatchNorm in either engine: the job's own mask stream, and which modules stack.

Dropout: the masks of ``nn.Dropout`` modules (that class exactly, ``p > 0``) come from the job's
own stream, not from torch's global generator. At the job's step ``t`` a generator seeded from
the job's ``SubSeeds.dropout`` and ``t`` (``step_seed``) draws that step's masks, in the order
the forward pass calls its Dropout modules. The one-job loop (``own_dropout``) and a stack
(``StackDropout``, inside ``kernels.FuncKernel``) draw the same masks with the same generator
calls, so a job's masks depend on its seed and step only: a window's replay, a resumed run and a
job that joined a running stack at another step all take the same masks. A mask keeps the
entries where a float32 uniform draw (``torch.rand``) is below ``1 - p``: on the CPU the same
for every thread count, dtype and build (torch's own generator; MKL's ``bernoulli_``, which
``F.dropout`` uses, took 1.7x as long and differs between builds); a CUDA generator draws other
masks for the same seed than the CPU's (reproducible on the GPU).

A Dropout module in training mode is run as in evaluation mode (it returns its input) while a
forward hook multiplies its input by the mask, ``bernoulli(1 - p) / (1 - p)``: what
``F.dropout`` computes (the same distribution), with the job's generator. The hooks and the
modes are put back after the step (the one-job loop), or live in the stack's own copy of the
model.

BatchNorm (1d/2d/3d) stacks as it is: under ``vmap`` each job normalizes over its own batch and
updates its own running statistics, which are the stack's per-job buffers (``Stack.data``),
copied with the parameters into the job's module for evaluation and checkpoints, and into the
snapshot a window's replay starts from.

Randomness the hooks cannot see (``F.dropout`` in a user's ``forward``, attention dropout,
AlphaDropout) keeps torch's global generator: ``refusal`` and ``probe`` keep such models one
job at a time, with the reason in ``trained_by``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# Stateful modules the stacked engine does not reproduce: their models train one job at a time.
REFUSED = (
    nn.SyncBatchNorm,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Call = tuple[tuple[int, ...], float]  # one Dropout call of a forward pass: input shape, p


def refusal(model: nn.Module) -> str | None:
    """Why the model's stateful modules cannot stack, or None when they can."""
    refused = {type(m).__name__ for m in model.modules() if isinstance(m, REFUSED)}
    refused |= {
        type(m).__name__
        for m in model.modules()
        if isinstance(m, nn.Dropout) and type(m) is not nn.Dropout
    }
    if refused:
        return f"the model has {', '.join(sorted(refused))} layers (no stacked version)"
    if any(
        isinstance(m, BATCH_NORMS) and m.training and m.momentum is None for m in model.modules()
    ):
        return "the model has BatchNorm with momentum=None (a cumulative average)"
    return None


def stream_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """The Dropout modules whose masks come from the job's stream (training mode, ``p > 0``)."""
    return [m for m in model.modules() if type(m) is nn.Dropout and m.training and m.p > 0]


def step_seed(seed: int, step: int) -> int:
    """The seed of a job's Dropout generator at its step ``step`` (a splitmix64 of both)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(step_seed(seed, step))


def draw_mask(gen: torch.Generator, shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """One Dropout mask, ``bernoulli(1 - p) / (1 - p)`` in ``like``'s dtype and device: 1 where
    a float32 uniform draw of ``gen`` is below ``1 - p`` (see the module's docstring)."""
    keep = 1 - p
    mask = torch.rand(shape, generator=gen, dtype=torch.float32, device=like.device).lt_(keep)
    return mask.to(like.dtype).div_(keep)


@contextlib.contextmanager
def own_dropout(
    model: nn.Module, seed: int, step: int, modules: Sequence[nn.Dropout] | None = None
) -> Iterator[None]:
    """While the block runs, the model's Dropout modules (``modules``, found when None) take
    their masks from the job's stream at ``step`` (the one-job loop's forward pass)."""
    modules = stream_dropouts(model) if modules is None else modules
    if not modules:
        yield
        return
    gen = None

    def hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        nonlocal gen
        x = args[0]
        if gen is None:
            gen = generator(seed, step, x.device)
        return x * draw_mask(gen, x.shape, module.p, x)

    handles = [m.register_forward_hook(hook) for m in modules]
    for m in modules:
        m.training = False  # its own forward returns the input; the hook applies the mask
    try:
        yield
    finally:
        for m, handle in zip(modules, handles):
            m.training = True
            handle.remove()


class StackDropout:
    """The Dropout of a stack's own copy of the model: ``calls`` (recorded by ``probe``) says
    which masks a forward pass takes; ``masks`` draws them for every job of the stack, and
    ``applying`` hands them to the forward pass inside ``vmap`` (each job its own)."""

    def __init__(self, module: nn.Module):
        self.modules = stream_dropouts(module)
        for m in self.modules:
            m.register_forward_hook(self._hook)
            m.training = False
        self.calls: list[Call] = []
        self._record: list[Call] | None = None
        self._pending: Iterator[torch.Tensor] | None = None

    def _hook(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor | None:
        if self._pending is not None:
            return args[0] * next(self._pending)
        if self._record is not None:
            self._record.append((tuple(args[0].shape), module.p))
        return None

    def probe(self, run_pair) -> str | None:
        """Record the Dropout calls of one forward pass (``run_pair()`` runs it under ``vmap``
        on two jobs); the reason the model cannot stack when it draws other random numbers.
        A forward pass that fails otherwise is left to fail the stack's first step, as any
        model ``vmap`` cannot run does."""
        self._record = []
        try:
            with torch.no_grad():
                run_pair()
        except Exception as err:  # noqa: BLE001 - another failure fails the first step as before
            if "randomness" not in str(err):
                return None
            return (
                "the model draws random numbers in its forward pass outside nn.Dropout "
                "modules (F.dropout, attention dropout, noise)"
            )
        finally:
            self.calls, self._record = self._record, None
        return None

    def masks(self, seeds: Sequence[int], steps: Sequence[int], like: torch.Tensor):
        """Every call's masks [jobs, ...], job ``j`` at its own step ``steps[j]``."""
        if not self.calls:
            return ()
        per_job = []
        for seed, step in zip(seeds, steps):
            gen = generator(seed, step, like.device)
            per_job.append([draw_mask(gen, shape, p, like) for shape, p in self.calls])
        return tuple(torch.stack(ms) for ms in zip(*per_job))

    @contextlib.contextmanager
    def applying(self, masks: tuple) -> Iterator[None]:
        self._pending = iter(masks)
        try:
            yield
        finally:
            self._pending = None
