"""Running the engine in subprocesses from tests: environment, DeepSpeed availability, timeouts."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


requires_deepspeed = pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # DeepSpeed builds a small op on first init (~40 s); keep it in a cache that CI keeps between runs
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/simmim-fast-ci/torch_extensions"))
    env.setdefault("DS_BUILD_OPS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nothing listens on now (the launcher's default 29500 collides with any other run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list:
    exe = shutil.which("deepspeed")
    return ([exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]) + ["--master_port", str(free_port())]


def run(cmd, timeout: float, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(autouse=False)
def one_thread():
    """In-process training tests: one intra-op thread (two threads on a shared 2-core CI box oversubscribe
    and run 10-100x slower)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
