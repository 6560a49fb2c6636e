#!/usr/bin/env python
"""SimMIM pretraining. `python train.py --config configs/swin_tiny_cpu.json` (one process) or
`deepspeed train.py --config configs/swin_l.json` (all GPUs). Options: docs/ENGINE.md."""
import sys

from simmim_fast.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
