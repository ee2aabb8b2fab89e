"""A user-defined loss and a user-defined optimizer, passed to the sweep as classes.

``LogCoshLoss`` (smooth, quadratic near zero and linear in the tails, so robust to the
heavy-tailed label noise used here) replaces the MSE, and ``SignSGD`` (steps of
``-lr * sign(grad)``, with optional momentum) is compared with plain SGD through an OPTIMIZER
axis whose values are the classes themselves. Any ``nn.Module`` loss ``loss(output, target)``
and any ``torch.optim.Optimizer`` subclass work the same way; the engine fills in its extra
arguments (momentum, weight_decay...) by name.

    python examples/custom_loss_optimizer.py                      # CPU, < 1 minute
    python examples/custom_loss_optimizer.py --WIDTH 1024 --MAX_ITER 3000 --NUM_TRIALS 4
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelscape import parse_args, run_sweep
from modelscape.data import monomial_bfn
from modelscape.results import plotting


class LogCoshLoss(nn.Module):
    """mean(log(cosh(output - target))), computed stably as |r| + log1p(exp(-2|r|)) - log 2."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r = (output - target).abs()
        return (r + torch.log1p(torch.exp(-2 * r)) - math.log(2.0)).mean()


class SignSGD(torch.optim.Optimizer):
    """Sign descent: ``p -= lr * sign(m)`` with ``m = momentum * m + grad``."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0):
        if lr < 0 or not 0 <= momentum < 1:
            raise ValueError(f"SignSGD needs lr >= 0 and 0 <= momentum < 1, got {lr}, {momentum}.")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("m", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


def heavy_tailed_bfn(bsz, gen, X=None, y=None, *, noise_df: float = 2.0, **kwargs):
    """``monomial_bfn``'s data with Student-t label noise (``noise_df`` degrees of freedom)."""
    clean = monomial_bfn(bsz, gen, X, y, **kwargs)

    def batch_fn(step):
        Xb, yb = clean(step)
        if X is not None:
            return Xb, yb
        g = torch.randn(bsz, generator=gen, device=gen.device)
        chi2 = torch.randn(bsz, int(noise_df), generator=gen, device=gen.device).pow(2).sum(1)
        return Xb, yb + 0.3 * g / (chi2 / noise_df).sqrt()

    return batch_fn


DEFAULTS = {  # this script's defaults: every flag overrides them, --help shows them
    "WIDTH": 256,
    "ONLINE": True,
    "ONLYTHRESHOLDS": False,
    "N_SAMPLES": 128,
    "MAX_ITER": 400,
    "EVAL_EVERY": 25,
    "LOSS_CHECKPOINTS": [0.01],
    "NUM_TRIALS": 2,
    "BIAS": True,
    "DEVICES": ["cpu"],
}

EXTRA = {
    "SGD_LR": (0.1, "learning rate of plain SGD"),
    "SIGN_LR": (0.002, "learning rate of SignSGD"),
    "OUT": ("runs/custom_loss_optimizer.png", "where to save the plot"),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, extra=EXTRA, defaults=DEFAULTS)
    args.LOSS = LogCoshLoss
    optimizers = [torch.optim.SGD, SignSGD]
    lrs = {torch.optim.SGD: args.SGD_LR, SignSGD: args.SIGN_LR}

    def per_optimizer_lr(model, opt, OPTIMIZER, **_):
        """post_init_fn: sign descent needs a far smaller LR than SGD, so set it per job."""
        for group in opt.param_groups:
            group["lr"] = lrs[OPTIMIZER]
        return model, opt

    args.post_init_fn = per_optimizer_lr
    bfn_config = {"base_bfn": heavy_tailed_bfn, "target": "x0*x1", "d": 16, "alpha": 1.0}
    result = run_sweep(
        [optimizers, range(args.NUM_TRIALS)], ["OPTIMIZER", "trial"], args, bfn_config
    )
    print(result.summary())
    ds = result.to_xarray().assign_coords(OPTIMIZER=[o.__name__ for o in optimizers])
    ax = plotting.loss_vs_step(ds, y="test_loss", hue="OPTIMIZER")
    ax.set_title("log-cosh loss on x0*x1 with Student-t label noise")
    print(f"plot saved to {plotting.save(ax, args.OUT)}")


if __name__ == "__main__":
    main()
