"""Command-line and notebook entry points for hyperparameters (the original's API).

``parse_args()`` for scripts, ``base_args()`` for notebooks. Both return an ``Args``
namespace holding every hyperparameter; set more attributes on it freely
(``args.CLASSES = [0, 6]``): keys that are not hyperparameters travel to batch functions and
grabs as user keys. The original's spellings (``args.width``, ``--width``) read and write the
current names, with a FutureWarning (the table is ``legacy_names.DEPRECATED_NAMES``).

Job-scoped options take one or more values. ``--GAMMA 0.1 1 10`` stores the list
``[0.1, 1.0, 10.0]``, and ``job_iterator.main`` turns a list-valued hyperparameter into a sweep
axis of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelscape.sweep import hparams as H

Extra = Mapping[str, Any]

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    """Parse a command-line boolean: ``False``, ``false`` and ``0`` are False."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False/1/0), got {text!r}")


def parse_int(text: str) -> int:
    """Parse an integer, accepting scientific notation such as ``1e5``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def parse_device(text: str) -> int | str:
    """A CUDA id (``0``) or ``cpu``."""
    if text.strip().lower() == "cpu":
        return "cpu"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a device is a CUDA id or 'cpu', got {text!r}") from None


def parse_none_or_str(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "null", "") else text


def parse_none_or_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "null", "") else parse_int(text)


def parse_int_or_auto(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else parse_int(text)


def parse_json_dict(text: str) -> dict[str, Any]:
    """A JSON object of argument names to values, such as ``{"betas": [0.9, 0.99]}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"betas\": [0.9, 0.99]}}' (names in double "
            f"quotes, the whole in single quotes for the shell), got {text!r}"
        )
    return value


_PARSERS = {"bool": parse_bool, "int": parse_int, "float": float, "str": str}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is the one line that matters and a pointer to ``--help``.

    argparse's own error prints the whole usage block first (about 40 lines of flags here),
    which scrolls the message away.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")


# Namespace attributes kept as lists, as the original's parse_args/base_args gave them, so that
# scripts can iterate them (``iterators = [args.N_SAMPLES, ...]``).
LIST_ATTRIBUTES = ("N_SAMPLES",)


class Args(argparse.Namespace):
    """The namespace of ``parse_args``/``base_args``.

    Reading or writing an attribute by a legacy spelling (``args.width``) uses its current name
    (``WIDTH``) with a FutureWarning, so that ``vars(args)`` holds each hyperparameter once.
    """

    def __getattr__(self, name: str) -> Any:
        if name in H.DEPRECATED_NAMES:
            return getattr(self, H.canonical_name(name))
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(H.canonical_name(name), value)


def _extra_specs(extra: Extra | None) -> dict[str, tuple[Any, str]]:
    specs: dict[str, tuple[Any, str]] = {}
    for name, spec in (extra or {}).items():
        if name in H.FIELDS:
            raise H.HParamError(f"{name} is already a built-in hyperparameter; pick another name.")
        if (
            name in H.DEPRECATED_NAMES
            or name in H.LEGACY_MODEL_FILE.values()
            or (name in H.LEGACY_MODEL_FILE)
        ):
            raise H.HParamError(
                f"{name} is the original modelscape's spelling of "
                f"{H.DEPRECATED_NAMES.get(name, 'MODEL_CLASS')}; pick another name."
            )
        default, help_ = spec if isinstance(spec, tuple) else (spec, "user hyperparameter")
        specs[name] = (default, help_)
    return specs


def _value_parser(default: Any):
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return parse_int
    if isinstance(default, float):
        return float
    return str


def build_parser(
    extra: Extra | None = None,
    defaults: Mapping[str, Any] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """The argparse parser generated from the schema, plus the user's ``extra`` options.

    ``extra`` maps a name to a default, or to ``(default, help)``; its type follows the default,
    and it takes one value unless the default is a list. ``defaults`` are the script's own
    defaults, shown by ``--help``.
    """
    parser = ArgumentParser(
        prog=prog,
        description=description or "Job options take several values to sweep them.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    shown = _defaults(extra, defaults)
    parser.add_argument("--config", type=Path, help="YAML or JSON file of hyperparameter values.")
    for name, f in H.FIELDS.items():
        help_ = f"{f.metadata['help']} (default: {shown[name]!r})"
        parser.add_argument(f"--{name}", help=help_, **_flag_options(name))
    for old, new in H.DEPRECATED_NAMES.items():
        if new in H.FIELDS:
            parser.add_argument(f"--{old}", dest=old, help=argparse.SUPPRESS, **_flag_options(new))
    for file_key, name_key in H.LEGACY_MODEL_FILE.items():
        for key in (file_key, name_key):
            parser.add_argument(f"--{key}", dest=key, type=str, help=argparse.SUPPRESS)
    for name, (default, help_) in _extra_specs(extra).items():
        help_ = f"{help_} (default: {shown[name]!r})"
        if isinstance(default, list):
            item = _value_parser(default[0]) if default else str
            parser.add_argument(f"--{name}", nargs="+", type=item, help=help_)
        else:
            parser.add_argument(f"--{name}", type=_value_parser(default), help=help_)
    return parser


def _flag_options(name: str) -> dict[str, Any]:
    """``add_argument`` options of a schema field's flag: its parser and how many values."""
    f = H.FIELDS[name]
    kind = H.kind_of(name)
    many = "+" if f.metadata["scope"] == "job" else None
    if name == "DEVICES":
        return {"nargs": "+", "type": parse_device}
    if name == "LOSS_CHECKPOINTS":
        return {"nargs": "+", "type": float}
    if kind in ("path", "model", "optional_str"):
        return {"type": parse_none_or_str}
    if kind == "optional_int":
        return {"type": parse_none_or_int}
    if kind == "int_or_auto":
        return {"type": parse_int_or_auto}
    if kind == "class":
        return {"nargs": many, "type": str}
    if kind == "dict":
        return {"type": parse_json_dict}
    return {"nargs": many, "type": _PARSERS[kind], "choices": f.metadata["choices"]}


def _unwrap(value: Any) -> Any:
    """A one-element list from ``nargs='+'`` becomes a scalar; several values stay a list."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file of hyperparameter values.

    Raises ``HParamError`` naming the file when it is missing, unreadable or not valid YAML/JSON.
    """
    path = Path(path)
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise H.HParamError(
            f"--config file {path} {where} (looked in {Path.cwd()}); give the path of a YAML or "
            "JSON file of NAME: value lines."
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise H.HParamError(f"--config file {path} cannot be read: {err}.") from None
    data = _parse_config_text(path, text)
    if not isinstance(data, dict):
        raise H.HParamError(
            f"{path} must hold a mapping of NAME: value, got {type(data).__name__}."
        )
    return {key: _from_text(key, value) for key, value in data.items()}


def _parse_config_text(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise H.HParamError(
                f"--config file {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                f"column {err.colno}. Fix that line (JSON needs double quotes and no trailing "
                "commas), or write the file as YAML."
            ) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        tabs = (
            " YAML does not allow tabs for indentation: indent with spaces." if "\t" in text else ""
        )
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise H.HParamError(
            f"--config file {path} is not valid YAML{where}: {problem}.{tabs} Each line should "
            "read NAME: value."
        ) from None


def _from_text(key: str, value: Any) -> Any:
    """YAML reads ``1e-2`` as a string: numbers written as text parse as on the command line."""
    name = H.DEPRECATED_NAMES.get(key, key)
    if isinstance(value, str) and name in H.FIELDS and H.kind_of(name) in ("int", "float"):
        try:
            return _PARSERS[H.kind_of(name)](value)
        except (ValueError, argparse.ArgumentTypeError):
            return value  # the schema check reports it with the expected type
    return value


def explicit_names(argv: Sequence[str], extra: Extra | None = None) -> set[str]:
    """The hyperparameters ``argv`` sets itself, by a flag or in its ``--config`` file.

    For entry points that fix some values themselves (the demo's axes): what the user gave
    explicitly must win over them, never be dropped.
    """
    parsed, _ = build_parser(extra).parse_known_args(list(argv))
    given = dict(vars(parsed))
    config_file = given.pop("config", None)
    names = set(given)
    if config_file is not None:
        names |= set(load_config_file(config_file))
    return {H.DEPRECATED_NAMES.get(n, n) for n in names}


def _defaults(extra: Extra | None, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema's defaults, the ``extra`` options' and then the script's own ``defaults``."""
    values = dict(H.DEFAULTS)
    values.update({n: d for n, (d, _) in _extra_specs(extra).items()})
    _apply(values, defaults or {}, set(_extra_specs(extra)), "defaults")
    return values


def _namespace(values: dict[str, Any]) -> Args:
    for name in LIST_ATTRIBUTES:
        if not isinstance(values[name], (list, tuple)):
            values[name] = [values[name]]
    args = Args()
    vars(args).update(values)
    return args


def _apply(values: dict[str, Any], updates: Mapping[str, Any], extra_names: set[str], source: str):
    for name, value in H.merge_legacy(updates).items():
        if name not in H.FIELDS and name not in extra_names:
            raise H.HParamError(f"{source}: {H.unknown_message(name)}")
        if name in H.FIELDS:
            _check(name, value)
        values[name] = value


def _check(name: str, value: Any) -> None:
    """Type-check a value (each element of a sweep list for job options)."""
    sweepable = H.FIELDS[name].metadata["scope"] == "job" and H.kind_of(name) != "list"
    items = value if (sweepable and isinstance(value, list)) else [value]
    for item in items:
        H.coerce(name, item)


def parse_args(
    argv: Sequence[str] | None = None,
    extra: Extra | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> argparse.Namespace:
    """Parse hyperparameters from the command line (for .py scripts).

    Precedence: the schema's defaults < the script's ``defaults`` < ``--config FILE`` < flags
    given explicitly. ``defaults={"WIDTH": 256, "ONLINE": False}`` sets the script's own
    defaults, which ``--help`` shows. ``extra`` declares the user's own options,
    ``{"DATASET": ("digits", "which data set")}``. An unknown ``--NAME`` is an error listing
    the valid names.
    """
    parser = build_parser(extra, defaults)
    return parse_with(parser, argv, extra, defaults)


def parse_with(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    extra: Extra | None = None,
    defaults: Mapping[str, Any] | None = None,
    own: Collection[str] = (),
) -> Args:
    """``parse_args`` with a parser from ``build_parser`` that the caller extended.

    ``own`` names the ``dest`` of options the caller added (``--out``): they are left out of
    the hyperparameters (read them with ``parser.parse_known_args``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_message(unknown[0], argv, extra))
    given = {k: v for k, v in vars(parsed).items() if k not in own and k != "config"}
    values = _defaults(extra, defaults)
    extra_names = set(_extra_specs(extra))
    config_file = getattr(parsed, "config", None)
    if config_file is not None:
        _apply(values, load_config_file(config_file), extra_names, str(config_file))
    extra_lists = {n for n, (d, _) in _extra_specs(extra).items() if isinstance(d, list)}
    flags = {}
    for key, value in given.items():
        name = H.DEPRECATED_NAMES.get(key, key)
        keep_list = name in extra_lists or (name in H.FIELDS and H.kind_of(name) == "list")
        flags[key] = value if keep_list or name in LIST_ATTRIBUTES else _unwrap(value)
    _apply(values, flags, extra_names, "command line")
    return _namespace(values)


def _unknown_message(item: str, argv: list[str], extra: Extra | None) -> str:
    """What an argument argparse could not place means: a misspelt flag, or a second value
    given to an option that takes one (``--NUM_TRIALS 2 3``)."""
    if item.startswith("-"):
        return H.unknown_message(item.lstrip("-").split("=")[0])
    for i, arg in enumerate(argv):
        flags = [k for k in range(i) if argv[k].startswith("--")]
        if arg != item or not flags or i == flags[-1] + 1:
            continue  # another token, or the flag's own first value
        flag = argv[flags[-1]]
        name = H.DEPRECATED_NAMES.get(flag[2:], flag[2:])
        if name in H.FIELDS and _flag_options(name).get("nargs") is None:
            return (
                f"{flag} takes one value, so {item!r} is left over. Only job options (LR, "
                "WIDTH, GAMMA, ...) take several values, to sweep them."
            )
        specs = _extra_specs(extra)
        if name in specs and not isinstance(specs[name][0], list):
            return (
                f"{flag} takes one value, so {item!r} is left over (an option of your own takes "
                "several when its default is a list)."
            )
    return f"unexpected value {item!r}: give hyperparameters as --NAME value."


def base_args(extra: Extra | None = None, **overrides: Any) -> argparse.Namespace:
    """The defaults as a namespace (for notebooks), with optional ``overrides``.

    ``base_args(WIDTH=256, LR=0.1)`` is checked against the schema like the command line.
    ``N_SAMPLES`` is a list, as in the original, so ``[args.N_SAMPLES, ...]`` is an iterator.
    """
    values = _defaults(extra)
    _apply(values, overrides, set(_extra_specs(extra)), "base_args")
    return _namespace(values)
