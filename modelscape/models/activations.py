"""The activations a built-in model can use, by the name NONLINEARITY takes.

The one table: ``hparams`` takes NONLINEARITY's choices from it and ``models`` builds layers
from it, so adding an activation is one entry here (the stacked MLP kernel computes it by hand
only if ``engine/stacked/ops.py`` also has an entry; otherwise it trains through torch.func).
"""

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "linear": nn.Identity,
    "silu": nn.SiLU,
}
