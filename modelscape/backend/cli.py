"""Moved to ``modelscape.cli.args``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.cli.args import (
    LIST_ATTRIBUTES,
    Args,
    Extra,
    base_args,
    build_parser,
    explicit_names,
    load_config_file,
    parse_args,
    parse_bool,
    parse_device,
    parse_int,
    parse_none_or_int,
    parse_none_or_str,
)

__all__ = [
    "Extra",
    "parse_bool",
    "parse_int",
    "parse_device",
    "parse_none_or_str",
    "parse_none_or_int",
    "LIST_ATTRIBUTES",
    "Args",
    "build_parser",
    "load_config_file",
    "explicit_names",
    "parse_args",
    "base_args",
]
