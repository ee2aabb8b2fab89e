"""modelscape: grids of PyTorch training runs for the science of deep learning."""

from modelscape.backend.cli import base_args, parse_args
from modelscape.backend.job_iterator import main as run_sweep
from modelscape.hparams import HParamError, HParams
from modelscape.jobs import Job, SweepError
from modelscape.models import MLP
from modelscape.results import JobRecord, Result
from modelscape.trace import ExptTrace

__version__ = "0.1.0"

__all__ = [
    "ExptTrace",
    "HParamError",
    "HParams",
    "Job",
    "JobRecord",
    "MLP",
    "Result",
    "SweepError",
    "base_args",
    "parse_args",
    "run_sweep",
]
