"""A training run whose loss or gradient norm turns NaN or infinite stops at the next logging step with one line.

Without this, transformers trains on (every later step is NaN), its logging_nan_inf_filter (on by default) logs a
plausible loss, often 0, in place of the NaN, and the run fails only at the end, in the reload check, blaming the
checkpoint."""

import math
from dataclasses import dataclass, field

from transformers import TrainerCallback

from useful_code.cli import UserError


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

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss",) if args.fp16 else ("loss", "grad_norm")
        bad = {k: logs[k] for k in keys if isinstance((logs or {}).get(k), (int, float)) and not math.isfinite(logs[k])}
        if not bad:
            if logs and "loss" in logs:
                self.last_finite_step = state.global_step
            return
        found = " and ".join(f"the {'training loss' if k == 'loss' else 'gradient norm'} is {v}"
                             for k, v in bad.items())
        raise UserError(f"training diverged: {found} at step {state.global_step} (last finite log: step "
                        f"{self.last_finite_step}; --learning_rate {args.learning_rate}). Nothing was published; lower "
                        "--learning_rate (or check --max_grad_norm and the data) before resuming from an earlier "
                        "checkpoint")
