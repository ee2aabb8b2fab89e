"""What a job is: its iterator values, its resolved hyperparameters and its seed.

A sweep is the cartesian product of named axes (``itertools.product`` over the iterators, in
order). An axis named like a job hyperparameter (``GAMMA``, ``LR``, ``WIDTH``...) overrides it for
that job; ``ntrain`` is an alias of ``N_SAMPLES``. Every other axis (``trial``, ``target``...) is
an identity value passed to batch functions and grabs.

With ``DETERMINISTIC=True`` a job's seed is a hash of ``SEED`` and its iterator values, so it
never depends on the device, the worker or the order jobs run in.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import re
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from modelscape.errors import SweepError
from modelscape.sweep import hparams as H

AXIS_ALIASES = {"ntrain": "N_SAMPLES"}
TRIAL_AXIS = "trial"
OPTIMIZER_ARG_AXIS = "OPTIMIZER_KWARGS."  # an axis named with this prefix sweeps one argument

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Job:
    """One training run: iterator values, resolved hyperparameters and the seed."""

    key: tuple
    axes: tuple[str, ...]
    hp: H.HParams
    seed: int
    index: int = 0
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trial(self) -> int:
        """The trial value, used as the step argument of the offline draw (0 without an axis)."""
        value = self.values.get(TRIAL_AXIS, 0)
        return int(value) if isinstance(value, (int, np.integer)) else 0

    def label(self) -> str:
        return job_label(self.axes, self.key)


def job_label(axes: Sequence[str], key: Sequence[Any]) -> str:
    """``trial=1, GAMMA=0.5``: a job named by its values, as every message and file name shows
    it (its key's repr when the axes are unknown)."""
    if len(axes) == len(key):
        return ", ".join(f"{a}={v}" for a, v in zip(axes, key))
    return repr(tuple(key))


def axis_target(name: str) -> str | None:
    """The hyperparameter an axis overrides, or None for an identity axis.

    ``OPTIMIZER_KWARGS.<arg>`` overrides one entry of OPTIMIZER_KWARGS.
    """
    if name.startswith(OPTIMIZER_ARG_AXIS):
        return "OPTIMIZER_KWARGS"
    name = H.canonical_name(AXIS_ALIASES.get(name, name))
    if name in H.FIELDS:
        if H.FIELDS[name].metadata["scope"] != "job":
            raise SweepError(
                f"{name} describes how the sweep runs, not a job, so it cannot be an axis."
            )
        return name
    return None


def lookalike_axis(name: str) -> str | None:
    """The hyperparameter an identity axis looks like (``lr``, ``Lr`` -> LR; ``GAMA`` -> GAMMA).

    Legacy spellings, the aliases and exact names set their hyperparameter (``axis_target``) and
    look like nothing. A match up to case may name any hyperparameter (``devices`` is refused
    too: a sweep setting cannot be an axis); a near miss only a job hyperparameter, so that
    ``batch`` does not read as BATCHED. ``samples`` is a near miss of N_SAMPLES, ``seed`` a
    match of SEED; ``batch``, ``target``, ``alpha`` look like nothing.
    """
    if name.startswith(OPTIMIZER_ARG_AXIS) or name == TRIAL_AXIS or axis_target(name) is not None:
        return None
    by_case = {n.upper(): n for n in H.FIELDS}
    if name.upper() in by_case:
        return by_case[name.upper()]
    hits = difflib.get_close_matches(name.upper(), H.JOB_FIELDS, n=1, cutoff=0.8)
    return hits[0] if hits else None


def stable_repr(value: Any) -> str:
    """The exact identity of an iterator value as text, the same in every process: what a job's
    seed and its stored key are derived from. Numbers are their Python value (``np.float64(0.1)``
    is ``0.1``); anything else is its ``repr``. ``check_axis_value`` refuses, before training,
    the values this text cannot tell apart."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return repr(int(value))
    text = repr(value)
    if _ADDRESS.search(text):
        raise SweepError(
            f"iterator value {text} has no stable repr (it shows a memory address), so it "
            "cannot seed a job reproducibly. Use numbers, strings, tuples, or give the class a "
            "__repr__ that shows its contents."
        )
    return text


def key_id(key: Sequence[Any]) -> str:
    """A job key's identity as text, equal in every process and every run: the run folder's
    key for the job's record and its checkpoint."""
    return repr(tuple(stable_repr(v) for v in key))


def hashable(value: Any) -> Any:
    """``value`` as a dict key (a job's key values, a group's hyperparameters): lists become
    tuples, element by element; any other unhashable value becomes its ``repr``."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def trace_value(value: Any) -> Any:
    """A value as the original's traces key it: ``str()`` of everything that is not an int,
    float, str or tuple (tuples converted inside), so that expt-core can compare."""
    if isinstance(value, tuple):
        return tuple(trace_value(v) for v in value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return str(value)


def trace_key(key: Sequence[Any]) -> tuple:
    """A job's key in the traces (``result["losses"]``...): ``trace_value`` of each value."""
    return tuple(trace_value(v) for v in key)


def check_axis_value(name: str, value: Any) -> None:
    """Refuse a value whose exact identity cannot be established, naming the fix.

    A tensor or array prints rounded (``tensor(1.0000)`` for both 1.00001 and 1.00004) and
    hashes by object, so two different ones would share a seed and a stored row. NaN is unequal
    to itself, so it cannot key a job. A plain dict is unhashable and equal dicts print in their
    own key order (a hashable subclass, such as the original's ``Monomial``, is its own key).
    Inside a tuple, each element is checked.
    """
    if isinstance(value, (dict, list, set)) and type(value).__hash__ is None:
        fix = "tuple(sorted(d.items()))" if isinstance(value, dict) else "tuple(v)"
        raise SweepError(
            f"axis {name!r} has the {type(value).__name__} {value!r} as a value; it cannot key a "
            f"job (unhashable, and equal ones can print differently). Use {fix}, or a label as "
            "the axis value and look the settings up in the batch function."
        )
    if isinstance(value, (tuple, frozenset)):
        for v in value:
            check_axis_value(name, v)
        return
    if isinstance(value, torch.Tensor):
        kind, fix = "tensor", "t.tolist()"
    elif isinstance(value, np.ndarray):
        kind, fix = "numpy array", "a.tolist()"
    else:
        kind = None
    if kind is not None:
        if value.ndim == 0:
            raise SweepError(
                f"axis {name!r} has the 0-d {kind} {value!r}; its text form is rounded, so it "
                "cannot identify a job exactly. Convert it to its Python value first (x.item(); "
                f"for a whole axis, iterate over {fix} instead of the {kind})."
            )
        raise SweepError(
            f"axis {name!r} has a {kind} of shape {tuple(value.shape)} as a value; its text "
            "form is rounded and it hashes by object, so two different ones could share one "
            f"seed and one stored result. Use a tuple of Python numbers (tuple({fix})), or a "
            "label or index as the axis value and look the data up in the batch function."
        )
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        raise SweepError(
            f"axis {name!r} has the value NaN, which is unequal to itself, so it cannot key a "
            "job or its stored result. Use a label for it instead (None, or the string 'nan')."
        )
    stable_repr(value)


def job_seed(base_seed: int, axes: Sequence[str], key: Sequence[Any]) -> int:
    """The seed of the job with these iterator values: a hash, independent of placement."""
    text = repr((int(base_seed), tuple((a, stable_repr(v)) for a, v in zip(axes, key))))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class SubSeeds(NamedTuple):
    """The independent seeds derived from a job seed, one per random stream of a job.

    The field order is part of the results' reproducibility: a new stream is appended, never
    inserted.
    """

    model_init: int  # the model's initial weights (torch's global RNG while it is built)
    train_data: int  # the training data's generator (``gen`` of the training draw)
    test_data: int  # the test set's generator
    training_rng: int  # torch's global RNG while the job trains (dropout, user code)
    centering: int  # the global RNG while f_init is evaluated for CENTER
    test_draw_rng: int  # the global RNG while the test set is drawn (batch fns ignoring gen)
    train_draw_rng: int  # the global RNG while the training set is drawn
    dropout: int  # nn.Dropout's masks, re-seeded every step (``engine.stateful``)

    @classmethod
    def of(cls, seed: int) -> SubSeeds:
        """The named sub-seeds of job seed ``seed``."""
        return cls(*sub_seeds(seed, len(cls._fields)))


def sub_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent seeds derived from a job seed (model init, train data, test data...)."""
    states = np.random.SeedSequence(seed).spawn(n)
    return [
        int(s.generate_state(2, dtype=np.uint32).astype(np.uint64) @ [1, 1 << 32]) >> 1
        for s in states
    ]


def materialize(iterators: Sequence[Iterable], names: Sequence[str]) -> list[list]:
    """Turn each iterator (list, range, generator) into a list, checking names and emptiness."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise SweepError(f"iterator_names must be a list of strings, got {names!r}.")
    if len(iterators) != len(names):
        raise SweepError(
            f"{len(iterators)} iterators but {len(names)} iterator_names ({list(names)}); "
            "give one name per iterator."
        )
    if len(set(names)) != len(names):
        raise SweepError(f"iterator_names has duplicates: {list(names)}.")
    axes = []
    for it, name in zip(iterators, names):
        # a list value (a class pair, a threshold list) becomes a tuple, so it can key results
        values = [tuple(v) if isinstance(v, list) else v for v in it]
        if not values:
            raise SweepError(f"iterator {name!r} is empty; a sweep axis needs at least one value.")
        axes.append(values)
    return axes


def check_distinct(name: str, values: Sequence[Any]) -> None:
    """Each value of an axis names one job, so each must have an exact identity
    (``check_axis_value``) and no two may share one: not compare equal, not share the text
    that seeds and stores a job (``stable_repr``), not share a key in the traces
    (``trace_value``).

    Python treats ``1 == 1.0 == True`` and ``0 == False`` as one dictionary key: such values
    would give two jobs one key, and one result would overwrite the other. ``None`` and
    ``"None"`` are one key of the original's traces.
    """
    seen: dict[Any, Any] = {}
    texts: dict[str, Any] = {}
    traced: dict[Any, Any] = {}
    for v in values:
        check_axis_value(name, v)
        key = _equality_key(v)
        if key in seen:
            _refuse_equal(name, seen[key], v)
        seen[key] = v
        text = stable_repr(v)
        if text in texts:
            raise SweepError(
                f"axis {name!r} lists {texts[text]!r} and {v!r}, which differ but have the same "
                f"text form {text!r}, so they would share one seed and one stored result. Give "
                "the class a __repr__ that tells its values apart, or use labels."
            )
        texts[text] = v
        trace = trace_value(v)
        if trace in traced:
            raise SweepError(
                f"axis {name!r} lists {traced[trace]!r} and {v!r}, which are one key of the "
                f"result's traces ({trace!r}: the original's traces key such values by str()), "
                "so one job's losses would hide the other's. Use values whose str() differ "
                "(e.g. 'none' for None)."
            )
        traced[trace] = v


def _refuse_equal(name: str, first: Any, v: Any) -> None:
    if repr(first) == repr(v):
        raise SweepError(
            f"axis {name!r} lists {v!r} twice; each value of an axis names one job, so give "
            "each value once (use a 'trial' axis for repeats)."
        )
    raise SweepError(
        f"axis {name!r} lists {first!r} and {v!r}, which compare equal in Python "
        f"({first!r} == {v!r}), so both would key the same job and one result would be "
        "lost. Keep one of them, or use values that differ (e.g. strings for labels)."
    )


def _equality_key(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:  # arrays, dicts: equal contents show as equal text
        return ("unhashable", repr(value))
    return value


def _warn_overridden(
    names: Sequence[str], targets: Sequence[str | None], hp_overrides: Mapping[str, Any]
) -> None:
    """An axis sets its hyperparameter for every job: a config value it replaces is never used."""
    for name, target in zip(names, targets):
        if target is None or target not in hp_overrides:
            continue
        value = hp_overrides[target]
        if _equality_key(value) != _equality_key(H.DEFAULTS[target]):
            warnings.warn(
                f"{target}={value!r} in the config is not used: the iterator {name!r} sets "
                f"{target} for every job. Drop one of the two (put the values you want in the "
                "iterator).",
                UserWarning,
                stacklevel=4,
            )


def build_jobs(
    axes_values: Sequence[Sequence[Any]],
    names: Sequence[str],
    hp_overrides: Mapping[str, Any],
) -> list[Job]:
    """Every job of the sweep, validated before anything trains."""
    targets = [axis_target(n) for n in names]
    for name, values in zip(names, axes_values):
        check_distinct(name, values)
    _warn_overridden(names, targets, hp_overrides)
    jobs = []
    for index, key in enumerate(itertools.product(*axes_values)):
        overrides = dict(hp_overrides)
        for name, target, value in zip(names, targets, key):
            if name.startswith(OPTIMIZER_ARG_AXIS):
                arg = name[len(OPTIMIZER_ARG_AXIS) :]
                overrides[target] = {**overrides.get(target, {}), arg: value}
            elif target is not None:
                overrides[target] = value
        try:
            hp = H.resolve(overrides)
        except H.HParamError as err:
            label = ", ".join(f"{n}={v!r}" for n, v in zip(names, key))
            raise H.HParamError(f"job ({label}): {err}") from None
        seed = job_seed(hp.SEED, names, key) if hp.DETERMINISTIC else secrets.randbits(63)
        jobs.append(
            Job(
                key=tuple(key),
                axes=tuple(names),
                hp=hp,
                seed=seed,
                index=index,
                values=dict(zip(names, key)),
            )
        )
    counts = {len(job.hp.LOSS_CHECKPOINTS) for job in jobs}
    if len(counts) > 1:
        raise SweepError(
            f"jobs have different numbers of LOSS_CHECKPOINTS ({sorted(counts)}); timekeys of "
            "one sweep must share a shape, so give every job the same number of thresholds."
        )
    return jobs


def job_fingerprint(job: Job) -> dict[str, Any]:
    """The job-scoped hyperparameters as plain data (what a resumed run must agree on)."""
    d = dataclasses.asdict(job.hp)
    return {k: _plain(d[k]) for k in H.JOB_FIELDS}


def _plain(value: Any) -> Any:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value
