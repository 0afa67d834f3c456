"""Train a Bradley-Terry reward model: a sequence classifier with a scalar head, loss -logsigmoid(r_chosen - r_rejected).

One script for every model family (replaces upstream's gemma/llama3/mistral copies). Runs under `deepspeed`,
`accelerate launch`, `torchrun` or plain `python`, on GPUs or on a CPU-only machine:

    deepspeed bradley-terry-rm/train.py --model_name google/gemma-2b-it --max_length 4096 \
        --train_set_path hendrydong/preference_700K --deepspeed deepspeed_configs/deepspeed_3.json

With no flags it trains the embedded tiny model on the bundled toy pairs. Writes
<output_path>/last_checkpoint/ (model, config, tokenizer) and <output_path>/metrics.json.
"""

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import rm_utils  # noqa: E402


NEVER = 999999  # upstream's "no periodic save/eval" value


@dataclass
class ScriptArguments:
    """Upstream's flags (gemma_2B_rm.py) plus a few of our own. Hyper-parameters left at None take the recipe
    default: upstream's values for a real model, small-model values for the embedded tiny model."""

    local_rank: Optional[int] = field(default=-1, metadata={"help": "Set by the distributed launcher."})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "Path to a DeepSpeed config (deepspeed_configs/)."})
    per_device_train_batch_size: Optional[int] = field(default=None, metadata={"help": "Pairs per device per step."})
    per_device_eval_batch_size: Optional[int] = field(default=None)
    gradient_accumulation_steps: Optional[int] = field(default=None)
    learning_rate: Optional[float] = field(default=None)
    weight_decay: Optional[float] = field(default=0.001)
    model_name: Optional[str] = field(
        default=rm_utils.DEFAULT_MODEL, metadata={"help": "Hub name or local directory of the base model."}
    )
    bf16: Optional[bool] = field(default=True, metadata={"help": "Use bf16 where the GPU supports it (fp32 on CPU)."})
    num_train_epochs: Optional[float] = field(default=None)
    train_set_path: Optional[str] = field(
        default=rm_utils.DEFAULT_PREFERENCE_DATA,
        metadata={"help": "Hub name, saved dataset directory, data directory or .json/.jsonl/.parquet file."},
    )
    eval_set_path: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out pairs. Default: the train set's 'test' split, else --eval_holdout_size "
                          "pairs held out of the train set (never overlapping the training pairs)."},
    )
    output_path: Optional[str] = field(default="./bt_models/reward_model", metadata={"help": "Output directory."})
    gradient_checkpointing: Optional[bool] = field(default=None)
    optim: Optional[str] = field(default="adamw_torch")
    lr_scheduler_type: Optional[str] = field(default="cosine")
    max_length: Optional[int] = field(default=None, metadata={"help": "Max tokens per conversation."})
    save_every_steps: Optional[int] = field(default=NEVER, metadata={"help": "Save a checkpoint every x steps."})
    eval_every_steps: Optional[int] = field(default=NEVER, metadata={"help": "Evaluate every x steps."})
    seed: int = field(default=42)
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    report_to: str = field(default="none", metadata={"help": "wandb, tensorboard, ... or none."})
    # Our additions.
    warmup_ratio: float = field(default=0.03)
    logging_steps: int = field(default=10)
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    overlength: str = field(default="truncate", metadata={"help": "'truncate' (from the left, as upstream) or 'drop'."})
    eval_holdout_size: int = field(default=500, metadata={"help": "Pairs held out of the train set when no eval set."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch pairs of similar length (less padding)."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, flash_attention_2 or eager."})
    trust_remote_code: bool = field(default=False)
    reload_check_pairs: int = field(default=16, metadata={"help": "Held-out pairs scored to verify the saved checkpoint."})


# Upstream's gemma_2B_rm.py values for real models; values that train the embedded tiny model in ~2 CPU minutes.
RECIPES = {
    "upstream": dict(per_device_train_batch_size=1, per_device_eval_batch_size=1, gradient_accumulation_steps=32,
                     learning_rate=1e-5, num_train_epochs=1, max_length=4096, gradient_checkpointing=True),
    "tiny": dict(per_device_train_batch_size=16, per_device_eval_batch_size=32, gradient_accumulation_steps=1,
                 learning_rate=1e-3, num_train_epochs=2, max_length=512, gradient_checkpointing=False),
}


def apply_recipe(args: ScriptArguments) -> str:
    """Fill hyper-parameters left at None from the recipe that fits the model; return the recipe's name."""
    is_tiny = Path(args.model_name).resolve() == Path(rm_utils.DEFAULT_MODEL).resolve()
    recipe = "tiny" if is_tiny else "upstream"
    for key, value in RECIPES[recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return recipe


def load_pairs(args: ScriptArguments):
    """Load the train and held-out pairs in the standard format, with counts of what was read and used.
    Rows are validated before any hold-out split, so an error names the row's index in the file."""
    train_dict = rm_utils.load_dataset_dict(args.train_set_path, "--train_set_path")
    train = rm_utils.pick_split(train_dict, "train", "--train_set_path")
    train, train_stats = rm_utils.standardize_pairs(train, args.skip_invalid, "train set")
    if args.eval_set_path:
        eval_dict = rm_utils.load_dataset_dict(args.eval_set_path, "--eval_set_path")
        held_out = rm_utils.pick_split(eval_dict, "test", "--eval_set_path")
    elif "test" in train_dict:
        held_out = train_dict["test"]
    else:
        if len(train) < 2 * args.eval_holdout_size:
            raise rm_utils.UserError(
                f"--train_set_path has {len(train)} valid rows and no 'test' split: too few to hold out "
                f"--eval_holdout_size={args.eval_holdout_size}; pass --eval_set_path or a smaller --eval_holdout_size")
        split = train.train_test_split(test_size=args.eval_holdout_size, seed=args.seed)
        train, held_out = split["train"], split["test"]
        train_stats["held_out_for_eval"] = len(held_out)
        print(f"Held out {len(held_out)} of the train set's pairs for evaluation (--eval_holdout_size)")
        return train, held_out, {"train": train_stats, "eval": {"read": len(held_out), "source": "train set"}}
    held_out, eval_stats = rm_utils.standardize_pairs(held_out, args.skip_invalid, "eval set")
    return train, held_out, {"train": train_stats, "eval": eval_stats}


class BradleyTerryTrainer(Trainer):
    """Trainer whose loss is the Bradley-Terry loss over (chosen, rejected) batches from PairwiseCollator."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let the Trainer scale it for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        chosen, rejected = rm_utils.split_pair_rewards(rewards)
        loss = rm_utils.bradley_terry_loss(chosen, rejected)
        return (loss, {"rewards": torch.stack([chosen, rejected], dim=1)}) if return_outputs else loss

    def _get_eval_sampler(self, eval_dataset):
        # transformers also length-groups (shuffles) eval batches when training does; predictions must come
        # back in dataset order to be compared pair by pair.
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rewards = outputs["rewards"].detach().float()
        # Pairs carry no labels (chosen is always preferred); a placeholder lets the Trainer call compute_metrics.
        return loss.detach(), rewards, torch.zeros(rewards.shape[0], device=rewards.device)


def compute_metrics(eval_pred) -> dict:
    """Pair accuracy: chosen strictly above rejected (ties count as wrong, as in RewardBench)."""
    rewards = np.asarray(eval_pred.predictions).reshape(-1, 2)
    return {"accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1])), "ties": int(np.sum(rewards[:, 0] == rewards[:, 1]))}


def verify_checkpoint(trainer, checkpoint_dir: str, pairs, dtype: torch.dtype) -> float:
    """Reload the saved checkpoint and compare its rewards on held-out pairs with the in-memory model's.

    Run on every rank (under ZeRO-3 the in-memory forward needs all of them); rank 0 compares. A checkpoint
    that lost its score head or its ZeRO-3 shards gives different rewards: that is an error, not a warning."""
    in_memory = trainer.predict(pairs).predictions.reshape(-1, 2)
    max_diff = 0.0
    if trainer.args.process_index == 0:
        tokenizer = rm_utils.load_tokenizer(checkpoint_dir, "checkpoint")
        with rm_utils.outside_zero3():  # as a user would: whole, on one process
            model = rm_utils.load_reward_model(checkpoint_dir, "checkpoint", tokenizer, dtype).to(trainer.args.device)
        model.eval()
        sequences = list(pairs["chosen_input_ids"]) + list(pairs["rejected_input_ids"])
        reloaded = np.asarray(rm_utils.score_sequences(model, tokenizer, sequences, batch_size=8))
        reloaded = np.stack([reloaded[: len(pairs)], reloaded[len(pairs):]], axis=1)
        max_diff = float(np.max(np.abs(reloaded - in_memory)))
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        scale = max(1.0, float(np.max(np.abs(in_memory))))
        if not max_diff <= tolerance * scale:
            raise RuntimeError(
                f"saved checkpoint {checkpoint_dir} does not reproduce the trained model: rewards differ by up to "
                f"{max_diff:.4g} on {len(pairs)} held-out pairs (tolerance {tolerance * scale:.3g}). With ZeRO-3, the "
                "DeepSpeed config needs stage3_gather_16bit_weights_on_model_save: true.")
        print(f"Checkpoint verified: reloaded rewards match the trained model (max |diff| {max_diff:.2e} "
              f"on {len(pairs)} held-out pairs)")
    trainer.accelerator.wait_for_everyone()
    return max_diff


def main():
    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    recipe = apply_recipe(args)
    started = time.time()
    # Must run before TrainingArguments: it decides the world size the Trainer and DeepSpeed agree on.
    cpu_only = rm_utils.init_distributed_for_cpu(args.deepspeed is not None)
    dtype = rm_utils.resolve_dtype(args.bf16)
    training_args = TrainingArguments(
        output_dir=args.output_path,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        weight_decay=args.weight_decay,
        # transformers also evaluates and saves a full training state (optimizer included) at the last step
        # whenever a strategy is "steps": only ask for that when the user asked for periodic evals/saves.
        eval_strategy="steps" if args.eval_every_steps < NEVER else "no",
        eval_steps=args.eval_every_steps,
        save_strategy="steps" if args.save_every_steps < NEVER else "no",
        save_steps=args.save_every_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing,
        deepspeed=args.deepspeed,
        remove_unused_columns=False,
        label_names=[],
        bf16=dtype == torch.bfloat16,
        use_cpu=cpu_only,
        logging_strategy="steps",
        logging_steps=args.logging_steps,
        optim=args.optim,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to=args.report_to,
        seed=args.seed,
    )
    is_main = training_args.process_index == 0
    set_seed(args.seed)
    if is_main:
        print(f"Recipe '{recipe}': lr={args.learning_rate} batch={args.per_device_train_batch_size}x"
              f"{args.gradient_accumulation_steps} epochs={args.num_train_epochs} max_length={args.max_length} "
              f"dtype={dtype} world_size={training_args.world_size}")

    tokenizer = rm_utils.load_tokenizer(args.model_name, "--model_name", args.trust_remote_code)
    with training_args.main_process_first():
        train, held_out, data_stats = load_pairs(args)
        train, train_tok = rm_utils.tokenize_pairs(train, tokenizer, args.max_length, args.overlength, "train set")
        held_out, eval_tok = rm_utils.tokenize_pairs(held_out, tokenizer, args.max_length, args.overlength, "eval set")
    data_stats["train"].update(train_tok, used=len(train))
    data_stats["eval"].update(eval_tok, used=len(held_out))
    if len(train) == 0 or len(held_out) == 0:
        raise rm_utils.UserError("no pairs left to train or evaluate on after validation and length filtering")

    # Built after TrainingArguments so that ZeRO-3 partitions the weights as they load.
    model = rm_utils.load_reward_model(args.model_name, "--model_name", tokenizer, dtype, args.attn_implementation,
                                       args.trust_remote_code)
    model.config.use_cache = False

    trainer = BradleyTerryTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        data_collator=rm_utils.PairwiseCollator(tokenizer),
        compute_metrics=compute_metrics,
    )
    train_result = trainer.train()
    eval_metrics = trainer.evaluate()

    checkpoint_dir = os.path.join(args.output_path, "last_checkpoint")
    rm_utils.save_final_checkpoint(trainer, checkpoint_dir)
    check_pairs = held_out.select(range(min(args.reload_check_pairs, len(held_out))))
    reload_diff = verify_checkpoint(trainer, checkpoint_dir, check_pairs, dtype)

    if is_main:
        metrics = {
            "eval_accuracy": eval_metrics["eval_accuracy"],
            "eval_loss": eval_metrics["eval_loss"],
            "eval_ties": eval_metrics["eval_ties"],
            "examples": data_stats,
            "reload_max_abs_diff": reload_diff,
            "recipe": recipe,
            "arguments": asdict(args),
        }
        metrics_path = rm_utils.write_run_metrics(args.output_path, metrics, started, train_result, training_args,
                                                  dtype)
        print(f"Held-out pair accuracy {metrics['eval_accuracy']:.4f}, loss {metrics['eval_loss']:.4f} "
              f"on {len(held_out)} pairs; wall time {time.time() - started:.1f} s")
        print(f"Checkpoint: {checkpoint_dir}\nMetrics: {metrics_path}")


if __name__ == "__main__":
    rm_utils.run_cli(main)
