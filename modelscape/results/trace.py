"""``ExptTrace``: outcomes indexed by tuples of variable values, readable by expt-core.

The serialized form ``{"var_names", "config2outcome", "outcome_shape"}`` is the one expt-core's
``ExptTrace.deserialize`` reads, so results from modelscape load in existing analysis code; this
class reads it too and indexes it the same way (``trace[:, 64, 0.1]``, ``trace.get(ntrain=64)``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np


class ExptTrace:
    """Outcomes of one measurement (e.g. test loss) over configs of named variables.

    A full slice ``:`` on a variable selects all its recorded values, sorted; the result is an
    ndarray (masked where a config is missing).
    """

    def __init__(self, var_names: list[str]):
        if "outcome" in var_names:
            raise ValueError("variable name 'outcome' is reserved")
        self.var_names = list(var_names)
        self.config2outcome: dict[tuple, Any] = {}
        self.outcome_shape: tuple[int, ...] | None = None

    def __setitem__(self, config: Hashable, outcome: Any) -> None:
        config = config if isinstance(config, tuple) else (config,)
        if len(config) != len(self.var_names):
            raise ValueError(
                f"config {config} has {len(config)} values, expected "
                f"{len(self.var_names)} ({self.var_names})"
            )
        shape = np.shape(outcome)
        if self.outcome_shape is None:
            self.outcome_shape = shape
        elif shape != self.outcome_shape:
            raise ValueError(f"outcome shape {shape} != {self.outcome_shape}")
        self.config2outcome[config] = outcome

    def get_axis(self, var_name: str) -> list:
        """All recorded values of one variable, sorted."""
        i = self.var_names.index(var_name)
        values = {c[i] for c in self.config2outcome}
        try:
            return sorted(values)
        except TypeError:
            return sorted(values, key=repr)

    def __getitem__(self, key: Any) -> Any:
        if self.outcome_shape is None:
            raise KeyError("the trace is empty")
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != len(self.var_names):
            raise ValueError(f"index has {len(key)} entries, expected {len(self.var_names)}")
        axes = [
            self.get_axis(n) if isinstance(k, slice) else [k] for k, n in zip(key, self.var_names)
        ]
        shape = [len(a) for a in axes]
        out = np.ma.masked_all(shape + list(self.outcome_shape))
        for idx in np.ndindex(*shape):
            config = tuple(axes[d][i] for d, i in enumerate(idx))
            if config in self.config2outcome:
                out[idx] = self.config2outcome[config]
        if np.all(np.ma.getmaskarray(out)):
            raise KeyError(f"no outcome recorded for {key}")
        if np.prod(shape) == 1:
            return np.asarray(out).squeeze()
        return out if np.ma.is_masked(out) else np.asarray(out)

    def get(self, **selection: Any) -> Any:
        """Index by name; variables left out are taken in full."""
        unknown = set(selection) - set(self.var_names)
        if unknown:
            raise KeyError(f"unknown variables {sorted(unknown)}; have {self.var_names}")
        return self[tuple(selection.get(n, slice(None)) for n in self.var_names)]

    def serialize(self) -> dict[str, Any]:
        """The plain-dict form expt-core's ``ExptTrace.deserialize`` reads."""
        return {
            "var_names": list(self.var_names),
            "config2outcome": dict(self.config2outcome),
            "outcome_shape": self.outcome_shape,
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ExptTrace:
        missing = {"var_names", "config2outcome", "outcome_shape"} - set(data)
        if missing:
            raise ValueError(f"not a serialized ExptTrace: missing {sorted(missing)}")
        trace = cls(list(data["var_names"]))
        trace.config2outcome = dict(data["config2outcome"])
        shape = data["outcome_shape"]
        trace.outcome_shape = tuple(shape) if shape is not None else None
        return trace

    def __repr__(self) -> str:
        return (
            f"ExptTrace(vars={self.var_names}, outcome_shape={self.outcome_shape}, "
            f"n={len(self.config2outcome)})"
        )
