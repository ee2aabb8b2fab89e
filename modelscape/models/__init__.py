"""Built-in models (``builtin``: MLP, CNN, ResNet, Transformer), the parametrizations
(``parametrize``: sp, ntp, mup, mfp, ...) and the activations a model may use
(``activations``).

The package re-exports ``builtin``'s names, where ``modelscape.models`` had them before it
became a package.
"""

from modelscape.models.builtin import (
    ACTIVATIONS,
    BUILTIN_MODELS,
    CNN,
    MLP,
    ResNet,
    Transformer,
    constructor_kwargs,
    resolve_model_class,
    standard_kwargs,
)

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "CNN",
    "ResNet",
    "Transformer",
    "resolve_model_class",
    "standard_kwargs",
    "constructor_kwargs",
    "BUILTIN_MODELS",
]
