"""Starting a stage under `accelerate launch` with several CPU processes, as users do on GPUs."""

from __future__ import annotations

import os
import subprocess
import sys

from artmaster.config import project_root


def accelerate_launch(module: str, overrides: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes <processes> -m <module> <overrides>`, offline, output captured."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=project_root(), env=env, capture_output=True, text=True, timeout=600)
