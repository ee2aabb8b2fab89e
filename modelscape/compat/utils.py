"""The original's ``modelscape.compat.utils``: array conversion, seeding and config loading.

Kept for scripts written against the original (``from modelscape.compat.utils import
ensure_torch``). Sweeps seed jobs themselves (``modelscape.sweep.jobs``); ``seed_everything`` and
``derive_seed`` are for a user's own code outside a sweep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelscape.cli.args import load_config_file


def ensure_numpy(x: Any, dtype: Any = np.float64, clone: bool = False) -> np.ndarray:
    """``x`` as a numpy array: tensors are detached and moved to the CPU (keeping their dtype),
    anything else goes through ``np.asarray(x, dtype)``."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    out = np.asarray(x, dtype=dtype)
    return out.copy() if clone and out is x else out


def default_device() -> torch.device:
    """CUDA if available, else Apple's MPS, else the CPU (the original's default)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def ensure_torch(
    x: Any,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | int | None = None,
    clone: bool = False,
) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` on ``device`` (None: ``default_device()``; an int is a
    CUDA id). A tensor already there is returned as is unless ``clone``."""
    if device is None:
        device = default_device()
    elif isinstance(device, int):
        device = torch.device(f"cuda:{device}")
    else:
        device = torch.device(device)
    if not isinstance(x, torch.Tensor):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    if x.device != device or x.dtype != dtype:
        x = x.to(device=device, dtype=dtype)
    return x.clone() if clone else x


def tuple_to_numpy(x: Any, dtype: Any = np.float64, clone: bool = False) -> Any:
    """``ensure_numpy`` on every array-like leaf of nested dicts, lists, tuples and sets (sets
    become tuples); strings, scalars and None stay as they are."""
    if x is None or isinstance(x, (str, bytes, bytearray)) or np.isscalar(x):
        return x
    if isinstance(x, dict):
        return {k: tuple_to_numpy(v, dtype, clone) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tuple_to_numpy(v, dtype, clone) for v in x))
    if isinstance(x, (tuple, set)):
        return tuple(tuple_to_numpy(v, dtype, clone) for v in x)
    if isinstance(x, list):
        return [tuple_to_numpy(v, dtype, clone) for v in x]
    try:
        return ensure_numpy(x, dtype, clone)
    except (TypeError, ValueError):
        return x


def trace_deserialize(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a serialized trace (``var_names``, ``config2outcome``, ``outcome_shape``),
    checking that the three keys are there."""
    if not isinstance(data, dict):
        raise TypeError(f"a serialized trace is a dict, got {type(data).__name__}.")
    missing = [k for k in ("var_names", "config2outcome", "outcome_shape") if k not in data]
    if missing:
        raise ValueError(f"serialized trace lacks {', '.join(missing)}.")
    return {
        "var_names": list(data["var_names"]),
        "config2outcome": dict(data["config2outcome"]),
        "outcome_shape": data["outcome_shape"],
    }


def derive_seed(master_seed: int | None, device_id: int = 0) -> int:
    """A 32-bit seed from ``master_seed`` and ``device_id`` (from the process id if None)."""
    if master_seed is None:
        return (os.getpid() ^ (device_id << 16)) & 0xFFFFFFFF
    ss = np.random.SeedSequence([int(master_seed), int(device_id)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def seed_everything(
    seed_int: int, device_id: int = 0, make_generators: bool = True, deterministic: bool = False
) -> tuple[torch.Generator, np.random.Generator] | None:
    """Seed numpy's and torch's global RNGs; return a torch generator (on CUDA ``device_id``
    when available) and a numpy generator seeded alike, unless ``make_generators=False``."""
    np.random.seed(seed_int)
    torch.manual_seed(seed_int)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if not make_generators:
        return None
    device = f"cuda:{device_id}" if torch.cuda.is_available() else "cpu"
    return torch.Generator(device=device).manual_seed(seed_int), np.random.default_rng(seed_int)


def load_json(path: str | os.PathLike) -> Any:
    """The parsed contents of a JSON file."""
    return json.loads(Path(path).expanduser().read_text())


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON file of settings, read as ``--config`` files are."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(
            f"unsupported configuration file extension {suffix!r}; use .yaml or .json."
        )
    return load_config_file(path)
