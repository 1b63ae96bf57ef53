"""Starting a stage under `accelerate launch` with several CPU processes, as users do on GPUs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from artmaster.config import project_root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(module: str, overrides: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes <processes> -m <module> <overrides>`, offline, output captured.
    Each launch rendezvous on its own free port, so tests may run side by side (pytest -n)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", module, *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=project_root(), env=env, capture_output=True, text=True, timeout=600)
