"""Running the project's scripts from tests, as a user would from the repo root."""

import os
import subprocess
import sys
from pathlib import Path

from useful_code.defaults import REPO_ROOT

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent


def run(cmd, env_extra=None, timeout=600):
    """Run a command from the repo root; return the completed process (output captured)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(proc):
    """Fail with the command's output tail when it did not exit 0."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def sharpened(model, std: float = 0.3, seed: int = 0):
    """A copy of a tiny model with larger random weights (seeded): its outputs vary by several units with the
    tokens and their positions, so a padding, position or row mix-up shows far above test tolerances (the shipped
    std-0.02 weights keep everything close to uniform)."""
    import copy

    import torch

    sharp = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sharp.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return sharp.eval()
