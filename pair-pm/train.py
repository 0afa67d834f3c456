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

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from useful_code import checkpoints, run_metrics
from useful_code.cli import UserError, note_tiny_recipe, parse_args, run_cli
from useful_code.data import HeldOutArguments, held_out_pairs, load_dataset_dict, pick_split
from useful_code.data_parallel import main_process_first, process_state
from useful_code.defaults import DEFAULT_MODEL, DEFAULT_PREFERENCE_DATA, REPO_ROOT
from useful_code.distributed import (
    HardwareAwareArguments,
    compute_dtype,
    outside_zero3,
    precision_summary,
    weights_dtype,
)
from useful_code.divergence import DivergenceArguments, StopOnNonFiniteLoss
from useful_code.formats import standardize_pairs
from useful_code.hub import FinalCheckpointPush, push_checkpoint
from useful_code.lora import (LoraArguments, TaskType, check_resume_settings, quantization_options,
                               save_final_model, wrap_with_lora)
from useful_code.model_card import launch_command, write_model_card
from useful_code.modeling import load_preference_model, record_kind
from useful_code.pm_data import (
    build_pm_prompt,
    is_pm_format,
    label_token_ids,
    pairs_to_pm,
    tokenize_pm_examples,
    validate_pm_examples,
)
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.sft_arguments import PretokenizedSFTArguments
from useful_code.templates import load_tokenizer, reject_special_tokens
from useful_code.training_plots import plot_curves

DEFAULT_CONFIG = str(REPO_ROOT / "pair-pm" / "tiny.yaml")


@dataclass
class ScriptArguments(HeldOutArguments):
    """What to train on and how to check it; the training hyper-parameters are SFTConfig's fields. Held-out pairs
    are standard-format pairs, scored in both orders."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub name or local directory."})
    dataset_path: str = field(
        default=DEFAULT_PREFERENCE_DATA,
        metadata={"help": "PM-format data or standard-format pairs: hub name, directory or .json/.jsonl/.parquet."},
    )
    dataset_split: str = field(default="train")
    eval_holdout_size: int = field(default=200,
                                   metadata={"min": 1, "help": "Pairs held out of standard-format train data."})
    overlength: str = field(default="error",
                            metadata={"choices": ("error", "drop"), "help": "Examples over max_length."})


@dataclass
class PreferenceModelConfig(FinalCheckpointPush, HardwareAwareArguments, checkpoints.OutputDirArguments,
                            DivergenceArguments, PretokenizedSFTArguments, SFTConfig):
    """TRL's SFTConfig, usable unchanged on a GPU or a CPU-only machine (bf16 where the GPU has it, as upstream's
    "bf16: auto"); padding is ours (a non-EOS pad token, see useful_code/templates.py)."""


def load_examples(args: ScriptArguments, seed: int):
    """Training examples in PM format and held-out standard-format pairs (or None), with their counts."""
    splits = load_dataset_dict(args.dataset_path, "--dataset_path", skip_invalid=args.skip_invalid)
    train = pick_split(splits, args.dataset_split, "--dataset_path")
    if is_pm_format(train):
        # PM examples cannot be turned back into pairs to hold out: only --eval_set_path gives held-out pairs.
        train, train_stats = validate_pm_examples(train, args.skip_invalid, "train set")
        if not args.eval_set_path:
            return train, None, {"train": train_stats}
        _, held_out, eval_stats = held_out_pairs(None, {}, args.eval_set_path, 0, seed, args.skip_invalid,
                                                 "--dataset_path")
    else:
        train, train_stats = standardize_pairs(train, args.skip_invalid, "train set")
        train, held_out, eval_stats = held_out_pairs(train, splits, args.eval_set_path, args.eval_holdout_size, seed,
                                                     args.skip_invalid, "--dataset_path", args.dataset_split)
        train = pairs_to_pm(train, seed)
    return train, held_out, {"train": train_stats, "eval": eval_stats}


def reload_checkpoint(checkpoint_dir: str, dtype: torch.dtype, device) -> PairPreferenceScorer:
    """Load the saved checkpoint whole on this process, as a user would, in dtype (the weights' dtype in
    training; score under the Trainer's autocast, as the trained model's forward runs)."""
    with outside_zero3():
        tokenizer = load_tokenizer(checkpoint_dir, "checkpoint")
        model = load_preference_model(checkpoint_dir, "checkpoint", tokenizer, dtype)
    return PairPreferenceScorer(model.to(device).eval(), tokenizer)


def main():
    started = time.time()
    # Building the training arguments starts DeepSpeed's CPU process group where needed (HardwareAwareArguments).
    script_args, training_args, lora_args, config = parse_args((ScriptArguments, PreferenceModelConfig, LoraArguments),
                                                               DEFAULT_CONFIG)
    is_main = training_args.process_index == 0
    if is_main:
        note_tiny_recipe(config, DEFAULT_CONFIG, script_args.model_name_or_path, "pair-pm/gemma-2b-it.yaml")
    # Before any work: a writable output directory, not an input, no finished or running run in it; what to resume.
    state = process_state()  # the launcher's ranks, for the steps the main one takes first
    resume = checkpoints.claim_and_resume(state, training_args, (script_args.model_name_or_path,
                                                                 script_args.dataset_path, script_args.eval_set_path),
                                          "pm")
    # fp32 weights under the Trainer's bf16 autocast; bf16 under DeepSpeed (fp32 master weights) or for LoRA's base
    dtype = weights_dtype(training_args, frozen_base=lora_args.use_peft)
    precision = precision_summary(training_args, dtype, frozen_base=lora_args.use_peft)
    # 4/8-bit needs a GPU and bitsandbytes: said now
    quantization = quantization_options(lora_args, compute_dtype(training_args))
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(script_args.model_name_or_path, "--model_name_or_path",
                               training_args.trust_remote_code, script_args.chat_template)
    with main_process_first(state):  # the main rank fills the datasets cache and says the data notes once
        train, held_out, data_stats = load_examples(script_args, training_args.seed)
        # SFTConfig's --dataset_num_proc also runs these maps (checks and tokenization) in that many processes.
        num_proc = training_args.dataset_num_proc
        train, data_stats["train"]["special_token_in_content"] = reject_special_tokens(
            train, tokenizer, ("messages",), script_args.skip_invalid, "train set", num_proc)
        if held_out is not None:
            held_out, data_stats["eval"]["special_token_in_content"] = reject_special_tokens(
                held_out, tokenizer, ("chosen", "rejected"), script_args.skip_invalid, "eval set", num_proc)
        train, token_stats = tokenize_pm_examples(train, tokenizer, training_args.max_length,
                                                  script_args.overlength, "train set", num_proc)
    data_stats["train"].update(token_stats, used=len(train))
    if len(train) == 0:
        raise UserError("no examples left to train on after validation and length filtering")
    if is_main:
        token_a, token_b = label_token_ids(tokenizer)
        answers = Counter({token_a: "A", token_b: "B"}.get(label[-1], "Same") for label in train["labels"])
        print(f"{len(train)} training examples (answer A: {answers['A']}, B: {answers['B']}, "
              f"Same: {answers['Same']}); lr="
              f"{training_args.learning_rate} batch={training_args.per_device_train_batch_size}x"
              f"{training_args.gradient_accumulation_steps} epochs={training_args.num_train_epochs} "
              f"max_length={training_args.max_length} packing={training_args.packing} {precision} "
              f"world_size={training_args.world_size}")

    # Built after SFTConfig so that ZeRO-3 partitions the weights as they load.
    model = load_preference_model(script_args.model_name_or_path, "--model_name_or_path", tokenizer, dtype,
                                  script_args.attn_implementation, training_args.trust_remote_code,
                                  pickled_weights=script_args.load_pickled_weights, **quantization)
    model.config.use_cache = False
    record_kind(model, "pm")  # every checkpoint says what it is: a math reward model is a causal LM too
    if lora_args.use_peft:
        model = wrap_with_lora(model, lora_args, TaskType.CAUSAL_LM, training_args)
    check_resume_settings(model, resume)
    if not (training_args.packing or training_args.shuffle_dataset):
        # Unpacked, TRL's preparation of these rows would only cut them to max_length and drop rows without loss
        # tokens, row by row (6.5 s per 100K examples here); tokenize_pm_examples has done both.
        training_args.dataset_kwargs = {"skip_prepare_dataset": True, **(training_args.dataset_kwargs or {})}
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[checkpoints.DropPickledArguments(), checkpoints.DropDraftModelCard(),
                                    StopOnNonFiniteLoss()])
    train_result = trainer.train(resume_from_checkpoint=resume)

    # Written and verified in a staging directory, then moved into place: a killed save never looks complete.
    staging = checkpoints.staging_dir(training_args.output_dir)
    checkpoint_dir = os.path.join(staging, "last_checkpoint")
    # With LoRA, the adapter goes beside it and last_checkpoint/ gets the base model with the adapter merged.
    save_final_model(trainer, checkpoint_dir, lora_args.use_peft, lambda: load_preference_model(
        script_args.model_name_or_path, "--model_name_or_path", tokenizer, dtype, script_args.attn_implementation,
        training_args.trust_remote_code, pickled_weights=script_args.load_pickled_weights), tokenizer)

    # The in-memory model's answer logits on a few held-out prompts, on every rank (ZeRO-3 gathers the weights
    # with collectives; accelerate wrapped the model's forward in the Trainer's autocast); rank 0 then reloads the
    # checkpoint and must reproduce them, scoring under the same autocast (and the held-out pairs with it).
    trainer.model.eval()
    in_memory_scorer = PairPreferenceScorer(trainer.model, tokenizer)
    if held_out is not None:
        check = held_out.select(range(min(script_args.reload_check_pairs, len(held_out))))
        check_sequences = in_memory_scorer.encode([
            build_pm_prompt(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])
            for chosen, rejected in zip(check["chosen"], check["rejected"])])
    else:  # PM-format data only: check on training prompts (without their answer token)
        check = train.select(range(min(script_args.reload_check_pairs, len(train))))
        check_sequences = [ids[:-1] for ids in check["input_ids"]]
    in_memory = in_memory_scorer.label_logits(check_sequences)

    if is_main:
        scorer = reload_checkpoint(checkpoint_dir, dtype, training_args.device)
        with trainer.accelerator.autocast():
            reloaded = scorer.label_logits(check_sequences)
        reload_diff = checkpoints.verify_reload(in_memory, reloaded, compute_dtype(training_args), checkpoint_dir,
                                                "answer logits")
        metrics = {}
        if held_out is not None:
            scorer.batch_size = training_args.per_device_eval_batch_size
            scorer.max_length = training_args.max_length
            with trainer.accelerator.autocast():
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
            "config": config,
            **({"lora": asdict(lora_args)} if lora_args.use_peft else {}),
        })
        metrics_path = run_metrics.write_run_metrics(staging, metrics, started, train_result, script_args,
                                                     training_args, precision, resumed_from=resume)
        plot_curves(trainer.state.log_history, os.path.join(staging, "curves.png"))
        write_model_card(checkpoint_dir, json.loads(Path(metrics_path).read_text()),
                         base_model=script_args.model_name_or_path, kind="pm", command=launch_command())
        final = checkpoints.publish_run(training_args.output_dir)
        print(f"Checkpoint: {final}\nMetrics: {os.path.join(training_args.output_dir, 'metrics.json')}")
    trainer.accelerator.wait_for_everyone()
    # After the barrier: the other ranks would time out in it while a large model uploads.
    if is_main and training_args.push_final_checkpoint:
        print(f"Pushed to the Hub: {push_checkpoint(training_args, final)}")


if __name__ == "__main__":
    run_cli(main)
