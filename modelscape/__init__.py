"""modelscape: grids of PyTorch training runs for the science of deep learning.

The quick start needs ``parse_args``/``base_args`` and ``run_sweep`` (``modelscape.runner.main``,
the original's ``backend.job_iterator.main``); results load back with ``load(SAVE_DIR)``.
Parametrizations (``mupify``, ``rescale``) and the coordinate check (``coord_check``) verify a
model before a big sweep. Data sets and targets live in ``modelscape.data``, plots in
``modelscape.results.plotting``. Every error raised on purpose derives from ``ModelscapeError``.
``docs/ARCHITECTURE.md`` maps the package.
"""

from modelscape._version import VERSION
from modelscape.cli.args import base_args, parse_args
from modelscape.coord_check import coord_check, coord_slopes, plot_coord_check
from modelscape.errors import (
    ExecutorError,
    HParamError,
    MissingExtra,
    ModelscapeError,
    ParametrizationError,
    RunFolderMismatch,
    StoreError,
    SweepError,
)
from modelscape.models.builtin import CNN, MLP, ResNet, Transformer
from modelscape.models.parametrize import (
    ParametrizedConv2d,
    ParametrizedLinear,
    ScaledReLU,
    check_applicable,
    layer_scales,
    mupify,
    rescale,
)
from modelscape.results.result import JobRecord, Result
from modelscape.results.trace import ExptTrace
from modelscape.runner import main as run_sweep
from modelscape.store import load
from modelscape.sweep.hparams import HParams
from modelscape.sweep.jobs import Job

__version__ = VERSION

__all__ = [
    "CNN",
    "ExecutorError",
    "ExptTrace",
    "HParamError",
    "HParams",
    "Job",
    "JobRecord",
    "MLP",
    "MissingExtra",
    "ModelscapeError",
    "ParametrizationError",
    "ParametrizedConv2d",
    "ParametrizedLinear",
    "ResNet",
    "Result",
    "RunFolderMismatch",
    "ScaledReLU",
    "StoreError",
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
