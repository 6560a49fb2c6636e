"""docs/CONFIG.md, generated from the schema's help texts; ``simmim-fast config-docs`` prints it."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from .config import Config
from .typed_config import config_to_dict, type_name

__all__ = ["schema_markdown", "add_arguments", "main"]


def _rows(prefix: str, tp: type) -> list:
    """One table row per key of the dataclass ``tp``; a nested dataclass (e.g. logging.probe) gives a row
    naming the sub-section, then one row per key of it."""
    rows = []
    hints = typing.get_type_hints(tp)
    for sf in dataclasses.fields(tp):
        key = f"{prefix}.{sf.name}"
        if dataclasses.is_dataclass(hints[sf.name]):
            rows.append(f"| `{key}` | object | | {sf.metadata['help']} Keys: |")
            rows += _rows(key, hints[sf.name])
            continue
        default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()
        rows.append(f"| `{key}` | {type_name(hints[sf.name])} | "
                    f"`{json.dumps(config_to_dict(default) if isinstance(default, tuple) else default)}` | "
                    f"{sf.metadata['help']} |")
    return rows


def schema_markdown() -> str:
    """Every config key with its type, default and meaning, as Markdown (docs/CONFIG.md)."""
    lines = ["# Config reference", "",
             "Generated from `simmim_fast/config.py` by `simmim-fast config-docs -o docs/CONFIG.md`.",
             "Every key is optional; the default is used where a file leaves a key out. Unknown keys, wrong "
             "types and inconsistent values are errors that name the key.", ""]
    top = typing.get_type_hints(Config)
    scalars = []
    for f in dataclasses.fields(Config):
        tp = top[f.name]
        if not dataclasses.is_dataclass(tp):
            scalars.append((f, tp))
            continue
        lines += [f"## `{f.name}`: {f.metadata['help']}", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        lines += _rows(f.name, tp)
        lines.append("")
    lines += ["## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for f, tp in scalars:
        lines.append(f"| `{f.name}` | {type_name(tp)} | `{json.dumps(f.default)}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", help="write to this file instead of standard output")


def main(args: argparse.Namespace) -> int:
    text = schema_markdown()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0
