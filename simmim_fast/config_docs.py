"""``simmim-fast config-docs``: print every config key with type, default and meaning."""
from __future__ import annotations

import argparse

from .config import schema_markdown


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
