"""Moved to ``modelscape.compat.model``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.compat.model import (
    MLP,
    CenteredWrapper,
    SimpleCNN,
    SimpleMLPBlock,
    SimpleSelfAttention,
    SimpleTransformer,
    SimpleTransformerBlock,
    centeredmodel,
)

__all__ = [
    "MLP",
    "CenteredWrapper",
    "centeredmodel",
    "SimpleCNN",
    "SimpleSelfAttention",
    "SimpleMLPBlock",
    "SimpleTransformerBlock",
    "SimpleTransformer",
]
