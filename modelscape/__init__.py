"""modelscape: grids of PyTorch training runs for the science of deep learning.

The quick start needs ``parse_args``/``base_args`` and ``run_sweep`` (the original's
``backend.job_iterator.main``); results load back with ``load(SAVE_DIR)``. Parametrizations
(``mupify``, ``rescale``) and the coordinate check (``coord_check``) verify a model before a big
sweep. Data sets and targets live in ``modelscape.data``, plots in ``modelscape.plotting``.
"""

from modelscape.backend.cli import base_args, parse_args
from modelscape.backend.job_iterator import main as run_sweep
from modelscape.coord_check import coord_check, coord_slopes, plot_coord_check
from modelscape.hparams import HParamError, HParams
from modelscape.jobs import Job, SweepError
from modelscape.models import CNN, MLP, ResNet, Transformer
from modelscape.parametrize import (
    ParametrizationError,
    ParametrizedConv2d,
    ParametrizedLinear,
    ScaledReLU,
    check_applicable,
    layer_scales,
    mupify,
    rescale,
)
from modelscape.results import JobRecord, Result
from modelscape.store import load
from modelscape.trace import ExptTrace

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "ExptTrace",
    "HParamError",
    "HParams",
    "Job",
    "JobRecord",
    "MLP",
    "ParametrizationError",
    "ParametrizedConv2d",
    "ParametrizedLinear",
    "ResNet",
    "Result",
    "ScaledReLU",
    "SweepError",
    "Transformer",
    "base_args",
    "check_applicable",
    "coord_check",
    "coord_slopes",
    "layer_scales",
    "load",
    "mupify",
    "parse_args",
    "plot_coord_check",
    "rescale",
    "run_sweep",
]
