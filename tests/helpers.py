"""Running the project's scripts from tests, as a user would from the repo root."""

import os
import subprocess
import sys
from pathlib import Path

from useful_code import rm_utils

ROOT = rm_utils.REPO_ROOT
BIN = Path(sys.executable).parent


def run(cmd, env_extra=None, timeout=600):
    """Run a command from the repo root; return the completed process (output captured)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(proc):
    """Fail with the command's output tail when it did not exit 0."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
