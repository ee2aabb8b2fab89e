"""PROTOTYPE (phase 1 of issue 13, not part of the package): the fast stacked MLP kernel for
every parametrization, over a ragged ("segmented") sample layout.

Two things change against ``batched.MLPKernel``:

1. Parametrized layers: ``ParametrizedLinear`` computes ``g * (W x + b)`` with a per-job
   multiplier ``g`` (its buffer), ``ScaledReLU`` computes ``gain * relu(z)``. Both enter the
   forward pass as one multiply and the backward pass as one multiply (``gain * g`` folded into
   one per-row factor). sp models have no multipliers and compute exactly as before.
2. Mixed sample sizes: the jobs' samples lie in one flat (rows, features) buffer, jobs sorted by
   N_SAMPLES, so the jobs with the same N form a *segment* whose rows are one contiguous
   [jobs, N, features] view. The matmuls run per segment (a ``bmm`` over the segment's jobs,
   exactly the product a same-N stack computes), everything elementwise (activations, their
   backward, the loss residual, the optimizer) runs once over the whole stack. No padding: no
   wasted FLOPs, and a job's numbers are those it gets in a same-N stack, bit for bit, so they
   do not depend on which other jobs (of any N) share its stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelscape import parametrize
from modelscape.models import MLP

# activations whose backward needs only their output / their input (pre-activation)
FROM_OUTPUT = ("relu", "tanh", "identity")
FROM_INPUT = ("gelu", "silu")
_ACT_KIND = {
    nn.ReLU: "relu",
    parametrize.ScaledReLU: "relu",
    nn.Tanh: "tanh",
    nn.Identity: "identity",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
}
_LINEARS = (nn.Linear, parametrize.ParametrizedLinear)


@dataclass(frozen=True)
class Segment:
    """Stack rows ``start:stop`` all have ``n`` samples, at flat rows ``offset:offset+len*n``."""

    start: int
    stop: int
    n: int
    offset: int
    pair: bool  # a one-job segment is computed as a broadcast pair (see batched._bmm)

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + (self.stop - self.start) * self.n)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This segment's rows of a flat (rows, ...) tensor as [jobs, n, ...]."""
        return flat[self.rows].view(self.stop - self.start, self.n, *flat.shape[1:])


class Layout:
    """Where each stacked job's samples lie in the flat sample dimension.

    ``sizes[r]`` is row ``r``'s N; rows must come sorted by N (the run sorts its jobs so).
    ``pairs[r]``: whether row ``r`` computes a stack of one as a pair (its ``group_cap`` >= 2).
    """

    def __init__(self, sizes: list[int], pairs: list[bool]):
        if any(a > b for a, b in zip(sizes, sizes[1:])):
            raise ValueError("a Layout's rows must be sorted by sample count")
        self.sizes, self.pairs = list(sizes), list(pairs)
        self.segments: list[Segment] = []
        offset = start = 0
        for r in range(1, len(sizes) + 1):
            if r == len(sizes) or sizes[r] != sizes[start]:
                pair = pairs[start] and r - start == 1
                self.segments.append(Segment(start, r, sizes[start], offset, pair))
                offset += (r - start) * sizes[start]
                start = r
        self.n_rows = offset

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """A per-job [jobs] tensor repeated over each job's samples: [rows, 1]."""
        counts = torch.tensor(self.sizes, device=values.device)
        return values.repeat_interleave(counts)[:, None]

    def take(self, keep: list[int]) -> tuple[Layout, torch.Tensor]:
        """The layout of stack rows ``keep`` and the flat row index that selects their data."""
        starts = [0]
        for n in self.sizes:
            starts.append(starts[-1] + n)
        index = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in keep])
        return Layout([self.sizes[k] for k in keep], [self.pairs[k] for k in keep]), index


def _bmm(a, b, out, pair: bool):
    if pair:
        out.copy_(torch.bmm(a.expand(2, -1, -1), b.expand(2, -1, -1))[:1])
    else:
        torch.bmm(a, b, out=out)


def _baddbmm(bias, a, b, out, pair: bool):
    if pair:
        full = torch.baddbmm(bias.expand(2, -1, -1), a.expand(2, -1, -1), b.expand(2, -1, -1))
        out.copy_(full[:1])
    else:
        torch.baddbmm(bias, a, b, out=out)


class MLPKernel:
    """The built-in MLP (any parametrization) with MSE loss, forward and backward written out.

    ``layers``: (weight index, bias index or None, has a multiplier) per linear layer, readout
    last. ``gain``: ScaledReLU's gain (None for other activations).
    """

    def __init__(self, model: MLP, names: list[str]):
        index = {n: i for i, n in enumerate(names)}
        self.act = _ACT_KIND[type(model.act)]
        self.gain = model.act.gain if isinstance(model.act, parametrize.ScaledReLU) else None
        self.approximate = model.act.approximate if isinstance(model.act, nn.GELU) else "none"
        mods = [*model.hidden, model.readout]
        prefixes = [f"hidden.{k}" for k in range(len(model.hidden))] + ["readout"]
        self.layers = [
            (index[f"{p}.weight"], index.get(f"{p}.bias"), hasattr_multiplier(m))
            for p, m in zip(prefixes, mods)
        ]

    @staticmethod
    def check(model: nn.Module, loss_fn: nn.Module, y: torch.Tensor) -> bool:
        """Whether this kernel computes exactly what the job's model and loss do."""
        act = getattr(model, "act", None)
        return (
            type(model) is MLP
            and y.is_floating_point()
            and y.dim() <= 2
            and type(loss_fn) is nn.MSELoss
            and loss_fn.reduction == "mean"
            and type(act) in _ACT_KIND
            and (not isinstance(act, parametrize.ScaledReLU) or act.gain > 0)
            and all(type(m) in _LINEARS for m in [*model.hidden, model.readout])
            and not any(
                m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                for m in model.modules()
            )
        )

    # -- per-row factors, built once per stack (and again when rows leave it)

    def factors(
        self, models: list[nn.Module], gammas: torch.Tensor, layout: Layout, d_out: int
    ) -> dict[str, torch.Tensor | None]:
        """Per-row tensors [rows, 1] the kernel multiplies by; None where every factor is 1."""
        dtype, device = gammas.dtype, gammas.device
        mods = [[*m.hidden, m.readout] for m in models]
        out: dict[str, torch.Tensor | None] = {}
        for k, (_, _, has) in enumerate(self.layers):
            g = None
            if has:
                g = torch.stack([ms[k].multiplier for ms in mods]).to(dtype).to(device)
            out[f"g{k}"] = None if g is None else layout.per_row(g)
            # backward of a hidden layer: d(gain * relu(g z))/dz = gain * g * relu'
            if k < len(self.layers) - 1 and (g is not None or self.gain is not None):
                gg = g if g is not None else torch.ones_like(gammas)
                gg = gg * self.gain if self.gain is not None else gg
                out[f"back{k}"] = layout.per_row(gg)
            else:
                out[f"back{k}"] = out[f"g{k}"] if k == len(self.layers) - 1 else None
        out["gamma"] = None if bool((gammas == 1).all()) else layout.per_row(gammas)
        sizes = torch.tensor(layout.sizes, dtype=dtype, device=device)
        out["scale"] = layout.per_row(2.0 / (sizes * d_out))
        return out

    # -- forward and backward

    def _forward(self, params, X, layout: Layout, fac, keep: bool):
        h = X.reshape(X.shape[0], -1)
        saved = [h]
        n_layers = len(self.layers)
        for k, (wi, bi, _) in enumerate(self.layers):
            W = params[wi]
            z = h.new_empty(h.shape[0], W.shape[1])
            for s in layout.segments:
                Ws = W[s.start : s.stop].mT
                if bi is None:
                    _bmm(s.view(h), Ws, s.view(z), s.pair)
                else:
                    _baddbmm(params[bi][s.start : s.stop, None], s.view(h), Ws, s.view(z), s.pair)
            if fac[f"g{k}"] is not None:
                z = z * fac[f"g{k}"]
            if k == n_layers - 1:
                return z, saved
            if self.act in FROM_INPUT:
                if keep:
                    saved.append(z)
                if self.act == "gelu":
                    h = nn.functional.gelu(z, approximate=self.approximate)
                else:
                    h = nn.functional.silu(z)
            elif self.act == "relu":
                h = z.relu_() if self.gain is None else z.relu() * self.gain
            elif self.act == "tanh":
                h = z.tanh_()
            else:
                h = z
            if keep:
                saved.append(h)
        raise AssertionError("unreachable")

    def forward(self, params, X, layout: Layout, fac) -> torch.Tensor:
        return self._forward(params, X, layout, fac, keep=False)[0]

    def loss_and_grads(self, params, X, y, f0, layout: Layout, fac):
        """Per-job losses [jobs] and each job's gradients; X, y, f0 flat over samples."""
        f, saved = self._forward(params, X, layout, fac, keep=True)
        out = f if f0 is None else f - f0
        if fac["gamma"] is not None:
            out = out / fac["gamma"]
        r = out - y.reshape(f.shape)
        sq = r.square()
        losses = f.new_empty(len(layout.sizes))
        for s in layout.segments:
            torch.mean(s.view(sq), (1, 2), out=losses[s.start : s.stop])
        g = r * fac["scale"]
        if fac["gamma"] is not None:
            g = g / fac["gamma"]
        grads: list[torch.Tensor | None] = [None] * len(params)
        last = len(self.layers) - 1
        gz = g if fac[f"back{last}"] is None else g * fac[f"back{last}"]
        gh = None
        for k in range(last, -1, -1):
            wi, bi, _ = self.layers[k]
            W = params[wi]
            if k < last:
                h_out = saved.pop()
                if self.act == "gelu":
                    gz = torch.ops.aten.gelu_backward(gh, saved.pop(), approximate=self.approximate)
                elif self.act == "silu":
                    gz = torch.ops.aten.silu_backward(gh, saved.pop())
                elif self.act == "relu":
                    gz = torch.ops.aten.threshold_backward(gh, h_out, 0)
                elif self.act == "tanh":
                    gz = torch.ops.aten.tanh_backward(gh, h_out)
                else:
                    gz = gh
                if fac[f"back{k}"] is not None:
                    gz = gz * fac[f"back{k}"]
            h_in = saved[-1]
            grads[wi] = torch.empty_like(W)
            if bi is not None:
                grads[bi] = torch.empty_like(params[bi])
            if k > 0:
                gh = gz.new_empty(gz.shape[0], W.shape[2])
            for s in layout.segments:
                gzs = s.view(gz)
                _bmm(gzs.mT, s.view(h_in), None if False else grads[wi][s.start : s.stop], s.pair)
                if bi is not None:
                    torch.sum(gzs, 1, out=grads[bi][s.start : s.stop])
                if k > 0:
                    Ws = W[s.start : s.stop]
                    if W.shape[1] == 1:  # an outer product is faster as a broadcast multiply
                        torch.mul(gzs, Ws, out=s.view(gh))
                    else:
                        _bmm(gzs, Ws, s.view(gh), s.pair)
        return losses, grads


def hasattr_multiplier(module: nn.Module) -> bool:
    return type(module) is parametrize.ParametrizedLinear
