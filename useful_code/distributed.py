"""Distributed training set-up: DeepSpeed on CPU-only machines and loading models while ZeRO-3 is active."""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager

import torch
from transformers.integrations import deepspeed as hf_deepspeed

from useful_code.cli import UserError, first_rank
from useful_code.hardware import bf16_available, has_accelerator

# Set by the launchers (deepspeed, torchrun, accelerate launch); without any, a DeepSpeed run is a world of one.
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def set_single_process_env() -> None:
    """Without a launcher, describe this process as a world of one on this host. DeepSpeed otherwise asks MPI who the
    ranks are (mpi4py, which plain `python script.py --deepspeed ...` neither needs nor usually has); this sets the
    same variables its MPI discovery would for one process."""
    if any(name in os.environ for name in LAUNCHER_ENV):
        return
    with socket.socket() as s:  # a port free now, for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_distributed_for_cpu(uses_deepspeed: bool) -> bool:
    """Set up DeepSpeed's process group where it needs it, before TrainingArguments: a world of one without a launcher
    (set_single_process_env); on a machine without an accelerator, DeepSpeed's gloo process group.

    Accelerate sets up no distributed state without CUDA, so the Trainer would count world size 1 while
    DeepSpeed counts the launcher's ranks; initialising DeepSpeed's comm layer first makes both agree.
    Returns True when this machine has no accelerator (so TrainingArguments need use_cpu=True)."""
    if uses_deepspeed:
        set_single_process_env()
        # DeepSpeed's ZeRO calls these torch collectives by their old names, and torch warns at every step: noise the
        # user cannot act on (hundreds of lines a run).
        for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
            warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated",
                                    category=FutureWarning)
    if has_accelerator():
        return False
    if uses_deepspeed and "LOCAL_RANK" in os.environ:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return True


class HardwareAwareArguments:
    """Mixin for TrainingArguments subclasses (ours, TRL's configs): the same config trains on a GPU or a CPU-only
    machine. Before the arguments fix the world size it starts DeepSpeed's CPU process group where needed, trains
    on the CPU without an accelerator, and uses bf16 only where the GPU has it (with a printed note otherwise). An
    --optim or --report_to whose package is missing is one line (check_optional_packages)."""

    def __post_init__(self):
        # Checked before DeepSpeed starts (its first start builds an op for minutes) and before the bf16 note below,
        # which would hide the clash from transformers' own check.
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{") \
                and not os.path.isfile(self.deepspeed):
            raise UserError(f"--deepspeed: {self.deepspeed}: no such file (a DeepSpeed JSON config, e.g. "
                            "deepspeed_configs/deepspeed_3.json)")
        for flag in ("bf16_full_eval", "fp16_full_eval"):
            if getattr(self, flag, False):  # the Trainer casts the model itself, which is then saved in half precision
                raise UserError(f"--{flag} is not supported: the Trainer would cast the trained model itself to half "
                                "precision to evaluate it, and the final checkpoint would be saved so (evaluation "
                                "runs in the training precision: --bf16 covers it)")
        if self.fp16 and self.bf16:
            raise UserError("--bf16 and --fp16 are both on (bf16 may come from the recipe or the script's default): "
                            "pass --bf16 false to train in fp16")
        if init_distributed_for_cpu(self.deepspeed is not None):
            self.use_cpu = True
        if self.fp16:
            self.bf16 = False
        elif self.bf16 and not bf16_available():
            if first_rank():
                print("bf16 requested but this machine has no bf16-capable GPU: using fp32")
            self.bf16 = False
        elif self.bf16 is None:
            self.bf16 = bf16_available()
        with warnings.catch_warnings():
            # Recipes and upstream's commands use gradient_checkpointing, which transformers 5 keeps as an alias of
            # activation_checkpointing and warns about on every run.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            super().__post_init__()
        if self.deepspeed:
            check_deepspeed_config(self)
        check_optional_packages(self)


# transformers' names for what it fills into a DeepSpeed config, as this project's flags
DEEPSPEED_FILLED_FROM = {"train_batch_size (calculated)": "--per_device_train_batch_size x "
                                                          "--gradient_accumulation_steps x processes",
                         "bf16|bf16_full_eval": "--bf16", "fp16|fp16_full_eval": "--fp16",
                         "adam_beta1+adam_beta2": "--adam_beta1, --adam_beta2"}


def check_deepspeed_config(training_args) -> None:
    """A DeepSpeed config that contradicts the flags (batch sizes, accumulation, learning rate, precision: what
    transformers fills in where the config says "auto"), or a ZeRO-3 config that saves no full weights: one line
    before any work. transformers and DeepSpeed find the first kind only once training starts, as a traceback on
    every rank; the second, only when the finished run's checkpoint holds no weights."""
    config = training_args.hf_deepspeed_config
    flag = f"--deepspeed {training_args.deepspeed}" if isinstance(training_args.deepspeed, str) else "--deepspeed"
    if config.mismatches:
        clashes = []
        for line in config.mismatches:  # "- ds train_batch_size=64 vs hf train_batch_size (calculated)=32"
            ours, theirs = line.removeprefix("- ds ").split(" vs hf ", 1)
            key, ds_value = ours.split("=", 1)
            name, value = theirs.rsplit("=", 1)
            clashes.append(f"{key} is {ds_value} there, {value} from {DEEPSPEED_FILLED_FROM.get(name, '--' + name)}")
        bf16 = (" (this machine has no bf16-capable GPU: the run is fp32)"
                if not bf16_available() and any("bf16.enabled" in m for m in config.mismatches) else "")
        raise UserError(f"{flag}: the config contradicts the run's flags: {'; '.join(clashes)}{bf16}; set these "
                        "config values to \"auto\" (filled in from the flags) or change the flags")
    if config.is_zero3() and not config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save"):
        raise UserError(f"{flag}: a ZeRO-3 config needs \"stage3_gather_16bit_weights_on_model_save\": true in "
                        "zero_optimization, or the final checkpoint gets no full weights (see "
                        "deepspeed_configs/deepspeed_3.json)")


def weights_dtype(training_args, frozen_base: bool = False) -> torch.dtype:
    """The dtype to load a model's weights in for training: fp32, unless --bf16 is on and either DeepSpeed is
    configured (ZeRO keeps its own fp32 master weights and trains those; loading in bf16 halves the memory at load)
    or the base is frozen (LoRA / QLoRA: the base is never updated; wrap_with_lora keeps what trains in fp32).

    Why not bf16 always: without DeepSpeed, transformers' Trainer trains the weights in the dtype they were loaded in
    and only autocasts the compute to bf16, so bf16 weights get bf16 AdamW states and updates, and an update below
    ~2^-8 of its weight rounds away (most of them at upstream's learning rates, 2e-6..1e-5): the model barely trains.
    fp32 weights with bf16 autocast is mixed precision, as TRL's RewardTrainer runs by default."""
    if training_args.bf16 and (training_args.deepspeed or frozen_base):
        return torch.bfloat16
    return torch.float32


def compute_dtype(training_args) -> torch.dtype:
    """The dtype the forward passes compute in: bf16 (fp16) with --bf16 (--fp16), under the Trainer's autocast or
    DeepSpeed's bf16 weights; fp32 otherwise. The reload checks' tolerance follows it (checkpoints.verify_reload)."""
    if training_args.bf16:
        return torch.bfloat16
    return torch.float16 if getattr(training_args, "fp16", False) else torch.float32


def precision_summary(training_args, weights: torch.dtype, frozen_base: bool = False) -> str:
    """What a run trains in, for its printed settings and metrics.json: e.g. 'weights=float32 compute=bf16
    autocast'; 'compute=bf16 DeepSpeed' where DeepSpeed holds bf16 weights (and fp32 master weights)."""
    compute = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype(training_args), "fp32")
    if compute != "fp32":
        compute += " DeepSpeed" if training_args.deepspeed else " autocast"
    held = str(weights).removeprefix("torch.")
    if frozen_base and weights != torch.float32 and not training_args.deepspeed:
        held += " (frozen base; trained parameters float32)"
    return f"weights={held} compute={compute}"


def check_optional_packages(training_args) -> None:
    """An --optim or --report_to that needs a package this machine lacks: one line before any work, not a traceback
    once the data is loaded."""
    from transformers import Trainer
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    try:
        Trainer.get_optimizer_cls_and_kwargs(training_args)
    except ImportError as err:
        optim = getattr(training_args.optim, "value", training_args.optim)  # an OptimizerNames member once parsed
        raise UserError(f"--optim {optim} needs a package that is not installed "
                        f"({str(err).splitlines()[0]}); or pass --optim adamw_torch") from None
    except ValueError:  # GaLore, LOMO, ... need the model: the Trainer checks them when it builds the optimizer
        pass
    available = get_available_reporting_integrations()
    for name in training_args.report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"--report_to {name}: not a reporter; pass none or one of "
                            f"{', '.join(INTEGRATION_TO_CALLBACK)}")
        # flyte is only available inside a Flyte task, which the Trainer checks when it starts
        if name != "flyte" and name not in available:
            raise UserError(f"--report_to {name} needs the {name} package, which is not installed: pip install {name}, "
                            f"or pass --report_to none")


@contextmanager
def outside_zero3():
    """Load a model whole on this process while a ZeRO-3 run is active: inside it, from_pretrained would partition
    the weights with collectives that the other ranks (not loading) never join, and hang."""
    zero3_config = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3_config
