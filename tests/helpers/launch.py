"""Starting stages in subprocesses as users do: offline, and under `accelerate launch` with several
CPU processes (as on GPUs)."""

from __future__ import annotations

import os
import socket
import subprocess

from artmaster.config import project_root
from artmaster.processes import launch_command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def offline_env() -> dict[str, str]:
    """This environment, offline (nothing downloads) and with unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def accelerate_launch(module: str, overrides: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes <processes> -m <module> <overrides>`, offline, output captured.
    Each launch rendezvous on its own free port, so tests may run side by side (pytest -n)."""
    command = [*launch_command(module, processes, port=free_port()), *overrides]
    return subprocess.run(command, cwd=project_root(), env=offline_env(), capture_output=True, text=True, timeout=600)
