"""PRECISION: how a job's matrix products compute, in every engine.

- ``"fp32"`` (default): float32 matmuls (TF32 off on CUDA, for cuBLAS and cuDNN alike);
- ``"tf32"``: TF32 matmuls on CUDA devices that have them (Ampere and later): float32 inputs,
  a 10-bit mantissa inside the product, float32 accumulation; on the CPU the same as fp32;
- ``"bf16-mixed"``: the forward pass and the loss under ``torch.autocast`` in bfloat16 (the
  stacked MLP kernel casts its matmul operands as autocast does); parameters, gradients as the
  optimizer sees them, and optimizer state stay in DTYPE (float32). The test loss is evaluated
  in float32.

DTYPE stays the parameters' dtype; PRECISION other than fp32 needs DTYPE="float32".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype matmuls compute in under ``precision``, or None for the parameters' own."""
    return torch.bfloat16 if precision == "bf16-mixed" else None


@contextlib.contextmanager
def matmuls(precision: str) -> Iterator[None]:
    """TF32 on (``"tf32"``) or off (otherwise) for CUDA matmuls and convolutions while a job or
    group trains; the caller's settings are restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward pass's autocast context (disabled unless ``"bf16-mixed"``)."""
    dtype = compute_dtype(precision)
    return torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None)
