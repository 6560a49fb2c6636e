"""The ``simmim-fast`` command: one entry point, one subcommand per tool.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs, so ``simmim-fast
--help`` is fast and a tool's heavy imports (DeepSpeed, DALI) cost nothing elsewhere.
Pretraining itself is ``train.py`` (``python train.py`` / ``deepspeed train.py``).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help). Add a tool by adding a line here.
COMMANDS = {
    "config-docs": ("simmim_fast.config_docs", "print the config reference (docs/CONFIG.md) as Markdown"),
    "pretrain": ("simmim_fast.engine.pretrain", "SimMIM pretraining, as train.py (one process; deepspeed "
                                                "launches train.py)"),
    "export": ("simmim_fast.tools.export", "pretrained encoder -> plain timm weights (.safetensors and .pth)"),
    "finetune": ("simmim_fast.tools.finetune", "fine-tune a pretrained encoder (layer decay, mixup) via the engine"),
    "knn": ("simmim_fast.tools.knn", "weighted kNN top-1 on frozen encoder features"),
    "linear-probe": ("simmim_fast.tools.linear_probe", "linear classifier top-1 on frozen encoder features"),
    "visualize": ("simmim_fast.tools.visualize", "reconstruction PNGs for a checkpoint; inpaint a user mask"),
    "scan": ("simmim_fast.data.scan", "check a dataset and report the files training would skip"),
    "stats": ("simmim_fast.data.stats", "per-channel mean/std of a dataset, as --set data.mean/data.std lines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simmim-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        # Arguments are declared by the module, imported only when its command runs.
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"simmim-fast {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
