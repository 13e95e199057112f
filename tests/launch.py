"""A real 2-process CPU (gloo) `accelerate launch`, shared by the DDP tests of distill and search."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch_two_processes(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run `accelerate launch ... ARGS` with 2 CPU processes from the repository root; output captured.

    ``ACCELERATE_USE_CPU`` with ``--multi_gpu`` really starts two processes (``--cpu`` would start one).
    """
    with socket.socket() as s:  # a free port, so parallel or leftover runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
