"""``train.py`` with one injected fault, for tests/test_faults.py: ``FAULT=<kind>:<step> python fault_worker.py ARGS``.

    hang_in_save:N   the save of step N writes half of model.pt, creates $FAULT_MARKER and hangs (for kill -9
                     or signals during a save)
    enospc:N         every write into the checkpoint of step N fails with OSError(ENOSPC): a full disk
"""
import errno
import os
import sys
import time
from pathlib import Path

import torch

from simmim_fast.cli import train_main
from simmim_fast.engine import backends


def _partial(step: int) -> str:
    return f".partial-step_{step:08d}"


def main() -> int:
    kind, _, arg = os.environ.get("FAULT", "").partition(":")
    if kind == "hang_in_save":
        original = backends.TorchBackend.write_state

        def write_state(self, d):
            if Path(d).name == _partial(int(arg)):
                (Path(d) / "model.pt").write_bytes(b"half a model")
                Path(os.environ["FAULT_MARKER"]).write_text("in save\n")
                time.sleep(600)
            original(self, d)
        backends.TorchBackend.write_state = write_state
    elif kind == "enospc":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if _partial(int(arg)) in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *a, **k)
        torch.save = save
    elif kind:
        raise SystemExit(f"unknown FAULT {kind!r}")
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
