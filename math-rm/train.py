"""Train a math process (PRM) or outcome (ORM) reward model: a causal LM that answers "+" or "-" after each step.

Replaces upstream's axolotl run with TRL's SFTTrainer on pre-tokenized chats whose loss is on the label tokens alone
(every assistant "+"/"-", nothing else). A YAML config (upstream's settings) comes first; any field can be
overridden after it:

    torchrun --nproc_per_node 8 math-rm/train.py math-rm/llama-3.1-prm.yaml \\
        --deepspeed deepspeed_configs/deepspeed_3.json
    python math-rm/train.py math-rm/llama-3.1-orm.yaml --use_peft
    python math-rm/train.py                      # math-rm/tiny.yaml: the embedded tiny model on the toy math set

--dataset_path takes RLHFlow/Mistral-PRM-Data-style rows: a 'conversations' (or 'messages') chat where each step is
a user turn answered "+" or "-". With --reward_type orm a row with several labels becomes one user turn with the
last label (upstream's ORM data was made from its PRM data that way). Held-out rows (--eval_set_path, the train
data's 'test' split, or --eval_holdout_size rows of it) give the label accuracy after training. Writes
<output_dir>/last_checkpoint/, curves.png and metrics.json.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from useful_code import checkpoints, run_metrics
from useful_code.cli import UserError, note_tiny_recipe, parse_args, run_cli
from useful_code.data import held_out_source, hold_out, load_dataset_dict, pick_split
from useful_code.data_parallel import main_process_first, process_state
from useful_code.defaults import DEFAULT_MODEL, REPO_ROOT
from useful_code.distributed import (
    HardwareAwareArguments,
    compute_dtype,
    outside_zero3,
    precision_summary,
    weights_dtype,
)
from useful_code.divergence import DivergenceArguments, StopOnNonFiniteLoss
from useful_code.formats import map_rows
from useful_code.hub import FinalCheckpointPush, push_checkpoint
from useful_code.lora import (LoraArguments, TaskType, check_resume_settings, quantization_options,
                               save_final_model, wrap_with_lora)
from useful_code.math_data import (
    LABELS,
    TOY_PRM,
    encode_labeled,
    label_count,
    label_token_ids,
    to_outcome,
    tokenize_examples,
    validate_training_rows,
)
from useful_code.math_scoring import StepScorer
from useful_code.model_card import launch_command, write_model_card
from useful_code.modeling import load_preference_model, record_kind
from useful_code.packing import enable_padding_free
from useful_code.sft_arguments import PretokenizedSFTArguments
from useful_code.templates import load_tokenizer
from useful_code.training_plots import plot_curves

DEFAULT_CONFIG = str(REPO_ROOT / "math-rm" / "tiny.yaml")


@dataclass
class ScriptArguments:
    """What to train on and how to check it; the training hyper-parameters are SFTConfig's fields."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub name or local directory."})
    dataset_path: str = field(default=TOY_PRM, metadata={
        "help": "Steps-and-labels chats: hub name (RLHFlow/Mistral-PRM-Data), directory or .json/.jsonl/.parquet."})
    dataset_split: str = field(default="train")
    reward_type: str = field(default="prm", metadata={
        "choices": ("prm", "orm"), "help": "prm: a label per step; orm: one label per solution (multi-step rows are "
                                           "joined into one turn with their last label)."})
    eval_set_path: Optional[str] = field(default=None, metadata={
        "help": "Held-out rows in the training format ('test' split). Default: the train data's 'test' split, else "
                "--eval_holdout_size rows held out of it."})
    eval_holdout_size: int = field(default=0, metadata={
        "min": 0, "help": "Rows held out of the train data when there is no --eval_set_path (0: none)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    overlength: str = field(default="error", metadata={"choices": ("error", "drop"),
                                                       "help": "Examples over max_length."})
    reload_check_examples: int = field(default=16, metadata={
        "min": 1, "help": "Held-out (else training) rows whose P(+) verifies the saved checkpoint."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, flash_attention_2 or eager."})
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "Replaces the model's chat template: a Jinja file, or chatml, llama3 or plain (for a base model, or "
                "one whose template writes more than the generation prompt before a label, such as Qwen3's think "
                "block). Saved with the checkpoint's tokenizer."})


@dataclass
class MathRewardConfig(FinalCheckpointPush, HardwareAwareArguments, checkpoints.OutputDirArguments,
                       DivergenceArguments, PretokenizedSFTArguments, SFTConfig):
    """TRL's SFTConfig, usable unchanged on a GPU or a CPU-only machine (bf16 where the GPU has it, as upstream's
    "bf16: auto"); padding is ours (a non-EOS pad token, see useful_code/templates.py)."""


def load_rows(args: ScriptArguments, tokenizer, seed: int, num_proc: Optional[int] = None):
    """Validated training rows and held-out rows (or None) as 'messages' chats, ORM-shaped with --reward_type orm,
    and their counts (num_proc: processes of the validating maps)."""
    splits = load_dataset_dict(args.dataset_path, "--dataset_path", skip_invalid=args.skip_invalid)
    train = pick_split(splits, args.dataset_split, "--dataset_path")
    train, train_stats = validate_training_rows(train, tokenizer, args.skip_invalid, "train set", num_proc)
    held_out, eval_stats = None, None
    raw, source = held_out_source(splits, args.eval_set_path, args.dataset_split, "--dataset_path", args.skip_invalid)
    if raw is not None:
        held_out, eval_stats = validate_training_rows(raw, tokenizer, args.skip_invalid, "eval set", num_proc)
        eval_stats["source"] = source
    elif args.eval_holdout_size:
        train, held_out, eval_stats = hold_out(train, args.eval_holdout_size, seed, source, "--dataset_path",
                                               key_columns=("messages",), unit="rows")
        train_stats["held_out_for_eval"] = eval_stats["read"]
    if args.reward_type == "orm":
        # One label per solution: a multi-step row keeps its last label (a solution is right when its last step is).
        converted = sum(label_count(m) > 1 for m in train["messages"])
        # Batched (map_rows): row by row, this map took about 2 s more per 100K rows (toy PRM rows, one thread).
        train = map_rows(train, lambda m: {"messages": to_outcome(m)}, ["messages"], desc="ORM rows")
        if held_out is not None:
            held_out = map_rows(held_out, lambda m: {"messages": to_outcome(m)}, ["messages"], desc="ORM rows")
        train_stats["joined_into_one_turn"] = converted
    return train, held_out, {"train": train_stats, **({"eval": eval_stats} if eval_stats else {})}


def label_metrics(probs: list[list[float]], rows) -> dict:
    """Held-out label accuracy (P(+) > 0.5 against the label), overall and per label, and the mean P(+) per label,
    over the labels that were scored: a label whose read position truncation cut off (P(+) NaN) is left out and
    counted in eval_labels_cut, never counted as a wrong prediction."""
    predicted = np.array([p for row in probs for p in row])
    truth = np.array([m["content"] == "+" for messages in rows["messages"] for m in messages
                      if m["role"] == "assistant"])
    scored = ~np.isnan(predicted)
    predicted, truth = predicted[scored], truth[scored]
    metrics = {"eval_accuracy": float(np.mean((predicted > 0.5) == truth)), "eval_labels": int(len(truth)),
               "eval_labels_cut": int((~scored).sum()), "eval_solutions": len(rows)}
    for label, mask in zip(LABELS, (truth, ~truth)):
        name = "plus" if label == "+" else "minus"
        if mask.any():
            metrics[f"eval_accuracy_{name}"] = float(np.mean((predicted[mask] > 0.5) == truth[mask]))
            metrics[f"eval_mean_prob_plus_on_{name}"] = float(np.mean(predicted[mask]))
    return metrics


def main():
    started = time.time()
    # Building the training arguments starts DeepSpeed's CPU process group where needed (HardwareAwareArguments).
    script_args, training_args, lora_args, config = parse_args((ScriptArguments, MathRewardConfig, LoraArguments),
                                                               DEFAULT_CONFIG)
    is_main = training_args.process_index == 0
    if is_main:
        note_tiny_recipe(config, DEFAULT_CONFIG, script_args.model_name_or_path, "math-rm/llama-3.1-prm.yaml")
    # Before any work: a writable output directory, not an input, no finished or running run in it; what to resume.
    state = process_state()  # the launcher's ranks, for the steps the main one takes first
    resume = checkpoints.claim_and_resume(state, training_args, (script_args.model_name_or_path,
                                                                 script_args.dataset_path, script_args.eval_set_path),
                                          script_args.reward_type)
    # fp32 weights under the Trainer's bf16 autocast; bf16 under DeepSpeed (fp32 master weights) or for LoRA's base
    dtype = weights_dtype(training_args, frozen_base=lora_args.use_peft)
    precision = precision_summary(training_args, dtype, frozen_base=lora_args.use_peft)
    # 4/8-bit needs a GPU and bitsandbytes: said now
    quantization = quantization_options(lora_args, compute_dtype(training_args))
    set_seed(training_args.seed)

    # Data: validated chats, tokenized with the loss on the "+"/"-" label tokens only.
    tokenizer = load_tokenizer(script_args.model_name_or_path, "--model_name_or_path",
                               training_args.trust_remote_code, script_args.chat_template)
    with main_process_first(state):  # the main rank fills the datasets cache and says the data notes once
        # SFTConfig's --dataset_num_proc also runs these maps (checks and label placement) in that many processes.
        num_proc = training_args.dataset_num_proc
        rows, held_out, data_stats = load_rows(script_args, tokenizer, training_args.seed, num_proc)
        train, token_stats = tokenize_examples(rows, tokenizer, training_args.max_length, script_args.overlength,
                                               "train set", num_proc, script_args.skip_invalid)
    data_stats["train"].update(token_stats, used=len(train))
    if len(train) == 0:
        raise UserError("no examples left to train on after validation and length filtering")
    if is_main:
        # Counted on the tokenized examples: what --overlength drop removed is not trained on.
        trained = [label for labels in train["labels"] for label in labels if label != -100]
        minus_id = label_token_ids(tokenizer)[1]
        n_minus = sum(label == minus_id for label in trained)
        print(f"{len(train)} training solutions ({script_args.reward_type}), {len(trained)} labels ('-': {n_minus}); "
              f"lr={training_args.learning_rate} batch={training_args.per_device_train_batch_size}x"
              f"{training_args.gradient_accumulation_steps} epochs={training_args.num_train_epochs} "
              f"max_length={training_args.max_length} packing={training_args.packing} {precision} "
              f"world_size={training_args.world_size}")

    # Model: built after SFTConfig so that ZeRO-3 partitions the weights as they load.
    model = load_preference_model(script_args.model_name_or_path, "--model_name_or_path", tokenizer, dtype,
                                  script_args.attn_implementation, training_args.trust_remote_code,
                                  pickled_weights=script_args.load_pickled_weights, **quantization)
    model.config.use_cache = False
    record_kind(model, script_args.reward_type)  # every checkpoint says what it is: a PM is a causal LM too
    if lora_args.use_peft:
        model = wrap_with_lora(model, lora_args, TaskType.CAUSAL_LM, training_args)
    check_resume_settings(model, resume)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[checkpoints.DropPickledArguments(), checkpoints.DropDraftModelCard(),
                                    StopOnNonFiniteLoss()])
    train_result = trainer.train(resume_from_checkpoint=resume)

    # Save: written and verified in a staging directory, then moved into place (a killed save never looks complete).
    staging = checkpoints.staging_dir(training_args.output_dir)
    checkpoint_dir = os.path.join(staging, "last_checkpoint")
    # With LoRA, the adapter goes beside it and last_checkpoint/ gets the base model with the adapter merged.
    save_final_model(trainer, checkpoint_dir, lora_args.use_peft, lambda: load_preference_model(
        script_args.model_name_or_path, "--model_name_or_path", tokenizer, dtype, script_args.attn_implementation,
        training_args.trust_remote_code, pickled_weights=script_args.load_pickled_weights), tokenizer)

    # Verify: the in-memory model's P(+) at the label positions of a few rows, on every rank (ZeRO-3 gathers the
    # weights with collectives; accelerate wrapped the model's forward in the Trainer's autocast); rank 0 then
    # reloads the checkpoint in the weights' dtype and must reproduce them under the same autocast (the held-out
    # rows are scored with it too).
    trainer.model.eval()
    check_rows = held_out if held_out is not None else rows
    check_rows = check_rows.select(range(min(script_args.reload_check_examples, len(check_rows))))
    check = encode_labeled(tokenizer, check_rows["messages"], "reload check")
    in_memory = StepScorer(trainer.model, tokenizer, training_args.per_device_eval_batch_size).label_probs(check)

    if is_main:
        with outside_zero3():
            saved_tokenizer = load_tokenizer(checkpoint_dir, "checkpoint")
            model = load_preference_model(checkpoint_dir, "checkpoint", saved_tokenizer, dtype)
        enable_padding_free(model)  # as StepScorer.from_pretrained loads it
        reloaded = StepScorer(model.to(training_args.device).eval(), saved_tokenizer,
                              training_args.per_device_eval_batch_size)
        with trainer.accelerator.autocast():
            reloaded_probs = reloaded.label_probs(check)
        reload_diff = checkpoints.verify_reload(np.concatenate(in_memory), np.concatenate(reloaded_probs),
                                                compute_dtype(training_args), checkpoint_dir,
                                                "P(+) at the label positions")
        metrics = {}
        if held_out is not None:
            reloaded.max_length = training_args.max_length
            encoded = reloaded.truncate(encode_labeled(tokenizer, held_out["messages"], "eval set"))
            with trainer.accelerator.autocast():
                probs = reloaded.label_probs(encoded, progress=True)
            metrics.update(label_metrics(probs, held_out), eval_solutions_truncated=reloaded.truncated)
            if reloaded.truncated:  # cut from the left as in evaluation, never silently
                print(f"Held-out: {reloaded.truncated} solutions over --max_length {training_args.max_length} cut "
                      f"from the left; {metrics['eval_labels_cut']} of their labels lost their step and are not "
                      "counted")
            per_label = ", ".join(f"'{label}': {metrics[key]:.4f}" for label, key in
                                  (("+", "eval_accuracy_plus"), ("-", "eval_accuracy_minus")) if key in metrics)
            print(f"Held-out label accuracy on {metrics['eval_labels']} labels of {metrics['eval_solutions']} "
                  f"solutions: {metrics['eval_accuracy']:.4f} ({per_label})")
        else:
            print("No held-out rows: pass --eval_set_path or --eval_holdout_size to measure label accuracy")
        metrics.update({
            "reward_type": script_args.reward_type,
            "examples": data_stats,
            "reload_max_abs_diff": reload_diff,
            "config": config,
            **({"lora": asdict(lora_args)} if lora_args.use_peft else {}),
        })
        metrics_path = run_metrics.write_run_metrics(staging, metrics, started, train_result, script_args,
                                                     training_args, precision, resumed_from=resume)
        plot_curves(trainer.state.log_history, os.path.join(staging, "curves.png"))
        write_model_card(checkpoint_dir, json.loads(Path(metrics_path).read_text()),
                         base_model=script_args.model_name_or_path, kind="math", command=launch_command())
        final = checkpoints.publish_run(training_args.output_dir)
        print(f"Checkpoint: {final}\nMetrics: {os.path.join(training_args.output_dir, 'metrics.json')}")
    trainer.accelerator.wait_for_everyone()
    # After the barrier: the other ranks would time out in it while a large model uploads.
    if is_main and training_args.push_final_checkpoint:
        print(f"Pushed to the Hub: {push_checkpoint(training_args, final)}")


if __name__ == "__main__":
    run_cli(main)
