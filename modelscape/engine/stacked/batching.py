"""How a stack's forward pass runs its operations batched over the jobs, inside ``vmap``.

``torch.func.vmap`` runs most operations once for the whole stack. A few that matter for common
models do not run well, and ``batched_operations`` replaces them while a stack's step runs:

- **Linear layers with a bias.** ``vmap``'s rule for ``F.linear`` is a batched product and an
  out-of-place add of each job's bias: a second pass over the output and a fresh tensor the
  size of the activations. ``_linear`` adds the bias in place into the product (the same
  numbers): 1-3.5% of a stacked Transformer's or MLP's step (``benchmarks/NOTES.md``).
- **Attention.** torch's fused CPU attention kernel (behind ``F.scaled_dot_product_attention``,
  which ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` call) has no batching rule:
  ``vmap`` would run it once per job, warning each time. The math backend (matrix products and
  a softmax) batches; a stack computes attention with it (``sdpa_kernel``). The one-job loop
  keeps the fused kernel; the two agree to float rounding. (Folding the jobs into the fused
  kernel's batch was measured slower at these sizes: its CPU backward is 4.7 ms a call where
  the math backend's products take a fraction of that.)
- **Self-attention of ``nn.MultiheadAttention``** without masks or attention weights (what a
  Transformer encoder layer asks for) runs as ``_self_attention``: the same products without
  ``F.multi_head_attention_forward``'s copies of the packed projection into separate
  contiguous q, k, v (and their zero-filled gradients), nor the math backend's checks for
  fully masked rows, which cannot occur without a mask. Any other call runs torch's own code.
- **BatchNorm.** ``vmap``'s rule for ``F.batch_norm`` with per-job weights normalizes without
  them, then multiplies and adds them in separate passes over the activations, forward and
  backward. ``StackedBatchNorm`` instead folds the jobs into the channels: a stack's input
  [jobs, n, C, ...] is one batch norm of [n, jobs * C, ...] channels, with each job's weight,
  bias and running statistics as its channels' (each job normalizes over its own samples,
  exactly as alone). The running statistics are updated in place in the stack's buffers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from modelscape.engine.stateful import BATCH_NORMS


def has_batch_norm(module: nn.Module) -> bool:
    """Whether the model has BatchNorm1d/2d/3d layers (their stacks fold jobs into channels)."""
    return any(isinstance(m, BATCH_NORMS) for m in module.modules())


def has_attention(module: nn.Module) -> bool:
    """Whether the model has ``nn.MultiheadAttention`` layers (``_self_attention``)."""
    return any(isinstance(m, nn.MultiheadAttention) for m in module.modules())


@contextlib.contextmanager
def batched_operations(norms: bool, attention: bool) -> Iterator[None]:
    """While a stack runs under ``vmap``: linear layers' biases added in place (``_linear``),
    attention by its math backend, BatchNorm folded into channels (``norms``: the model has
    BatchNorm layers, ``has_batch_norm``), self-attention of ``nn.MultiheadAttention`` as
    ``_self_attention`` (``attention``: ``has_attention``)."""
    mode = _Batched(norms, attention)
    with sdpa_kernel(SDPBackend.MATH), mode:
        yield


class _Batched(TorchFunctionMode):
    """Sends ``F.linear`` to ``_linear``, ``F.batch_norm`` to ``StackedBatchNorm`` and plain
    self-attention to ``_self_attention``; every other call runs as it is."""

    def __init__(self, norms: bool, attention: bool):
        super().__init__()
        self.norms, self.attention = norms, attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # first: most calls of most stacked models are this one
            return _linear(*args, **kwargs)
        if func is F.batch_norm and self.norms:
            return _batch_norm(*args, **kwargs)
        if func is F.multi_head_attention_forward and self.attention:
            call = _MHA.bind(*args, **kwargs)
            call.apply_defaults()
            if _plain_self_attention(call.arguments):
                return _self_attention(**call.arguments)
        return func(*args, **kwargs)


_MHA = inspect.signature(F.multi_head_attention_forward)


def _linear(input, weight, bias=None):
    """``F.linear`` per job (inside ``vmap``), its bias added in place: ``vmap``'s rule adds it
    out of place, one more pass and a fresh activation-sized tensor each call. The same
    numbers: a product, then the bias added once."""
    if bias is None or weight.dim() != 2:
        return F.linear(input, weight, bias)
    out = torch.matmul(input, weight.transpose(0, 1))
    if out.shape != torch.broadcast_shapes(out.shape, bias.shape):
        return out + bias  # the bias would broadcast the product: only out of place
    try:
        return out.add_(bias)
    except RuntimeError:  # a product shared by the jobs (inputs and weight) and a per-job bias
        return out + bias


def _plain_self_attention(a: dict) -> bool:
    """Whether a ``F.multi_head_attention_forward`` call is self-attention with the packed
    projection, without masks, attention weights, dropout or extra keys."""
    q = a["query"]
    return (
        q is a["key"] is a["value"]
        and q.dim() == 3
        and q.shape[-1] == a["embed_dim_to_check"]
        and q.shape[-1] % a["num_heads"] == 0
        and a["in_proj_weight"] is not None
        and not a["use_separate_proj_weight"]
        and a["bias_k"] is None
        and a["bias_v"] is None
        and not a["add_zero_attn"]
        and (a["dropout_p"] == 0 or not a["training"])
        and a["key_padding_mask"] is None
        and a["attn_mask"] is None
        and not a["is_causal"]
        and not a["need_weights"]
        and a["static_k"] is None
        and a["static_v"] is None
    )


def _self_attention(query, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                    out_proj_bias, **_):  # fmt: skip
    """``F.multi_head_attention_forward`` of a ``_plain_self_attention`` call, per job (inside
    ``vmap``): query (L, N, E), returns (output (L, N, E), None)."""
    L, N, E = query.shape
    head = E // num_heads
    proj = _linear(query, in_proj_weight, in_proj_bias).view(L, N, 3, num_heads, head)
    q, k, v = (t.permute(1, 2, 0, 3) for t in proj.unbind(2))  # (N, heads, L, head) views
    weights = torch.softmax((q * head**-0.5) @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).permute(2, 0, 1, 3).reshape(L * N, E)
    return _linear(out, out_proj_weight, out_proj_bias).view(L, N, E), None


def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """``F.batch_norm``'s signature, for ``StackedBatchNorm``."""
    return StackedBatchNorm.apply(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


class StackedBatchNorm(torch.autograd.Function):
    """``F.batch_norm`` of a stack inside ``vmap``: the jobs folded into the channels (see the
    module's docstring). It has only a batching rule: it is never called outside ``vmap``."""

    @staticmethod
    def forward(input, running_mean, running_var, weight, bias, training, momentum, eps):
        raise RuntimeError("StackedBatchNorm runs inside vmap only")

    @staticmethod
    def setup_context(ctx, inputs, output):
        raise RuntimeError("StackedBatchNorm runs inside vmap only")

    @staticmethod
    def vmap(info, in_dims, input, running_mean, running_var, weight, bias, *options):
        jobs = info.batch_size
        if in_dims[0] is None:  # the same input for every job
            input = input.expand(jobs, *input.shape)
        x = input.movedim(in_dims[0] or 0, 1)
        shape = x.shape  # [n, jobs, C, ...]
        folded = x.reshape(shape[0], jobs * shape[2], *shape[3:])
        mean, var = (
            _statistics(t, d, jobs) for t, d in zip((running_mean, running_var), in_dims[1:3])
        )
        affine = [
            None if t is None else t.repeat(jobs) if d is None else t.movedim(d, 0).reshape(-1)
            for t, d in zip((weight, bias), in_dims[3:5])
        ]
        out = F.batch_norm(folded, mean[0], var[0], *affine, *options)
        training = options[0]
        for flat, rows in (mean, var):
            if training and rows is not None:  # the statistics were a copy: update them
                rows.copy_(flat.view_as(rows))
        return out.view(shape), 1


def _statistics(t: torch.Tensor | None, dim: int | None, jobs: int):
    """Per-job running statistics [jobs, C] as [jobs * C] channels that ``F.batch_norm``
    updates in place, and the tensor to copy the update back into when they are a copy."""
    if t is None:
        return None, None
    if dim is None:
        raise RuntimeError("a stack's BatchNorm statistics must be per job")
    rows = t.movedim(dim, 0)
    if rows.is_contiguous():
        return rows.view(-1), None
    return rows.reshape(-1), rows
