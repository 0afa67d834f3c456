"""Scalar outcome reward model (upstream's math-rm/scalar_orm_train.py): a sequence classifier with one output,
trained with a binary cross-entropy loss on whether a solution is right.

    python math-rm/scalar_orm_train.py                     # the tiny model on the toy math solutions
    deepspeed math-rm/scalar_orm_train.py math-rm/llama-3.1-scalar-orm.yaml \\
        --deepspeed deepspeed_configs/deepspeed_3.json      # upstream's run: Llama-3.1-8B, its hyper-parameters

The defaults train the tiny model on a CPU (learning rate 1e-3, batch 16, max_length 512, fp32); upstream's model,
data and hyper-parameters (lr 1e-6, cosine, warmup 0.03, batch 8 x 2, max_length 4096, bf16, gradient
checkpointing, evaluation every 50 steps) are the recipe math-rm/llama-3.1-scalar-orm.yaml. A recipe goes first (or
--config PATH); any flag overrides it.

Data as upstream: PRM/ORM rows (a chat of steps and '+'/'-' labels, validated by math-rm's rules); the solution is
right when its last label is '+'. As upstream, the problem is the text before the first "Step 1" and the solution
all the rest (upstream's cut also stopped at "Step 10", see math-rm/README.md), read as one user turn and one
assistant answer; a row without "Step 1", or with nothing before it, is an error naming it (rules no_step_1,
no_problem).
The model, tokenizer and checkpoint handling are the BT reward model's (a reward head on the last token, one BOS,
left truncation, staging, reload check); the reward is the logit of P(right). Writes
<output_dir>/last_checkpoint/ (loads with AutoModelForSequenceClassification) and <output_dir>/metrics.json.
Fixed from upstream: its eval_set_path was undefined (the script failed before training) and its held-out rows
were 500 of the training rows; here they come from --eval_set_path, the data's test split, or --eval_holdout_size
(500) rows held out of the training rows and not trained on. Upstream's --save_every_steps / --eval_every_steps work.
"""

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, set_seed

from useful_code import checkpoints, run_metrics
from useful_code.cli import note_tiny_recipe, parse_args, run_cli
from useful_code.data import held_out_source, hold_out, load_dataset_dict, pick_split
from useful_code.data_parallel import main_process_first, process_state
from useful_code.defaults import DEFAULT_MODEL
from useful_code.distributed import (
    HardwareAwareArguments,
    compute_dtype,
    outside_zero3,
    precision_summary,
    weights_dtype,
)
from useful_code.divergence import DivergenceArguments, StopOnNonFiniteLoss
from useful_code.formats import enforce_validity
from useful_code.hub import FinalCheckpointPush, push_checkpoint
from useful_code.math_data import TOY_PRM, to_outcome, validate_training_rows
from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model, record_kind
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer, truncate_all

STEP_1 = "Step 1"  # where upstream cuts a row into the problem and its solution
SOLUTION_RULES = {"no_step_1": f"the solution must start at '{STEP_1}' (upstream's problem/solution boundary)",
                  "no_problem": f"the text before '{STEP_1}' (the problem, the user's turn) must not be empty"}


@dataclass
class ScriptArguments:
    """Upstream's flags: the base model, the data and the held-out rows."""

    model_name: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub name or local directory of the base model."})
    train_set_path: str = field(default=TOY_PRM, metadata={"help": "PRM/ORM rows ('conversations' or 'messages')."})
    eval_set_path: Optional[str] = field(default=None, metadata={
        "help": "Default: the data's 'test' split, else --eval_holdout_size rows held out of the training rows."})
    eval_holdout_size: int = field(default=500, metadata={
        "min": 1, "help": "Rows held out of data with no 'test' split (upstream's 500, never trained on here)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    reload_check_rows: int = field(default=16, metadata={"min": 1, "help": "Held-out rows that verify the save."})


@dataclass
class ScalarORMTrainingArguments(FinalCheckpointPush, HardwareAwareArguments, checkpoints.OutputDirArguments,
                                 checkpoints.PeriodicArguments, DivergenceArguments, TrainingArguments):
    """transformers' TrainingArguments with upstream's names where they differ (--output_path, --warmup_ratio), and
    values that train the tiny model (upstream's values: math-rm/llama-3.1-scalar-orm.yaml)."""

    output_dir: Optional[str] = field(default="./models/scalar_orm", metadata={"aliases": ["--output_path"]})
    max_length: int = field(default=512, metadata={"min": 1, "help": "Longer solutions are cut from the left."})
    learning_rate: float = field(default=1e-3)
    warmup_steps: float = field(default=0, metadata={"aliases": ["--warmup_ratio"],
                                                     "help": "Warmup steps, or a fraction of the steps when < 1."})
    per_device_train_batch_size: int = field(default=16)
    num_train_epochs: float = field(default=1.0)
    logging_steps: float = field(default=10)
    bf16: Optional[bool] = field(default=False)
    report_to: Optional[str] = field(default="none")

    def __post_init__(self):
        self.remove_unused_columns = False  # the collator reads input_ids and label
        self.label_names = ["label"]
        self.resolve_periodic()  # upstream's --save_every_steps / --eval_every_steps, or transformers' own flags
        super().__post_init__()


def solution_rows(dataset, tokenizer, max_length: int, skip_invalid: bool, name: str):
    """Validated rows as (input_ids, label): the problem as the user's turn, the solution as the assistant's, cut from
    the left to max_length (counted); label 1.0 when the last step is labelled '+'. Returns (dataset, stats)."""
    rows, stats = validate_training_rows(dataset, tokenizer, skip_invalid, name)

    def convert(messages) -> dict:
        outcome = to_outcome(messages)
        text = outcome[-2]["content"]
        if STEP_1 not in text:
            return {"conversation": [], "label": 0.0, "invalid_reason": "no_step_1"}
        problem, solution = text.split(STEP_1, 1)
        if not problem.strip():
            return {"conversation": [], "label": 0.0, "invalid_reason": "no_problem"}
        conversation = [*outcome[:-2], {"role": "user", "content": problem.strip()},
                        {"role": "assistant", "content": STEP_1 + solution}]
        return {"conversation": conversation, "label": float(outcome[-1]["content"] == "+"), "invalid_reason": ""}

    converted = rows.map(convert, input_columns="messages", remove_columns=rows.column_names)
    converted, rule_stats = enforce_validity(converted, SOLUTION_RULES, skip_invalid, name)
    sequences, cut = truncate_all(tokenizer, encode_conversations(tokenizer, list(converted["conversation"])),
                                  max_length)
    if cut:  # said as the other trainers say it: a solution cut from the left loses the problem's start
        print(f"[{name}] truncated {cut} solutions longer than max_length={max_length} tokens from the left")
    tokenized = converted.remove_columns("conversation").add_column("input_ids", sequences)
    return tokenized, {**stats, "invalid": {**stats["invalid"], **rule_stats["invalid"]}, "truncated": cut,
                       "used": len(tokenized), "right": int(sum(tokenized["label"]))}


class ScalarORMTrainer(Trainer):
    """Binary cross-entropy on the reward logit: P(the solution is right) = sigmoid(reward)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits.float(), inputs["label"].float())
        return (loss, {"logits": logits.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Held-out reward logits and labels, without a per-batch loss: compute_metrics takes it over every row at
        once (on several ranks the Trainer's mean of batch losses counted the rows repeated to fill a last batch)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
        return None, logits.detach().float(), inputs["label"]


def collate(tokenizer):
    """Right-padded input ids and attention mask, and the float labels."""
    def collator(features):
        batch = tokenizer.pad({"input_ids": [f["input_ids"] for f in features]}, padding=True, return_tensors="pt")
        return {**batch, "label": torch.tensor([f["label"] for f in features], dtype=torch.float32)}
    return collator


def compute_metrics(eval_pred) -> dict:
    """Over every held-out row: the binary cross-entropy of sigmoid(reward) against the labels, and the accuracy of
    sigmoid(reward) > 0.5."""
    logits, labels = np.asarray(eval_pred.predictions).reshape(-1), np.asarray(eval_pred.label_ids).reshape(-1)
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits).float(), torch.from_numpy(labels).float())
    return {"loss": loss.item(), "accuracy": float(np.mean((logits > 0) == (labels > 0.5)))}


def main():
    started = time.time()
    args, training_args, config = parse_args((ScriptArguments, ScalarORMTrainingArguments))
    # fp32 weights under the Trainer's bf16 autocast; bf16 under DeepSpeed (ZeRO keeps fp32 master weights)
    dtype = weights_dtype(training_args)
    is_main = training_args.process_index == 0
    if is_main:
        note_tiny_recipe(config, None, args.model_name, "math-rm/llama-3.1-scalar-orm.yaml")
    # Before any work: a writable output directory, not an input, no finished or running run in it; what to resume.
    state = process_state()  # the launcher's ranks, for the steps the main one takes first
    resume = checkpoints.claim_and_resume(state, training_args, (args.model_name, args.train_set_path,
                                                                 args.eval_set_path), "scalar_orm")

    # Data: train rows and held-out rows (the test split, or --eval_set_path), both checked by math-rm's rules.
    tokenizer = load_tokenizer(args.model_name, "--model_name")
    with main_process_first(state):  # the main rank fills the datasets cache and says the data notes once
        splits = load_dataset_dict(args.train_set_path, "--train_set_path", skip_invalid=args.skip_invalid)
        train_raw = pick_split(splits, "train", "--train_set_path")
        held_out_raw, source = held_out_source(splits, args.eval_set_path, "train", "--train_set_path",
                                               args.skip_invalid)
        # Checked before any hold-out split, so that an error names the row as it is in the file.
        train, train_stats = solution_rows(train_raw, tokenizer, training_args.max_length, args.skip_invalid,
                                           "train set")
        if held_out_raw is not None:
            held_out, eval_stats = solution_rows(held_out_raw, tokenizer, training_args.max_length,
                                                 args.skip_invalid, "eval set")
        else:  # no test split (RLHFlow/Mistral-ORM-Data has none), or it is the training data
            train, held_out, eval_stats = hold_out(train, args.eval_holdout_size, training_args.seed, source,
                                                   "--train_set_path", key_columns=("input_ids",), unit="solutions")
            train_stats.update(used=len(train), right=int(sum(train["label"])), held_out=eval_stats["read"])
            eval_stats["right"] = int(sum(held_out["label"]))

    # Model: the BT reward model's loader, a new one-output head on the base model.
    if is_main:
        print(f"lr={training_args.learning_rate} batch={training_args.per_device_train_batch_size}x"
              f"{training_args.gradient_accumulation_steps} max_length={training_args.max_length} "
              f"{precision_summary(training_args, dtype)} world_size={training_args.world_size}")
    set_seed(training_args.seed)  # the new head's initial weights: the Trainer seeds only once the model exists
    model = load_reward_model(args.model_name, "--model_name", tokenizer, dtype, new_weights=REWARD_HEAD_WEIGHTS)
    record_kind(model, "scalar_orm")
    trainer = ScalarORMTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                               processing_class=tokenizer, data_collator=collate(tokenizer),
                               compute_metrics=compute_metrics, callbacks=[checkpoints.DropPickledArguments(),
                                                                                    StopOnNonFiniteLoss()])
    train_result = trainer.train(resume_from_checkpoint=resume)
    prediction = trainer.predict(held_out, metric_key_prefix="eval")

    # Save through staging, verify the reload on held-out rows, then publish.
    staging = checkpoints.staging_dir(training_args.output_dir)
    checkpoint_dir = os.path.join(staging, "last_checkpoint")
    checkpoints.save_final_checkpoint(trainer, checkpoint_dir)
    if is_main:
        n = min(args.reload_check_rows, len(held_out))
        with outside_zero3():  # in the weights' dtype, scored under the Trainer's autocast as trainer.predict was
            reloaded = load_reward_model(checkpoint_dir, "checkpoint", load_tokenizer(checkpoint_dir, "checkpoint"),
                                         dtype).to(training_args.device).eval()
        with trainer.accelerator.autocast():
            rewards = score_sequences(reloaded, tokenizer, list(held_out["input_ids"][:n]), batch_size=8)
        reload_diff = checkpoints.verify_reload(np.asarray(prediction.predictions).reshape(-1)[:n], rewards,
                                                compute_dtype(training_args), checkpoint_dir, "rewards")
        metrics = {"eval_accuracy": prediction.metrics["eval_accuracy"], "eval_loss": prediction.metrics["eval_loss"],
                   "examples": {"train": train_stats, "eval": eval_stats}, "reload_max_abs_diff": reload_diff,
                   "config": config}
        run_metrics.write_run_metrics(staging, metrics, started, train_result, args, training_args,
                                      precision_summary(training_args, dtype), resumed_from=resume)
        print(f"Held-out accuracy {metrics['eval_accuracy']:.4f} (P(right) > 0.5), loss {metrics['eval_loss']:.4f} "
              f"on {len(held_out)} solutions ({eval_stats['right']} right)")
        final = checkpoints.publish_run(training_args.output_dir)
        print(f"Checkpoint: {final}")
    trainer.accelerator.wait_for_everyone()
    # After the barrier: the other ranks would time out in it while a large model uploads.
    if training_args.process_index == 0 and training_args.push_final_checkpoint:
        print(f"Pushed to the Hub: {push_checkpoint(training_args, final)}")


if __name__ == "__main__":
    run_cli(main)
