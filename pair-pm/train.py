"""Train a pairwise preference model: a causal LM that reads a context and two responses and answers "A" or "B".

Replaces upstream's axolotl run with TRL's SFTTrainer on pre-tokenized examples whose loss is on the answer
token alone. A YAML config (upstream's settings) comes first; any field can be overridden after it:

    deepspeed pair-pm/train.py pair-pm/gemma-2b-it.yaml --deepspeed deepspeed_configs/deepspeed_3.json
    torchrun --nproc_per_node 8 pair-pm/train.py pair-pm/llama3-8b-it.yaml --learning_rate 5e-6
    python pair-pm/train.py                      # pair-pm/tiny.yaml: the embedded tiny model on toy pairs

--dataset_path takes PM-format data (pair-pm/process_pair_data.py) or standard-format pairs, converted here
with --seed. Held-out standard-format pairs (--eval_set_path, the train pairs' 'test' split, or pairs held out of
them) are scored in both orders after training. Writes <output_dir>/last_checkpoint/ and <output_dir>/metrics.json.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from transformers import set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import pm_utils, rm_utils  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "tiny.yaml")
# SFTConfig fields copied into metrics.json (the full config is hundreds of fields).
RECORDED_TRAINING_ARGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                          "num_train_epochs", "max_steps", "max_length", "packing", "lr_scheduler_type",
                          "warmup_steps", "optim", "bf16", "seed", "deepspeed")


@dataclass
class ScriptArguments:
    """What to train on and how to check it; the training hyper-parameters are SFTConfig's fields."""

    model_name_or_path: str = field(default=rm_utils.DEFAULT_MODEL, metadata={"help": "Hub name or local directory."})
    dataset_path: str = field(
        default=rm_utils.DEFAULT_PREFERENCE_DATA,
        metadata={"help": "PM-format data or standard-format pairs: hub name, directory or .json/.jsonl/.parquet."},
    )
    dataset_split: str = field(default="train")
    eval_set_path: Optional[str] = field(
        default=None, metadata={"help": "Standard-format held-out pairs ('test' split), scored in both orders."})
    eval_holdout_size: int = field(
        default=200, metadata={"help": "Pairs held out of standard-format train data that has no 'test' split."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    overlength: str = field(default="error", metadata={"help": "Examples over max_length: 'error' or 'drop'."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, flash_attention_2 or eager."})
    reload_check_pairs: int = field(default=16, metadata={"help": "Held-out pairs scored to verify the checkpoint."})


def parse_arguments(argv: list[str]) -> tuple[ScriptArguments, SFTConfig]:
    """Read the YAML config (first positional argument, or --config, else tiny.yaml), then the flags over it."""
    positional = [i for i, a in enumerate(argv) if a.endswith((".yaml", ".yml"))
                  and (i == 0 or not argv[i - 1].startswith("--") or "=" in argv[i - 1])]
    if positional:
        argv = ["--config", argv[positional[0]]] + argv[:positional[0]] + argv[positional[0] + 1:]
    elif "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG] + argv
    config_path = argv[argv.index("--config") + 1]
    try:
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    except OSError as err:
        raise rm_utils.UserError(f"cannot read config {config_path}: {err.strerror}") from None
    # DeepSpeed's comm layer must be up before SFTConfig is built: building it fixes the world size.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--deepspeed", default=config.get("deepspeed"))
    uses_deepspeed = pre.parse_known_args(argv)[0].deepspeed is not None
    cpu_only = rm_utils.init_distributed_for_cpu(uses_deepspeed)

    parser = TrlParser((ScriptArguments, SFTConfig))
    # bf16 where the GPU has it (upstream's "bf16: auto"), fp32 on CPU; padding is ours (a non-EOS pad token).
    parser.set_defaults(bf16=rm_utils.bf16_available(), use_cpu=cpu_only)
    try:
        script_args, training_args = parser.parse_args_and_config(argv)
    except ValueError as err:
        raise rm_utils.UserError(f"{config_path}: {err}") from None
    return script_args, training_args


def load_examples(args: ScriptArguments, seed: int):
    """Training examples in PM format and held-out standard-format pairs (or None), with their counts."""
    splits = rm_utils.load_dataset_dict(args.dataset_path, "--dataset_path")
    train = rm_utils.pick_split(splits, args.dataset_split, "--dataset_path")
    held_out, held_out_source = None, None
    if pm_utils.is_pm_format(train):
        train, train_stats = pm_utils.validate_pm_examples(train, args.skip_invalid, "train set")
    else:
        train, train_stats = rm_utils.standardize_pairs(train, args.skip_invalid, "train set")
        if not args.eval_set_path and "test" not in splits:
            if len(train) < 2 * args.eval_holdout_size:
                raise rm_utils.UserError(
                    f"--dataset_path has {len(train)} valid pairs and no 'test' split: too few to hold out "
                    f"--eval_holdout_size={args.eval_holdout_size}; pass --eval_set_path or a smaller size")
            split = train.train_test_split(test_size=args.eval_holdout_size, seed=seed)
            train, held_out, held_out_source = split["train"], split["test"], "held out of the train set"
        elif not args.eval_set_path:
            held_out, held_out_source = splits["test"], "test split of --dataset_path"
        train = pm_utils.pairs_to_pm(train, seed)
    if args.eval_set_path:
        eval_splits = rm_utils.load_dataset_dict(args.eval_set_path, "--eval_set_path")
        held_out, held_out_source = rm_utils.pick_split(eval_splits, "test", "--eval_set_path"), args.eval_set_path
    stats = {"train": train_stats}
    if held_out is not None:
        held_out, stats["eval"] = rm_utils.standardize_pairs(held_out, args.skip_invalid, "eval set")
        stats["eval"]["source"] = held_out_source
    return train, held_out, stats


def reload_checkpoint(checkpoint_dir: str, dtype: torch.dtype, device) -> pm_utils.PairPreferenceScorer:
    """Load the saved checkpoint whole on this process, as a user would."""
    with rm_utils.outside_zero3():
        tokenizer = rm_utils.load_tokenizer(checkpoint_dir, "checkpoint")
        model = pm_utils.load_preference_model(checkpoint_dir, "checkpoint", tokenizer, dtype)
    return pm_utils.PairPreferenceScorer(model.to(device).eval(), tokenizer)


def main():
    started = time.time()
    script_args, training_args = parse_arguments(sys.argv[1:])
    is_main = training_args.process_index == 0
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    set_seed(training_args.seed)

    tokenizer = rm_utils.load_tokenizer(script_args.model_name_or_path, "--model_name_or_path",
                                        training_args.trust_remote_code)
    with training_args.main_process_first():
        train, held_out, data_stats = load_examples(script_args, training_args.seed)
        train, token_stats = pm_utils.tokenize_pm_examples(train, tokenizer, training_args.max_length,
                                                           script_args.overlength, "train set")
    data_stats["train"].update(token_stats, used=len(train))
    if len(train) == 0:
        raise rm_utils.UserError("no examples left to train on after validation and length filtering")
    if is_main:
        n_a = sum(label[-1] == pm_utils.label_token_ids(tokenizer)[0] for label in train["labels"])
        print(f"{len(train)} training examples (answer A: {n_a}, B: {len(train) - n_a}); lr="
              f"{training_args.learning_rate} batch={training_args.per_device_train_batch_size}x"
              f"{training_args.gradient_accumulation_steps} epochs={training_args.num_train_epochs} "
              f"max_length={training_args.max_length} packing={training_args.packing} dtype={dtype} "
              f"world_size={training_args.world_size}")

    # Built after SFTConfig so that ZeRO-3 partitions the weights as they load.
    model = pm_utils.load_preference_model(script_args.model_name_or_path, "--model_name_or_path", tokenizer, dtype,
                                           script_args.attn_implementation, training_args.trust_remote_code)
    model.config.use_cache = False
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    train_result = trainer.train()

    checkpoint_dir = os.path.join(training_args.output_dir, "last_checkpoint")
    rm_utils.save_final_checkpoint(trainer, checkpoint_dir)

    # The in-memory model's answer logits on a few held-out prompts, on every rank (ZeRO-3 gathers the weights
    # with collectives); rank 0 then reloads the checkpoint and must reproduce them.
    trainer.model.eval()
    in_memory_scorer = pm_utils.PairPreferenceScorer(trainer.model, tokenizer)
    if held_out is not None:
        check = held_out.select(range(min(script_args.reload_check_pairs, len(held_out))))
        check_sequences = in_memory_scorer.encode([
            pm_utils.build_pm_prompt(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])
            for chosen, rejected in zip(check["chosen"], check["rejected"])])
    else:  # PM-format data only: check on training prompts (without their answer token)
        check = train.select(range(min(script_args.reload_check_pairs, len(train))))
        check_sequences = [ids[:-1] for ids in check["input_ids"]]
    in_memory = in_memory_scorer.label_logits(check_sequences)

    if is_main:
        scorer = reload_checkpoint(checkpoint_dir, dtype, training_args.device)
        reload_diff = float(np.max(np.abs(scorer.label_logits(check_sequences) - in_memory)))
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        if not reload_diff <= tolerance * max(1.0, float(np.max(np.abs(in_memory)))):
            raise RuntimeError(
                f"saved checkpoint {checkpoint_dir} does not reproduce the trained model: answer logits differ by "
                f"up to {reload_diff:.4g}. With ZeRO-3, the DeepSpeed config needs "
                "stage3_gather_16bit_weights_on_model_save: true.")
        print(f"Checkpoint verified: reloaded answer logits match the trained model (max |diff| {reload_diff:.2e})")
        metrics = {}
        if held_out is not None:
            scorer.batch_size = training_args.per_device_eval_batch_size
            scorer.max_length = training_args.max_length
            probs = scorer.score_pairs(held_out)
            metrics.update({
                "eval_accuracy": float(np.mean(probs["mean"] > 0.5)),
                "eval_accuracy_chosen_as_A": float(np.mean(probs["first_as_A"] > 0.5)),
                "eval_accuracy_chosen_as_B": float(np.mean(probs["first_as_B"] > 0.5)),
                "eval_mean_prob_chosen": float(np.mean(probs["mean"])),
                "eval_pairs": len(held_out),
                "eval_truncated": scorer.truncated,
            })
            print(f"Held-out accuracy on {len(held_out)} pairs: {metrics['eval_accuracy']:.4f} (both orders "
                  f"averaged); chosen as A {metrics['eval_accuracy_chosen_as_A']:.4f}, as B "
                  f"{metrics['eval_accuracy_chosen_as_B']:.4f}")
            if scorer.truncated:
                print(f"{scorer.truncated} held-out prompts longer than max_length were cut from the left")
        else:
            print("No held-out pairs (PM-format training data): pass --eval_set_path to measure accuracy")
        metrics.update({
            "examples": data_stats,
            "reload_max_abs_diff": reload_diff,
            "arguments": {**asdict(script_args), **{k: v for k, v in training_args.to_dict().items()
                                                     if k in RECORDED_TRAINING_ARGS}},
        })
        metrics_path = rm_utils.write_run_metrics(training_args.output_dir, metrics, started, train_result,
                                                  training_args, dtype)
        print(f"Checkpoint: {checkpoint_dir}\nMetrics: {metrics_path}")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    rm_utils.run_cli(main)
