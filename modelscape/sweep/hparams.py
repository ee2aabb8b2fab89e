"""The hyperparameter schema: the single source of every name, type, default and help line.

The command line (``backend.cli.parse_args``), the notebook defaults (``backend.cli.base_args``),
validation and the README's table are all generated from ``HParams`` below. To add a
hyperparameter, add one field here; nothing else lists them.

A field's ``scope`` says what it describes:

- ``"job"``: part of what a job *is*. It may be an iterator axis, it takes several values on the
  command line (``--GAMMA 0.1 1 10`` sweeps it), and resuming a run folder with a different value
  is refused.
- ``"sweep"``: how the sweep is *run* (devices, workers, where results go). One value per sweep,
  and it may change between a run and its resumption.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from modelscape.errors import HParamError
from modelscape.execution import EXECUTORS
from modelscape.models.activations import ACTIVATIONS
from modelscape.sweep.checks import check_ranges
from modelscape.sweep.legacy_names import (
    DEPRECATED_NAMES,
    LEGACY_MODEL_FILE,
    REFUSED_NAMES,
    USER_CODE_SPELLINGS,
)

Scope = Literal["job", "sweep"]

PARAMETRIZATIONS = ("sp", "ntp", "mup", "mfp", "ntp-lr", "mup-lr")
NONLINEARITIES = tuple(ACTIVATIONS)
BATCHED_MODES = ("auto", "on", "off")
DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "tf32", "bf16-mixed")
COMPILE_MODES = ("off", "cuda-graphs")


def hp(
    default: Any,
    help: str,
    *,
    scope: Scope = "job",
    choices: tuple[str, ...] | None = None,
    kind: str | None = None,
    varies_in_stack: bool = False,
    executor: str | None = None,
) -> Any:
    """Declare one hyperparameter field.

    ``kind`` overrides the type inferred from the default. ``varies_in_stack``: jobs that differ
    in it may still train as one stacked model (each row keeps its own value); every other
    job-scoped field is part of a stack's shape and must be equal. ``executor``: the field
    configures that EXECUTOR only, and setting it for another is refused.
    """
    meta = {
        "help": help,
        "scope": scope,
        "choices": choices,
        "kind": kind,
        "varies_in_stack": varies_in_stack,
        "executor": executor,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class HParams:
    """Every built-in hyperparameter with its default. Units and meaning are in each help line."""

    # --- the original's hyperparameters, with the original's defaults ---
    ONLINE: bool = hp(True, "Fresh batch every step (True) or one fixed training set per job.")
    N_SAMPLES: int = hp(1024, "Training samples per job (the batch size when ONLINE).")
    N_TRAIN: int = hp(4000, "Size of the pool a batch function may draw from (data option).")
    N_TEST: int = hp(10_000, "Test-set size, drawn once per job from the batch function.")
    ONLYTHRESHOLDS: bool = hp(True, "Record only final values (True) or whole curves.")
    NUM_TRIALS: int = hp(
        1, "Number of trials (use range(NUM_TRIALS) as the trial axis).", scope="sweep"
    )
    MAX_ITER: int = hp(100_000, "Maximum number of optimizer steps per job.", varies_in_stack=True)
    LR: float = hp(
        1e-2,
        "Base learning rate, before GAMMA and parametrization rescaling.",
        varies_in_stack=True,
    )
    DEPTH: int = hp(2, "Hidden layers of the built-in models (must be > 0).")
    WIDTH: int = hp(8192, "Width of every hidden layer.")
    D_IN: Any = hp(
        None,
        "Input features (the original's DIM); None reads them from the data, a number must match.",
        kind="optional_int",
    )
    D_OUT: Any = hp(
        None,
        "Outputs (the number of classes for integer labels); None reads them from float targets, "
        "a number must match.",
        kind="optional_int",
    )
    GAMMA: float = hp(
        1.0, "Richness: outputs / GAMMA; LR * GAMMA**2 (GAMMA<1) or * GAMMA.", varies_in_stack=True
    )
    DEVICES: list = hp([0], "CUDA ids and/or 'cpu'; jobs are spread over them.", scope="sweep")
    SEED: int = hp(
        42, "Base seed; each job's seed derives from it and the job's values.", varies_in_stack=True
    )
    LOSS_CHECKPOINTS: list = hp(
        [0.15, 0.1],
        "EMA train-loss thresholds; a job stops once all are crossed.",
        varies_in_stack=True,
    )
    EMA_SMOOTHER: float = hp(0.9, "EMA constant s: ema = s*ema + (1-s)*loss.", varies_in_stack=True)
    DETERMINISTIC: bool = hp(
        True,
        "Seed jobs from SEED and use torch's deterministic algorithms (True), or not; "
        "without torch's NaN fill of new memory, a debugging aid that costs time.",
    )
    VERBOSE: bool = hp(False, "Print the loss as training goes.", scope="sweep")

    # --- training loop ---
    CENTER: bool = hp(True, "Train on f(x) - f_init(x), so the network starts at zero output.")
    EVAL_EVERY: int = hp(100, "Steps between test/grab evaluations when ONLYTHRESHOLDS=False.")
    MODEL_CLASS: Any = hp(
        None, "Model class or 'file.py:ClassName'; None is the built-in MLP.", kind="model"
    )
    OPTIMIZER: Any = hp(
        "SGD",
        "A torch.optim name or class. On the CPU, Adam, AdamW, SGD and Adagrad step with "
        "torch's fused kernel (fused=True) unless OPTIMIZER_KWARGS sets foreach or fused.",
        kind="class",
    )
    LOSS: Any = hp("MSELoss", "A torch.nn loss name or class.", kind="class")
    MOMENTUM: float = hp(0.0, "Momentum, passed to optimizers that take it.", varies_in_stack=True)
    WEIGHT_DECAY: float = hp(
        0.0, "Weight decay, passed to optimizers that take it.", varies_in_stack=True
    )
    OPTIMIZER_KWARGS: dict = hp(
        {},
        "Other optimizer arguments by name (betas, eps, nesterov...); an axis named "
        "OPTIMIZER_KWARGS.<arg> sweeps one.",
        varies_in_stack=True,
    )
    DTYPE: str = hp("float32", "Floating dtype of models and data.", choices=DTYPES)
    PRECISION: str = hp("fp32", "Matmuls: fp32, tf32 (CUDA) or bf16-mixed.", choices=PRECISIONS)

    # --- models and parametrizations ---
    PARAMETRIZATION: str = hp(
        "sp", "sp (PyTorch default), ntp, mup, mfp, ntp-lr or mup-lr.", choices=PARAMETRIZATIONS
    )
    NONLINEARITY: str = hp("relu", "Activation of the built-in models.", choices=NONLINEARITIES)
    BIAS: bool = hp(False, "Biases in the built-in models' layers.")

    # --- execution and storage ---
    WORKERS_PER_DEVICE: Any = hp(
        1,
        "Worker processes per device (several pack small jobs on one GPU); 'auto': one per core "
        "(one thread each) for a CPU sweep whose jobs train one at a time, else one.",
        scope="sweep",
        kind="int_or_auto",
    )
    EXECUTOR: str = hp(
        "local",
        "Where jobs run: local processes, a Ray cluster or a SLURM job array.",
        scope="sweep",
        choices=EXECUTORS,
    )
    SAVE_DIR: Any = hp(
        None,
        "Run folder for the resumable store; None keeps results in memory.",
        scope="sweep",
        kind="path",
    )
    RETRY_FAILED: bool = hp(False, "On resume, rerun jobs that failed.", scope="sweep")
    CHECKPOINT_EVERY: float = hp(
        300.0, "Seconds between checkpoints of a running job.", scope="sweep"
    )
    # fmt: off
    SLURM: dict = hp({}, "EXECUTOR='slurm': submitit's parameters (timeout_min, mem_gb...).",
                     scope="sweep", executor="slurm")
    DETACH: bool = hp(False, "EXECUTOR='slurm': submit and return; a rerun or `modelscape show` "
                      "collects.", scope="sweep", executor="slurm")
    RAY_ADDRESS: Any = hp(None, "EXECUTOR='ray': the cluster (host:port); None reads $RAY_ADDRESS, "
                          "else starts a local Ray.", scope="sweep", kind="optional_str",
                          executor="ray")
    # fmt: on
    BATCHED: str = hp(
        "auto",
        "Train compatible jobs as one stacked model (auto, on, off).",
        scope="sweep",
        choices=BATCHED_MODES,
    )
    REFILL: bool = hp(True, "Jobs waiting in a group take the stack rows of jobs that exited.",
                      scope="sweep")  # fmt: skip
    MAX_RETRIES: int = hp(1, "Retries of a job lost to a dead worker or Ray node.", scope="sweep")
    JOB_TIMEOUT: float = hp(
        0.0, "Seconds per job before a hung worker job fails; 0 is off.", scope="sweep"
    )
    RESUME_CHANGED_CODE: bool = hp(False, "Resume a SAVE_DIR whose code changed.", scope="sweep")
    COMPILE: str = hp(
        "off",
        "cuda-graphs: replay the stacked step on GPU (opt-in).",
        scope="sweep",
        choices=COMPILE_MODES,
    )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(HParams)}
DEFAULTS: dict[str, Any] = {
    name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)  # type: ignore[misc]
    for name, f in FIELDS.items()
}
JOB_FIELDS = tuple(n for n, f in FIELDS.items() if f.metadata["scope"] == "job")
SWEEP_FIELDS = tuple(n for n, f in FIELDS.items() if f.metadata["scope"] == "sweep")
VARIES_IN_STACK = frozenset(n for n, f in FIELDS.items() if f.metadata["varies_in_stack"])


def kind_of(name: str) -> str:
    """The value kind of a field: bool, int, float, str, list or a special kind."""
    f = FIELDS[name]
    if f.metadata["kind"]:
        return f.metadata["kind"]
    return type(DEFAULTS[name]).__name__


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside modelscape."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("modelscape"):
        frame, level = frame.f_back, level + 1
    return level


def canonical_name(name: str) -> str:
    """Map a legacy spelling to its current name, with a FutureWarning naming the new one."""
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"{name} is the original modelscape's spelling; use {new}.",
            FutureWarning,
            stacklevel=user_stacklevel(),
        )
        return new
    return name


def near_miss(name: str) -> str | None:
    """The hyperparameter a key probably meant (``WIDHT`` -> ``WIDTH``, ``lr`` -> ``LR``)."""
    if name in FIELDS:
        return None
    hits = difflib.get_close_matches(name.upper(), list(FIELDS), n=1, cutoff=0.8)
    return hits[0] if hits else None


def check_user_key(name: str) -> None:
    """Refuse a key that is not a hyperparameter but looks like one (nothing silently ignored).

    Legacy spellings are mapped before this; what is left and matches a hyperparameter up to
    case (``lr``, ``gamma``) or nearly (``GAMA``, ``WIDHT``), or is an original key that cannot
    be honoured (``OPTIMIZER_INSTANCE``), is an ``HParamError`` naming the hyperparameter.
    """
    if name in REFUSED_NAMES:
        raise HParamError(f"{name} (the original modelscape's key) is not supported: "
                          f"{REFUSED_NAMES[name]}")  # fmt: skip
    guess = near_miss(name)
    if guess is not None:
        raise HParamError(
            f"config key {name!r} is not a hyperparameter, but looks like {guess}: write "
            f"{guess} to set it, or rename your own key so that it does not look like one."
        )


def merge_legacy(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the legacy spellings in ``config`` (warning for each); conflicts are errors.

    ``MODEL_FILE`` + ``MODEL_NAME`` become ``MODEL_CLASS="file.py:Name"``. A legacy spelling
    given next to its new name with a different value is an ``HParamError``.
    """
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    items = dict(config)
    for file_key, name_key in LEGACY_MODEL_FILE.items():
        if file_key in items or name_key in items:
            if file_key not in items or name_key not in items:
                raise HParamError(
                    f"{file_key} and {name_key} come as a pair (the original's model from a "
                    "file); give both, or MODEL_CLASS='path/file.py:ClassName'."
                )
            if "MODEL_CLASS" in items:
                raise HParamError(
                    f"both MODEL_CLASS and {file_key}/{name_key} (the original's spelling of "
                    "MODEL_CLASS='file.py:Name') are given; keep one."
                )
            path, cls = items.pop(file_key), items.pop(name_key)
            warnings.warn(
                f"{file_key}/{name_key} are the original modelscape's spelling; use "
                f"MODEL_CLASS='{path}:{cls}'.",
                FutureWarning,
                stacklevel=user_stacklevel(),
            )
            items["MODEL_CLASS"] = f"{path}:{cls}"
    for key, value in items.items():
        name = canonical_name(key) if isinstance(key, str) else key
        if name in out and not _same(out[name], value):
            raise HParamError(
                f"{name} is given twice, as {source[name]}={out[name]!r} and {key}={value!r} "
                f"(the original's spelling of {name}); keep one."
            )
        out[name] = value
        source[name] = key
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and tensors compare elementwise
        return a is b


def coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the schema's type for ``name`` and return it normalised.

    Integers accept integral floats (``1e5``); floats accept ints; booleans accept only real
    booleans (strings are parsed by the CLI, not here). Raises ``HParamError`` naming the fix.
    """
    kind = kind_of(name)
    choices = FIELDS[name].metadata["choices"]

    def bad(expected: str) -> HParamError:
        return HParamError(
            f"{name}={value!r} ({type(value).__name__}) is not a valid {expected}; "
            f"default is {DEFAULTS[name]!r}. {FIELDS[name].metadata['help']}"
        )

    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, np.bool_):
            return bool(value)
        raise bad("bool (True/False)")
    if kind == "int":
        return coerce_int(name, value, bad)
    if kind == "float":
        if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
            raise bad("float")
        if not math.isfinite(value):
            raise bad("finite float")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise bad("string")
        if choices and value not in choices:
            raise HParamError(f"{name}={value!r} is not one of {', '.join(choices)}.")
        return value
    if kind == "list":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]
        value = list(value)
        if name == "LOSS_CHECKPOINTS":
            ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
            if not ok or not all(math.isfinite(v) for v in value):
                raise bad("list of finite floats")
            return [float(v) for v in value]
        return value
    if kind == "dict":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad("dict of argument names to values")
        return dict(value)
    if kind == "path":  # absolute from the start: user code may chdir while the sweep runs
        if value is None:
            return None
        if (isinstance(value, str) and value.strip()) or hasattr(value, "__fspath__"):
            return os.path.abspath(os.path.expanduser(os.fspath(value)))
        raise bad("folder or None (an empty name would write into the current one)")
    if kind == "optional_int":
        return None if value is None else coerce_int(name, value, bad)
    if kind == "int_or_auto":
        return "auto" if value == "auto" else coerce_int(name, value, bad)
    if kind == "optional_str":
        if value is None or isinstance(value, str):
            return value
        raise bad("str or None")
    if kind in ("class", "model"):
        if value is None and kind == "model":
            return None
        if isinstance(value, (str, type)):
            return value
        raise bad("name or class")
    raise AssertionError(f"unhandled kind {kind}")


def coerce_int(name: str, value: Any, bad: Any) -> int:
    """An int, or an integral float such as ``5e2``; ``bad(expected)`` builds the error."""
    if isinstance(value, bool):
        raise bad("int")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    raise bad("int")


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a user's config dict into (hyperparameters, the user's own keys).

    Legacy spellings are renamed with a FutureWarning (``merge_legacy``); a key that looks like
    a hyperparameter but is not one (``lr``, ``GAMA``) is an ``HParamError`` (``check_user_key``).
    """
    hps: dict[str, Any] = {}
    user: dict[str, Any] = {}
    for name, value in merge_legacy(config).items():
        if name in FIELDS:
            hps[name] = value
            continue
        if isinstance(name, str):
            check_user_key(name)
        user[name] = value
    for name, old in USER_CODE_SPELLINGS.items():
        if isinstance(hps.get(name), numbers.Integral):
            user.setdefault(old, hps[name])
    _legacy_optimizer_args(hps, user)
    return hps, user


def _legacy_optimizer_args(hps: dict[str, Any], user: Mapping[str, Any]) -> None:
    """The original passed optimizer arguments as config keys named like the optimizer's own
    (``betas``, ``eps``, ``nesterov``): copy them into OPTIMIZER_KWARGS with a FutureWarning.

    Only for one OPTIMIZER given in the config (not an OPTIMIZER axis); ``lr``, ``momentum`` and
    ``weight_decay`` are hyperparameters of their own (LR, MOMENTUM, WEIGHT_DECAY).
    """
    opt = hps.get("OPTIMIZER", DEFAULTS["OPTIMIZER"])
    cls = getattr(torch.optim, opt, None) if isinstance(opt, str) else opt
    if not isinstance(cls, type):
        return
    params = inspect.signature(cls.__init__).parameters
    own = ("self", "params", "lr", "momentum", "weight_decay")
    taken = {k: v for k, v in user.items() if isinstance(k, str) and k in params and k not in own}
    if not taken:
        return
    kwargs = dict(hps.get("OPTIMIZER_KWARGS") or {})
    for name, value in taken.items():
        if name in kwargs and not _same(kwargs[name], value):
            raise HParamError(
                f"{name} is given twice, as a config key ({value!r}) and in OPTIMIZER_KWARGS "
                f"({kwargs[name]!r}); keep the OPTIMIZER_KWARGS entry."
            )
        kwargs[name] = value
    warnings.warn(
        f"config keys {', '.join(taken)} are the original modelscape's way to pass "
        f"{cls.__name__}'s arguments; write OPTIMIZER_KWARGS={taken!r}.",
        FutureWarning,
        stacklevel=user_stacklevel(),
    )
    hps["OPTIMIZER_KWARGS"] = kwargs


def resolve(overrides: Mapping[str, Any]) -> HParams:
    """Build validated ``HParams`` from defaults plus ``overrides`` (hyperparameter keys only)."""
    values = dict(DEFAULTS)
    for name, value in overrides.items():
        if name not in FIELDS:
            raise HParamError(unknown_message(name))
        values[name] = coerce(name, value)
    h = HParams(**values)
    check_ranges(h)
    return h


def unknown_message(name: str) -> str:
    guess = near_miss(name)
    hint = f" Did you mean {guess}?" if guess else ""
    return f"unknown hyperparameter {name!r}.{hint} Valid names: {', '.join(FIELDS)}."


def markdown_table() -> str:
    """The README's hyperparameter table, generated from the schema."""
    rows = ["| name | default | scope | meaning |", "| --- | --- | --- | --- |"]
    for name, f in FIELDS.items():
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{name}` | `{DEFAULTS[name]!r}` | {f.metadata['scope']} | {meaning} |")
    return "\n".join(rows)
