"""A training run whose loss or gradient norm turns NaN or infinite stops at the next logging step with one line,
and weights no longer finite stop the run before a periodic checkpoint saves them.

Without this, transformers trains on (every later step is NaN), its logging_nan_inf_filter (on by default) logs a
plausible loss, often 0, in place of the NaN, and the run fails only at the end, in the reload check, blaming the
checkpoint; and a checkpoint saved between two logs could hold NaN weights that --resume_from_checkpoint latest
picks up."""

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from useful_code.cli import UserError, report_error


@dataclass
class DivergenceArguments:
    """Mixin for TrainingArguments subclasses, listed before TrainingArguments: logged losses as they are."""

    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "Log a NaN or infinite training loss as the mean of the finite ones (transformers' default). Off "
                "here: a non-finite loss stops the run (useful_code/divergence.py)."})


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise a UserError at the first logged non-finite training loss or gradient norm (the gradient norm is not
    checked under fp16, whose loss scaling skips overflowing steps by design). Every rank logs the same gathered
    values, so every rank stops at the same step and none waits on a collective. The last step is always logged:
    the steps after the last logging step are checked too, and the Trainer's train_loss then averages every rank's
    losses (it gathers them across ranks only at a log; the rest would be rank 0's alone)."""

    def __init__(self):
        self.last_finite_step = 0

    def last_finite_log(self) -> str:
        """'step N' of the last logged finite training loss, or 'none yet'."""
        return f"step {self.last_finite_step}" if self.last_finite_step else "none yet"

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """The last step is logged; before a periodic save (transformers' flow callback, which runs first, has just
        asked for it), every rank checks its weights (its shard under ZeRO-3) and all agree: weights an update made
        NaN or infinite (between two logs, or with a finite loss and gradient norm) stop the run before they are
        saved, and before --save_total_limit removes an older, good checkpoint to make room."""
        if state.global_step >= state.max_steps:
            control.should_log = True
        if model is not None and control.should_save and non_finite_weights(model):
            stop(f"training diverged: the weights hold NaN or infinite values at step {state.global_step} "
                 f"(last finite log: {self.last_finite_log()}; --learning_rate {args.learning_rate}); they were not "
                 "saved and nothing was published; lower --learning_rate (or check --max_grad_norm and the data) "
                 "before resuming from an earlier checkpoint")

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss",) if args.fp16 else ("loss", "grad_norm")
        bad = {k: logs[k] for k in keys if isinstance((logs or {}).get(k), (int, float)) and not math.isfinite(logs[k])}
        if not bad:
            if logs and "loss" in logs:
                self.last_finite_step = state.global_step
            return
        found = " and ".join(f"the {'training loss' if k == 'loss' else 'gradient norm'} is {v}"
                             for k, v in bad.items())
        stop(f"training diverged: {found} at step {state.global_step} (last finite log: {self.last_finite_log()}; "
             f"--learning_rate {args.learning_rate}). Nothing was published; lower --learning_rate (or check "
             "--max_grad_norm and the data) before resuming from an earlier checkpoint")


def non_finite_weights(model) -> bool:
    """Whether any weight of model is NaN or infinite, on any rank (each checks what it holds: its shard of a ZeRO-3
    parameter), agreed by an all-reduce so that every rank stops together."""
    found = False
    with torch.no_grad():
        for param in model.parameters():
            held = getattr(param, "ds_tensor", param)  # ZeRO-3 partitions a parameter: this rank's shard
            if held.numel() and not torch.isfinite(held).all():
                found = True
                break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor(float(found), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        found = bool(flag.item())
    return found


def stop(message: str) -> None:
    """Stop the run with message: every rank gets here at the same step (the logs and the weights check are agreed
    across ranks), says it, and all leave together after a barrier; the first rank to exit alone would have the
    launcher kill the others before they print. Without a process group: a UserError."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        report_error(message)
        dist.barrier()
        dist.destroy_process_group()  # a rank that exits with gloo's connections open aborts
        sys.exit(2)
    raise UserError(message)
