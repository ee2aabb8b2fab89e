"""How a sweep travels to worker processes and Ray tasks: one ``Payload``, cloudpickled.

Batch functions, grabs, model classes and ``post_init_fn`` defined in a notebook, in ``__main__``
or as closures and lambdas are pickled with their code, so workers need not import them.
``Payload.pickle()`` runs before any worker starts; when something cannot be pickled it raises
a ``SweepError`` that names the object (down to the closure variable or global a function uses)
and the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import cloudpickle

from modelscape.errors import SweepError
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec

_FIX = (
    "Create such objects inside the function (or in the batch function's setup), pass plain "
    "data instead, or train in this process (one device with WORKERS_PER_DEVICE=1, or "
    "use_mp=False), where nothing is pickled."
)


class Payload:
    """A sweep's spec and its groups of jobs: all an executor sends to where jobs train.

    An in-process executor uses ``spec`` and ``groups`` as they are. ``pickle()`` turns them
    into bytes once, before any worker starts, so that something unpicklable fails the sweep
    early; ``spec_blob`` and ``group_blob(i)`` are then what travels. Workers forked from this
    process inherit the spec as it is (``pickle(spec=False)``: ``spec_blob`` stays empty), so
    its data is neither copied nor required to pickle; only the groups travel.
    """

    def __init__(self, spec: SweepSpec, groups: Sequence[Sequence[Job]]):
        self.spec = spec
        self.groups = [list(g) for g in groups]
        self.spec_blob = b""
        self._group_blobs: list[bytes] = []
        self._pickled = False

    def pickle(self, spec: bool = True) -> None:
        if spec:
            self.spec_blob = dumps(self.spec, "the sweep's functions and data")
        self._group_blobs = [dumps(g, "a job") for g in self.groups]
        self._pickled = True

    def group_blob(self, gid: int) -> bytes:
        return self._group_blobs[gid]

    def add_group(self, group: Sequence[Job]) -> int:
        """A new group (a retry of part of another); returns its index."""
        self.groups.append(list(group))
        if self._pickled:
            self._group_blobs.append(dumps(self.groups[-1], "a job"))
        return len(self.groups) - 1


def dumps(obj: Any, what: str) -> bytes:
    """cloudpickle ``obj``; on failure, a ``SweepError`` naming the part that cannot travel."""
    try:
        return cloudpickle.dumps(obj)
    except Exception as err:  # noqa: BLE001 - any pickling error becomes one clear message
        raise SweepError(_explain(obj, what, err)) from err


def loads(data: bytes) -> Any:
    """The object ``dumps`` pickled (in a worker: a spec or a group of jobs)."""
    return cloudpickle.loads(data)


def _parts(obj: Any, what: str) -> Iterator[tuple[str, Any]]:
    """The named pieces of a sweep spec or a job group, for pointing at the one that fails."""
    if isinstance(obj, SweepSpec):
        yield "bfn_config['base_bfn']", obj.base_bfn
        for k, v in obj.bfn_kwargs.items():
            yield f"bfn_config[{k!r}]", v
        for k, v in obj.grabs.items():
            yield f"otherreturns[{k!r}]", v
        for k, v in obj.user_config.items():
            yield f"global_config[{k!r}]", v
        yield "post_init_fn", obj.post_init_fn
        yield "X_te", obj.X_te
        yield "y_te", obj.y_te
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _parts(item, what)
    elif isinstance(obj, Job):
        for name in ("MODEL_CLASS", "OPTIMIZER", "LOSS"):
            yield f"{name} (job {obj.label()})", getattr(obj.hp, name)


def _references(fn: Any) -> Iterator[tuple[str, Any]]:
    """The closure variables and globals a Python function uses."""
    if not inspect.isfunction(fn):
        return
    code = fn.__code__
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell (variable not assigned yet)
            continue
    for name in code.co_names:
        if name in fn.__globals__:
            yield name, fn.__globals__[name]


def _fails(obj: Any) -> BaseException | None:
    try:
        cloudpickle.dumps(obj)
    except Exception as err:  # noqa: BLE001
        return err
    return None


def _explain(obj: Any, what: str, err: BaseException) -> str:
    head = f"{what} cannot be sent to worker processes"
    for name, part in _parts(obj, what):
        part_err = _fails(part)
        if part_err is None:
            continue
        for ref, value in _references(part):
            ref_err = _fails(value)
            if ref_err is not None:
                return (
                    f"{head}: {name} uses {ref!r} (a {type(value).__name__}), which cannot be "
                    f"pickled ({type(ref_err).__name__}: {ref_err}). {_FIX}"
                )
        return (
            f"{head}: {name} (a {type(part).__name__}) cannot be pickled "
            f"({type(part_err).__name__}: {part_err}). {_FIX}"
        )
    return f"{head}: {type(err).__name__}: {err}. {_FIX}"
