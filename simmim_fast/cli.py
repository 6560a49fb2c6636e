"""The command line's one front door: ``simmim-fast COMMAND`` and ``train.py`` both come here.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs, so ``simmim-fast
--help`` is fast and a tool's heavy imports (DeepSpeed, DALI) cost nothing elsewhere.
Jobs (pretrain, finetune) declare their shared options with ``add_job_arguments``; tools that read
a config with ``add_config_arguments``. A ``UserError`` from anywhere is caught in ``run_main``
alone: one ``error: ...`` line on rank 0 and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .errors import EXIT_USAGE, RunStopped, UserError

__all__ = ["COMMANDS", "add_config_arguments", "add_weights_arguments", "add_job_arguments", "run_main", "main",
           "output_location"]

# name -> (module, one-line help). Add a tool by adding a line here.
COMMANDS = {
    "config-docs": ("simmim_fast.config_docs", "print the config reference (docs/CONFIG.md) as Markdown"),
    "pretrain": ("simmim_fast.jobs.pretrain", "SimMIM pretraining, as train.py (one process; deepspeed "
                                              "launches train.py)"),
    "finetune": ("simmim_fast.jobs.finetune", "fine-tune a pretrained encoder (layer decay, mixup) via the engine"),
    "export": ("simmim_fast.tools.export", "pretrained encoder -> plain timm weights (.safetensors and .pth)"),
    "knn": ("simmim_fast.tools.knn", "weighted kNN top-1 on frozen encoder features"),
    "linear-probe": ("simmim_fast.tools.linear_probe", "linear classifier top-1 on frozen encoder features"),
    "visualize": ("simmim_fast.tools.visualize", "reconstruction PNGs for a checkpoint; inpaint a user mask"),
    "scan": ("simmim_fast.data.scan", "check a dataset and report the files training would skip"),
    "stats": ("simmim_fast.data.stats", "per-channel mean/std of a dataset, as --set data.mean/data.std lines"),
    "shard": ("simmim_fast.data.shard", "write a dataset as WebDataset tar shards (+ DALI .idx files, manifest.json)"),
    "plan": ("simmim_fast.tools.plan", "memory planner: ZeRO stage x offload x checkpointing, micro batch and "
                                       "accumulation that fit N GPUs of M GB"),
}


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False,
                         help: str = "config JSON file (see docs/CONFIG.md)") -> None:
    """``--config`` and ``--set KEY=VALUE`` (into ``args.overrides``), the same for every command."""
    parser.add_argument("--config", required=required, help=help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.base_lr=1e-4 (repeatable; JSON values)")


def add_weights_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The weights a tool reads (a checkpoint or a state file, see ``simmim_fast.weights``) and their config."""
    parser.add_argument("checkpoint", nargs=None if required else "?",
                        help="pretraining output dir, checkpoints dir, one checkpoint dir, or a SimMIM "
                             "state-dict file (.pt/.pth/.bin/.safetensors)")
    add_config_arguments(parser, help="config JSON (needed when the weights carry none; overrides the stored "
                                      "config otherwise)")


def add_job_arguments(parser: argparse.ArgumentParser, config_help: str = "config JSON file (see docs/CONFIG.md)"
                      ) -> None:
    """The options every training job shares: config, overrides, output dir, resume."""
    add_config_arguments(parser, required=True, help=config_help)
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints, metrics.jsonl, TensorBoard logs and loss_curve.png go "
                             "(default: runs/<config name>)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (continue from <output-dir>/checkpoints/latest if there is one), 'none' "
                             "(start fresh; the output dir must hold no checkpoints), or a checkpoint path")
    # deepspeed's launcher passes --local_rank; the rank comes from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def output_location(path, what: str = "output") -> Path:
    """``path`` with its parent folder created: a UserError naming the path if that is impossible (a file
    in the way, no permission), so a tool fails before its heavy work, not after it."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {e.strerror or e} ({e.filename or path.parent}); "
                        f"choose another path") from None
    if path.is_dir() and what != "output folder":
        raise UserError(f"cannot write the {what} {path}: it is a folder")
    return path


def run_main(fn: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace) -> int:
    """``fn(args)``, with a UserError turned into one ``error:`` line (rank 0 only) and exit status 2, and a
    stopped run (``RunStopped``: non-finite loss, signal) into its one line and its exit status."""
    try:
        return int(fn(args) or 0)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RunStopped as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{e.prefix}{_one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:  # a file the user named or an output place that fails: the environment, not a bug
        if int(os.environ.get("RANK", 0)) == 0:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            print(f"error: {e.strerror or _one_line(e)}{where}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simmim-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        # Arguments are declared by the module, imported only when its command runs.
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def command_parser(name: str, prog: Optional[str] = None):
    """(parser with the command's arguments, its module) for one subcommand."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=prog or f"simmim-fast {name}", description=help_text)
    module.add_arguments(sub)
    return sub, module


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else EXIT_USAGE
    sub, module = command_parser(argv[0])
    return run_main(module.main, sub.parse_args(argv[1:]))


def train_main(argv: Optional[List[str]] = None) -> int:
    """``train.py``: the pretrain command under its own name (``python train.py``, ``deepspeed train.py``)."""
    sub, module = command_parser("pretrain", prog="train.py")
    return run_main(module.main, sub.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
