"""What TRL's SFTConfig may set in the trainers built on SFTTrainer (pair-pm/train.py, math-rm/train.py).

Their examples arrive tokenized, with labels on the answer tokens alone, and their held-out rows are scored once,
after training. SFTConfig settings that assume otherwise used to stop deep in TRL with a traceback, or (wrapped
packing) to train on examples cut and mixed together; they are one line at parse time here.
"""

from __future__ import annotations

from dataclasses import dataclass

from useful_code.checkpoints import PeriodicArguments
from useful_code.cli import UserError

PACKING_STRATEGIES = ("bfd", "bfd_split")  # whole examples per row, kept apart; "wrapped" cuts them mid-example


@dataclass
class PretokenizedSFTArguments(PeriodicArguments):
    """A mixin for SFTConfig subclasses, listed before SFTConfig: upstream's --save_every_steps (and --save_steps
    alone) as in every trainer, and the SFTConfig settings these trainers cannot honour refused by name."""

    def __post_init__(self):
        self.resolve_periodic()
        if self.eval_strategy != "no" or self.load_best_model_at_end or self.save_strategy == "best":
            raise UserError("--eval_strategy, --eval_steps, --eval_every_steps, --load_best_model_at_end and "
                            "--save_strategy best: this trainer scores its held-out rows once, after training, and "
                            "evaluates nothing during it; drop them")
        if self.max_length is None:
            raise UserError("--max_length must be a number of tokens (examples are checked against it)")
        if self.packing and self.packing_strategy not in PACKING_STRATEGIES:
            raise UserError(f"--packing_strategy {self.packing_strategy} cuts examples and lets them attend to each "
                            f"other: use {' or '.join(PACKING_STRATEGIES)}")
        if self.padding_free and not self.packing:
            raise UserError("--padding_free needs --packing true here (packed rows are the padding-free batches)")
        if self.assistant_only_loss or self.completion_only_loss:
            raise UserError("--assistant_only_loss / --completion_only_loss: the loss is on the answer tokens alone "
                            "already (the examples carry their labels); drop the flag")
        super().__post_init__()
