"""Helpers shared by the reliability tests: a tiny sweep's config, and the sweep itself."""

from modelscape import run_sweep
from modelscape.backend.cli import base_args


def config(**overrides):
    """A tiny one-job-at-a-time sweep on the CPU whose jobs run all MAX_ITER steps."""
    hp = dict(WIDTH=16, MAX_ITER=60, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[1e-9], BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def trial_sweep(cfg, trials, bfn, grabs, **kwargs):
    """``run_sweep`` over a ``trial`` axis with ``grabs``, without a progress bar."""
    return run_sweep(
        [list(trials)],
        ["trial"],
        {**cfg, "otherreturns": grabs},
        {"base_bfn": bfn},
        progress=False,
        **kwargs,
    )
