"""What every training run records in metrics.json: its losses, steps, timings, precision, arguments, command line
and library versions."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from useful_code.hardware import peak_gpu_memory_mib
from useful_code.model_card import launch_command

# Training arguments recorded in metrics.json: those that decide the trained weights (the full set is hundreds of
# fields; metrics.json also keeps the command line and the recipe).
RECORDED_TRAINING_ARGS = ("output_dir", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                          "gradient_accumulation_steps", "num_train_epochs", "max_steps", "max_length", "packing",
                          "packing_strategy", "group_by_length", "dataloader_drop_last", "lr_scheduler_type",
                          "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "optim_args",
                          "adam_beta1", "adam_beta2", "adam_epsilon", "activation_checkpointing", "bf16", "fp16",
                          "seed", "data_seed", "full_determinism", "deepspeed")


def write_run_metrics(output_dir: str, metrics: dict, started: float, train_result, script_args, training_args,
                      precision: str, resumed_from: Optional[str] = None) -> str:
    """Add what every training run records (losses, steps, timings, world size, precision: the weights' and the
    compute's dtypes as distributed.precision_summary gives them, the arguments, the command line, library versions)
    to the script's own metrics and write <output_dir>/metrics.json; return its path. A run resumed from a
    checkpoint records where; its train_loss is null, since transformers averages the loss over the steps of this
    process only (0 when none were left), and that mean is kept as resumed.train_loss_of_these_steps."""
    training = training_args.to_dict()
    train_loss, resumed = train_result.training_loss, None
    if resumed_from:
        at_step = json.loads((Path(resumed_from) / "trainer_state.json").read_text())["global_step"]
        resumed = {"from": str(resumed_from), "at_step": at_step,
                   "train_loss_of_these_steps": train_loss if train_result.global_step > at_step else None}
        train_loss = None
    metrics = {
        "train_loss": train_loss,
        "train_steps": train_result.global_step,
        **({"resumed": resumed} if resumed else {}),
        **metrics,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "world_size": training_args.world_size,
        "peak_gpu_memory_mib": peak_gpu_memory_mib(),  # this rank's; None on a CPU
        "dtype": precision,
        "arguments": {**asdict(script_args), **{k: training[k] for k in RECORDED_TRAINING_ARGS if k in training}},
        "command": launch_command(),
        "versions": library_versions(),
    }
    path = os.path.join(output_dir, "metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    return path


def library_versions() -> dict[str, str]:
    """Versions that decide a result, recorded with every run."""
    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "deepspeed", "datasets", "accelerate", "trl"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
