"""Train a Bradley-Terry reward model: a sequence classifier with a scalar head, loss -logsigmoid(r_chosen - r_rejected).

One script for every model family; a YAML recipe per model in configs/ carries upstream's values, and any flag
overrides it (upstream's gemma_2B_rm.py, llama3_8B_rm.py and mistral_7B_rm.py run this with their recipe). Runs
under `deepspeed`, `accelerate launch`, `torchrun` or plain `python`, on GPUs or on a CPU-only machine:

    deepspeed bradley-terry-rm/train.py bradley-terry-rm/configs/gemma-2b-it.yaml \\
        --deepspeed deepspeed_configs/deepspeed_3.json
    python bradley-terry-rm/train.py        # configs/tiny.yaml: the embedded tiny model on the bundled toy pairs

Writes <output_path>/last_checkpoint/ (model, config, tokenizer, model card README.md), metrics.json, curves.png and
rewards.png; with --use_peft also adapter/ (the adapter as trained), with --loss_type odin two_heads/ (both heads).
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from useful_code import checkpoints, output_files, run_metrics
from useful_code.batch_samplers import LengthGroupedBatches, TokenBudgetBatches
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
from useful_code.formats import standardize_pairs, validate_pair_values
from useful_code.hub import FinalCheckpointPush, push_checkpoint
from useful_code.lora import (LoraArguments, TaskType, check_resume_settings, quantization_options,
                               save_final_model, wrap_with_lora)
from useful_code.losses import (
    ODIN_PARTS,
    PAIR_COLUMNS,
    PairwiseCollator,
    bradley_terry_loss,
    odin_loss,
    pairwise_loss,
    required_columns,
    split_pair_rewards,
)
from useful_code.model_card import launch_command, write_model_card
from useful_code.modeling import (
    REWARD_HEAD_WEIGHTS,
    classifier_head_name,
    disable_dropout,
    load_reward_model,
    record_kind,
)
from useful_code.packing import (
    enable_padding_free,
    packed_rewards,
    padding_free_unsupported,
    pair_cost,
    prefix_sharing_pays,
    supports_prefix_sharing,
)
from useful_code.scoring import score_sequences
from useful_code.templates import load_tokenizer, tokenize_pairs
from useful_code.training_plots import plot_curves, plot_rewards

DEFAULT_CONFIG = str(REPO_ROOT / "bradley-terry-rm" / "configs" / "tiny.yaml")


@dataclass
class ScriptArguments(HeldOutArguments):
    """What to train on and how to check it (upstream's names); the hyper-parameters are RewardTrainingArguments."""

    model_name: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub name or local directory of the base model."})
    train_set_path: str = field(
        default=DEFAULT_PREFERENCE_DATA,
        metadata={"help": "Hub name, saved dataset directory, data directory or .json/.jsonl/.parquet file."},
    )
    overlength: str = field(default="truncate",
                            metadata={"choices": ("truncate", "drop"),
                                      "help": "Over-long training pairs: cut from the left (as upstream) or dropped."})
    trust_remote_code: bool = field(default=False)
    dataset_num_proc: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "Processes that check and tokenize the pairs (TRL's name; tokenizing takes about 80 s per "
                          "100K pairs on one core). Default: one."})
    loss_type: str = field(default="bt", metadata={
        "choices": ("bt", "margin", "scaled", "odin"),
        "help": "bt; margin (TRL's: -log sigmoid(r_c - r_r - margin), a 'margin' column); scaled (each pair's loss "
                "times its 'weight' column); odin (a length head and a quality head; last_checkpoint/ is the quality "
                "head alone)."})
    odin_length_coefficient: Optional[float] = field(default=None, metadata={
        "min": 0, "aliases": ["--correlation_with_length"],
        "help": "ODIN's length-correlation term (--loss_type odin only; default 1.0)."})
    odin_ortho_coefficient: Optional[float] = field(default=None, metadata={
        "min": 0, "aliases": ["--ortho_reg"], "help": "ODIN's head-orthogonality term (--loss_type odin only; default "
                                                      "1.0; upstream's term was commented out: its recipe sets 0)."})
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "min": 0, "help": "TRL's reward centering: adds coefficient * mean((r_c + r_r)^2)."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Train without the model's dropout (TRL's default): chosen and rejected would be read under different "
                "dropout masks, noise on the reward difference the loss is on. Most decoder LLMs have none."})
    padding_free: bool = field(default=True, metadata={
        "help": "Pack each batch's sequences end to end in one row, no padding computed, attention kept inside each "
                "sequence (where the model and attention implementation allow it; else padded, said once)."})
    max_tokens_per_batch: int = field(default=0, metadata={
        "min": 0, "help": "With --padding_free: batches of as many pairs as fit in this many packed tokens (replaces "
                          "--per_device_train_batch_size; bounds the activations of a step). A batch's loss is the "
                          "mean over its pairs, so the pairs of a batch of few long pairs weigh more each. 0: batches "
                          "of --per_device_train_batch_size pairs."})
    prefix_sharing: Optional[bool] = field(default=None, metadata={
        "help": "With --padding_free: compute each pair's shared context once, both responses attending to it "
                "(sdpa/eager; flash attention falls back to plain padding-free, said once). Default: on a CPU, where "
                "it is faster; not on a GPU, where plain padding-free was faster (its tree needs a mask)."})

    def __post_init__(self):
        for flag in ("max_tokens_per_batch", "prefix_sharing"):
            if getattr(self, flag) and not self.padding_free:
                raise UserError(f"--{flag} needs padding-free training: drop --padding_free false")
        for flag, upstream in (("odin_length_coefficient", "correlation_with_length"),
                               ("odin_ortho_coefficient", "ortho_reg")):
            if self.loss_type == "odin" and getattr(self, flag) is None:
                setattr(self, flag, 1.0)
            elif self.loss_type != "odin" and getattr(self, flag) is not None:
                raise UserError(f"--{flag} (--{upstream}): an ODIN setting, which applies only with --loss_type odin "
                                f"(here: {self.loss_type}); pass --loss_type odin or drop it")
        if self.loss_type == "odin" and self.center_rewards_coefficient:
            raise UserError("--center_rewards_coefficient does not apply to --loss_type odin (its loss has no "
                            "centering term): drop one of them")


@dataclass
class RewardTrainingArguments(FinalCheckpointPush, HardwareAwareArguments, checkpoints.OutputDirArguments,
                              checkpoints.PeriodicArguments, DivergenceArguments, TrainingArguments):
    """transformers' TrainingArguments with upstream's flag names and defaults (gemma_2B_rm.py) where they differ."""

    output_dir: Optional[str] = field(default="./bt_models/reward_model",
                                      metadata={"aliases": ["--output_path"], "help": "Output directory."})
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Max tokens per conversation."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch pairs of similar length (less padding)."})
    warmup_steps: float = field(default=0.03, metadata={"aliases": ["--warmup_ratio"],
                                                        "help": "Warmup steps, or a fraction of the steps when < 1."})
    weight_decay: float = field(default=0.001)
    lr_scheduler_type: str = field(default="cosine")
    optim: str = field(default="adamw_torch", metadata={"help": "upstream: paged_adamw_32bit (needs bitsandbytes)."})
    bf16: Optional[bool] = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 otherwise)."})
    logging_steps: float = field(default=10)
    report_to: Optional[str] = field(default="none", metadata={"help": "wandb, tensorboard, ... or none."})

    def __post_init__(self):
        self.resolve_periodic()
        if self.prediction_loss_only:
            raise UserError("--prediction_loss_only: the held-out accuracy and the reload check need the rewards; "
                            "drop the flag")
        if self.label_smoothing_factor:  # the Trainer applies it to class labels; a BT loss has none
            raise UserError("--label_smoothing_factor: not applied by the Bradley-Terry losses (it would be ignored); "
                            "drop the flag")
        # Training batches come from --group_by_length or --max_tokens_per_batch (batch_samplers.py), never from
        # transformers' sampler: its other strategies are accepted only where they mean what they say.
        if self.train_sampling_strategy == "group_by_length" and not self.group_by_length:
            raise UserError("--train_sampling_strategy group_by_length and --group_by_length false disagree: give one")
        elif self.train_sampling_strategy == "sequential" and self.group_by_length:
            raise UserError("--train_sampling_strategy sequential: give --group_by_length false with it (length "
                            "grouping, the default, shuffles the batches)")
        elif self.train_sampling_strategy == "batch_rebalance":
            raise UserError("--train_sampling_strategy batch_rebalance: not supported by this trainer; "
                            "--max_tokens_per_batch batches by a token budget")
        self.remove_unused_columns = False  # the collator reads the token-id columns
        self.label_names = []
        super().__post_init__()


def load_pairs(args: ScriptArguments, seed: int):
    """Load the train and held-out pairs in the standard format, with counts of what was read and used, and the
    per-pair column the training loss reads (margin, weight) checked; other such columns are dropped. Rows are validated
    before any hold-out split, so an error names the row's index in the file."""
    train_splits = load_dataset_dict(args.train_set_path, "--train_set_path", skip_invalid=args.skip_invalid)
    train = pick_split(train_splits, "train", "--train_set_path")
    train, train_stats = standardize_pairs(train, args.skip_invalid, "train set")
    for column in required_columns(args.loss_type):
        train, train_stats[column] = validate_pair_values(train, column, args.skip_invalid, "train set")
    unused = [c for c in PAIR_COLUMNS if c in train.column_names and c not in required_columns(args.loss_type)]
    readers = {"margin": "margin", "weight": "scaled"}  # the loss that reads each
    if noted := [c for c in unused if c in readers]:  # TRL applies a 'margin' column whenever there is one: said
        print(f"note: --loss_type {args.loss_type} does not use the train set's "
              + ", ".join(f"'{c}' column (--loss_type {readers[c]} does)" for c in noted))
    train = train.remove_columns(unused)
    train, held_out, eval_stats = held_out_pairs(train, train_splits, args.eval_set_path, args.eval_holdout_size, seed,
                                                 args.skip_invalid, "--train_set_path")
    # The held-out loss is plain BT whatever the training loss: comparable across variants, like the accuracy.
    held_out = held_out.remove_columns([c for c in PAIR_COLUMNS if c in held_out.column_names])
    if eval_stats["source"].startswith("held out"):
        train_stats["held_out_for_eval"] = eval_stats["read"]  # taken out of training (some may be left out)
    return train, held_out, {"train": train_stats, "eval": eval_stats}


def window_metrics(batch_metrics: dict[str, list]) -> dict[str, float]:
    """The logged metrics of a logging window's training batches: accuracy, margin and the mean reward over its
    pairs (token-budget batches hold different numbers of pairs; TRL's mean of batch means would weigh a small
    batch's pairs more), the rewards' extremes over the window, and the mean of the other per-batch values."""
    pairs = batch_metrics.get("pairs", [])
    logs = {}
    for key, values in batch_metrics.items():
        if key in ("accuracy", "margin", "rewards/mean"):
            logs[key] = sum(v * n for v, n in zip(values, pairs)) / sum(pairs)
        elif key in ("rewards/min", "rewards/max"):
            logs[key] = (min if key == "rewards/min" else max)(values)
        elif key != "pairs":
            logs[key] = sum(values) / len(values)
    return logs


ODIN_LENGTH, ODIN_QUALITY = 0, 1  # upstream odin/'s column order
# A training batch's statistics as BradleyTerryTrainer keeps them (ODIN's parts follow under --loss_type odin).
BATCH_STATS = ("accuracy", "margin", "rewards/mean", "rewards/min", "rewards/max", "real", "padding", "computed",
               "pairs")


class BradleyTerryTrainer(Trainer):
    """Trainer whose loss is the Bradley-Terry loss (or a variant: margin, per-pair weight, centering) over
    (chosen, rejected) batches from PairwiseCollator."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let the Trainer scale it for accumulation

    def __init__(self, *args, center_rewards_coefficient: float = 0.0, odin: Optional[tuple[float, float]] = None,
                 batch_sampler: Optional[torch.utils.data.Sampler] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler  # token-budget or length-grouped training batches (batch_samplers.py)
        self.center_rewards_coefficient = center_rewards_coefficient
        self.odin = odin  # (length, orthogonality) coefficients when training ODIN's two heads
        self.batch_metrics: dict[str, list[float]] = {}  # training batches since the last log, as TRL keeps them
        self.train_tokens = {"real": 0, "computed": 0, "padding": 0}  # every rank's training forwards, whole run
        # Each training batch's statistics (BATCH_STATS, then ODIN's parts), still on the device: read into
        # batch_metrics and train_tokens at the next log or save, so that a step never waits for the device.
        self.pending_stats: list[torch.Tensor] = []
        self.token_counter = TrainTokensInCheckpoints(self.train_tokens, self.read_pending_stats)  # across a resume
        self.add_callback(self.token_counter)

    def read_pending_stats(self) -> None:
        """The pending batches' statistics, every rank's, into batch_metrics and train_tokens, in one copy from the
        device (float64 holds the float32 statistics and the token counts exactly). Every rank calls it at the same
        points (log, save, the end of training), as the gather needs."""
        if not self.pending_stats:
            return
        rows = torch.stack(self.pending_stats)
        self.pending_stats = []
        if self.args.world_size > 1:  # the logged metrics describe all the pairs, as TRL's do, not rank 0's share
            rows = self.accelerator.gather(rows)
        for row in rows.tolist():
            values = dict(zip(BATCH_STATS, row))
            for key in ("accuracy", "margin", "rewards/mean", "rewards/min", "rewards/max", "pairs"):
                self.batch_metrics.setdefault(key, []).append(values[key])
            for key in ("real", "computed", "padding"):
                self.train_tokens[key] += int(values[key])
            for key, value in zip(ODIN_PARTS, row[len(BATCH_STATS):]):
                self.batch_metrics.setdefault(f"odin/{key}", []).append(value)

    def log(self, logs: dict, *args, **kwargs) -> None:
        self.read_pending_stats()
        if self.model.training and self.batch_metrics:  # TRL's reward metrics over the logging window
            logs.update(window_metrics(self.batch_metrics))
            # So far in the run, every rank's: num_tokens the sequences' own tokens (TRL's), computed_tokens what
            # the forwards ran (padding included, a shared context once)
            logs.update(num_tokens=self.train_tokens["real"], computed_tokens=self.train_tokens["computed"])
            self.batch_metrics = {}
        super().log(logs, *args, **kwargs)

    def _prepare_inputs(self, inputs):
        # The Trainer casts every float input to DeepSpeed's bf16: margins and weights keep their float32 values.
        pair_values = {k: inputs.pop(k) for k in PAIR_COLUMNS if k in inputs}
        prepared = super()._prepare_inputs(inputs)
        return {**prepared, **{k: v.to(self.args.device) for k, v in pair_values.items()}}

    def batch_rewards(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor | int]:
        """The model's outputs for a PairwiseCollator batch ([2 * pairs, heads]: chosen rows first) and the padding
        tokens it computed (a tensor on the batch's device: read with the step's other counts, one sync)."""
        if "packed_blocks" in inputs:  # PairwiseCollator(padding_free=True): one row, read at each sequence's end
            return packed_rewards(model, inputs), 0
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return rewards, inputs["attention_mask"].numel() - inputs["attention_mask"].sum()

    def reward_pairs(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards: the model's one output, or ODIN's quality head (the reward that accuracy,
        evaluation and the exported checkpoint use; the length head only soaks up length in training)."""
        return split_pair_rewards(rewards if self.odin is None else rewards[:, ODIN_QUALITY])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards, padding = self.batch_rewards(model, inputs)
        chosen, rejected = self.reward_pairs(rewards)
        parts = {}
        if self.odin is None:
            loss = pairwise_loss(chosen, rejected, margin=inputs.get("margin"), weight=inputs.get("weight"),
                                 center_rewards_coefficient=self.center_rewards_coefficient)
        else:
            length_c, length_r = split_pair_rewards(rewards[:, ODIN_LENGTH])
            loss, parts = odin_loss(chosen, rejected, length_c, length_r, inputs["chosen_length"],
                                    inputs["rejected_length"], odin_head_weight(model), *self.odin)
        if model.training:
            with torch.no_grad():
                gap, both = (chosen - rejected).float(), torch.cat([chosen, rejected]).float()
                # torch.full, not as_tensor: a fill on the device, where copying a host number would wait for it
                counts = [n.to(gap.device) if torch.is_tensor(n) else torch.full((), n, device=gap.device)
                          for n in (inputs["real_tokens"], padding, inputs["input_ids"].numel(), len(chosen))]
                stats = [(gap > 0).float().mean(), gap.mean(), both.mean(), both.min(), both.max(), *counts,
                         *parts.values()]
                self.pending_stats.append(torch.stack([value.double() for value in stats]))
        return (loss, {"rewards": torch.stack([chosen, rejected], dim=1)}) if return_outputs else loss

    def get_train_dataloader(self):
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        args = self.args
        # Trainer._get_dataloader's settings, with our batch sampler (it passes only its own BatchRebalanceSampler)
        workers = {"persistent_workers": args.dataloader_persistent_workers,
                   "prefetch_factor": args.dataloader_prefetch_factor,
                   "multiprocessing_context": args.dataloader_multiprocessing_context,
                   "in_order": args.dataloader_in_order} if args.dataloader_num_workers else {}
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
            **workers)
        return self.accelerator.prepare(loader)

    def _get_eval_sampler(self, eval_dataset):
        # transformers also length-groups (shuffles) eval batches when training does; predictions must come
        # back in dataset order to be compared pair by pair.
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Held-out rewards [pairs, 2]; their loss is plain BT whatever the training loss (no margin, weight,
        centering or ODIN terms), so runs compare, and compute_metrics takes it over every pair at once."""
        inputs = self._prepare_inputs(inputs)
        # no_grad, not inference_mode: evaluation may run between training steps, and under ZeRO-3 the parameters
        # it gathers must stay usable by autograd afterwards.
        with torch.no_grad(), self.compute_loss_context_manager():
            chosen, rejected = self.reward_pairs(self.batch_rewards(model, inputs)[0])
        rewards = torch.stack([chosen, rejected], dim=1).detach().float()
        # No per-batch loss: the Trainer would average batch means with equal weights (a short last batch counting
        # as much as a full one) and drop non-finite ones.
        # Pairs carry no labels (chosen is always preferred); a placeholder lets the Trainer call compute_metrics.
        return None, rewards, torch.zeros(rewards.shape[0], device=rewards.device)


class TrainTokensInCheckpoints(TrainerCallback):
    """Keeps metrics.json's train_tokens a count of the whole run across --resume_from_checkpoint: each periodic
    checkpoint holds this rank's counts so far (counts: the Trainer's dict, updated in place), and restore() starts
    a resumed run from them."""

    def __init__(self, counts: dict, update: Callable[[], None]):
        self.counts, self.update = counts, update  # update(): brings counts up to date before they are saved

    @staticmethod
    def path(checkpoint_dir, rank: int) -> Path:
        """Where a checkpoint keeps this rank's token counts."""
        return Path(checkpoint_dir) / f"train_tokens_rank{rank}.json"

    def on_save(self, args, state, control, **kwargs):
        self.update()
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if directory.is_dir():
            output_files.atomic_write_text(self.path(directory, args.process_index), json.dumps(self.counts))

    def restore(self, checkpoint_dir: str, rank: int) -> None:
        """Start this rank's counts from those a checkpoint saved (a resumed run)."""
        saved = self.path(checkpoint_dir, rank)
        if saved.is_file():
            self.counts.update(json.loads(saved.read_text()))
        elif rank == 0:
            print(f"note: {checkpoint_dir} holds no token counts (written before they were kept): metrics.json's "
                  "train_tokens counts the resumed steps only")


def response_lengths(batch, tokenizer) -> dict:
    """Each final response's length in tokens (its text alone): what ODIN's length head is to carry."""
    return {f"{side}_length": [len(ids) for ids in tokenizer([c[-1]["content"] for c in batch[side]],
                                                             add_special_tokens=False)["input_ids"]]
            for side in ("chosen", "rejected")}


def check_odin_settings(args: ScriptArguments, training_args) -> None:
    """What ODIN's terms need of a run, as one line before any work: its orthogonality term reads the head's whole
    weight, of which ZeRO-3 holds a shard outside the forward (the term was skipped, silently), and its length term is
    a correlation over a device's batch, which one pair (two points) makes +-1 whatever the rewards."""
    zero3 = training_args.deepspeed and training_args.hf_deepspeed_config.is_zero3()
    if zero3 and args.odin_ortho_coefficient:
        raise UserError("--loss_type odin under ZeRO-3: its orthogonality term needs the head's whole weight, which "
                        "ZeRO-3 partitions; use ZeRO-2 (deepspeed_configs/deepspeed_2.json, upstream's ODIN setting) "
                        "or --odin_ortho_coefficient 0")
    if training_args.per_device_train_batch_size < 2 and not args.max_tokens_per_batch:
        raise UserError("--loss_type odin with --per_device_train_batch_size 1: its length term is a correlation over "
                        "each device's batch, always +-1 for one pair; use at least 2 pairs per device")


def classifier_head(model) -> tuple:
    """(the model itself, unwrapped from DeepSpeed's engine, and its output layer: 'score' or 'classifier')."""
    module = model.module if hasattr(model, "module") else model
    name = classifier_head_name(module)
    return module, getattr(module, name) if name else None


def check_odin_head(model) -> None:
    """ODIN's two heads are the rows of one linear layer (score or classifier): an encoder whose classifier is a
    block (RoBERTa's dense + projection) has none, and its quality head could not be exported."""
    module, head = classifier_head(model)
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"--loss_type odin needs a model whose reward head is one linear layer ('score' or "
                        f"'classifier'); {type(module).__name__}'s is {type(head).__name__}")


def odin_head_weight(model) -> Optional[torch.Tensor]:
    """The [2, hidden] head weight for ODIN's orthogonality term; None where ZeRO-3 holds only a shard of it (a run
    whose orthogonality coefficient is 0: check_odin_settings refuses the others)."""
    weight = getattr(classifier_head(model)[1], "weight", None)
    return weight if weight is not None and weight.dim() == 2 and weight.shape[1] > 0 else None


def export_quality_head(two_heads_dir: str, checkpoint_dir: str, tokenizer, dtype: torch.dtype) -> None:
    """ODIN's quality head alone as a plain one-output reward model (what evaluation and serving load)."""
    with outside_zero3():
        model = load_reward_model(two_heads_dir, "checkpoint", tokenizer, dtype, num_labels=2)
    name = classifier_head_name(model)
    two = getattr(model, name)
    one = torch.nn.Linear(two.in_features, 1, bias=two.bias is not None, dtype=two.weight.dtype)
    with torch.no_grad():
        one.weight.copy_(two.weight[ODIN_QUALITY:ODIN_QUALITY + 1])
        if two.bias is not None:
            one.bias.copy_(two.bias[ODIN_QUALITY:ODIN_QUALITY + 1])
    setattr(model, name, one)
    model.num_labels = model.config.num_labels = 1
    model.save_pretrained(checkpoint_dir)
    tokenizer.save_pretrained(checkpoint_dir)


def compute_metrics(eval_pred) -> dict:
    """Over the held-out rewards [pairs, 2]: plain BT loss (the mean over pairs), pair accuracy (chosen strictly
    above rejected: ties count as wrong, as in RewardBench), ties, and the rewards' scale (the mean margin, and the
    mean and sample standard deviation of every chosen and rejected reward), which an RL loop may normalize by."""
    rewards = np.asarray(eval_pred.predictions).reshape(-1, 2)
    loss = bradley_terry_loss(torch.from_numpy(rewards[:, 0]), torch.from_numpy(rewards[:, 1]))
    return {"loss": loss.item(), "accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1])),
            "ties": int(np.sum(rewards[:, 0] == rewards[:, 1])),
            "margin": float(np.mean(rewards[:, 0] - rewards[:, 1], dtype=np.float64)),
            "reward_mean": float(np.mean(rewards, dtype=np.float64)),
            "reward_std": float(np.std(rewards, ddof=1, dtype=np.float64))}  # ddof=1 as OpenRLHF's torch.std


def verify_checkpoint(trainer, checkpoint_dir: str, pairs, in_memory: np.ndarray, dtype: torch.dtype) -> float:
    """Reload the saved checkpoint as a user would (whole, on one process, in dtype: the weights' dtype in training)
    and check that it reproduces the trained model's rewards (in_memory, [n, 2], from trainer.predict) on these
    held-out pairs. Scored under the Trainer's own autocast (bf16 mixed precision; none in fp32 or under DeepSpeed),
    as the in-memory rewards were."""
    max_diff = 0.0
    if trainer.args.process_index == 0:
        tokenizer = load_tokenizer(checkpoint_dir, "checkpoint")
        with outside_zero3():
            model = load_reward_model(checkpoint_dir, "checkpoint", tokenizer, dtype).to(trainer.args.device).eval()
        enable_padding_free(model)  # scored as evaluation scores it
        with trainer.accelerator.autocast():
            rewards = score_sequences(model, tokenizer,
                                      list(pairs["chosen_input_ids"]) + list(pairs["rejected_input_ids"]), batch_size=8)
        reloaded = np.stack([rewards[: len(pairs)], rewards[len(pairs):]], axis=1)
        max_diff = checkpoints.verify_reload(in_memory, reloaded, compute_dtype(trainer.args), checkpoint_dir,
                                             "rewards")
    trainer.accelerator.wait_for_everyone()
    return max_diff


def choose_packing(model, args: ScriptArguments, is_main: bool, device: torch.device) -> tuple[bool, bool]:
    """(padding_free, share_prefix) as asked (by default, prefix sharing where it pays on device) and as the model
    allows; what could not be had is said once."""
    if not args.padding_free:
        return False, False
    reason = padding_free_unsupported(model)
    if reason:
        if is_main:
            print(f"note: padded batches, not padding-free: {reason}")
        return False, False
    enable_padding_free(model)
    if args.prefix_sharing is None:
        return True, prefix_sharing_pays(model, device)
    if args.prefix_sharing and not supports_prefix_sharing(model):
        if is_main:
            print(f"note: prefix sharing needs sdpa or eager attention, not {model.config._attn_implementation}; "
                  "training padding-free without it")
        return True, False
    return True, args.prefix_sharing


def main(default_config: str = DEFAULT_CONFIG):
    """Train, save, verify and report one reward model; default_config: the recipe used when argv names none."""
    started = time.time()
    # Building the training arguments starts DeepSpeed's CPU process group where needed (HardwareAwareArguments).
    args, training_args, lora_args, config = parse_args((ScriptArguments, RewardTrainingArguments, LoraArguments),
                                                        default_config)
    # fp32 weights under the Trainer's bf16 autocast; bf16 under DeepSpeed (fp32 master weights) or for LoRA's base
    dtype = weights_dtype(training_args, frozen_base=lora_args.use_peft)
    precision = precision_summary(training_args, dtype, frozen_base=lora_args.use_peft)
    is_main = training_args.process_index == 0
    # Before any work: a writable output directory, not an input, no finished or running run in it; what to resume.
    state = process_state()  # the launcher's ranks, for the steps the main one takes first
    resume = checkpoints.claim_and_resume(state, training_args, (args.model_name, args.train_set_path,
                                                                 args.eval_set_path), "bt",
                                          flag="--output_path",  # upstream's name (--output_dir works too)
                                          written_last=TrainTokensInCheckpoints.path("", 0).name)
    # 4/8-bit needs a GPU and bitsandbytes: said now
    quantization = quantization_options(lora_args, compute_dtype(training_args))
    if args.loss_type == "odin":
        check_odin_settings(args, training_args)
        if lora_args.use_peft:
            raise UserError("--loss_type odin with --use_peft is not supported yet: train ODIN's heads in full")
    if args.max_tokens_per_batch and training_args.train_sampling_strategy == "sequential":
        raise UserError("--train_sampling_strategy sequential: token-budget batches (--max_tokens_per_batch) are drawn "
                        "in a shuffled order; leave one of the two out")
    set_seed(training_args.seed)
    if is_main:
        print(f"Hyper-parameters: lr={training_args.learning_rate} batch={training_args.per_device_train_batch_size}x"
              f"{training_args.gradient_accumulation_steps} epochs={training_args.num_train_epochs} "
              f"max_length={training_args.max_length} {precision} world_size={training_args.world_size}")
        note_tiny_recipe(config, DEFAULT_CONFIG, args.model_name, "bradley-terry-rm/configs/gemma-2b-it.yaml")

    tokenizer = load_tokenizer(args.model_name, "--model_name", args.trust_remote_code, args.chat_template)
    with main_process_first(state):  # the main rank fills the datasets cache and says the data notes once
        train, held_out, data_stats = load_pairs(args, training_args.seed)
        train, train_tok = tokenize_pairs(train, tokenizer, training_args.max_length, args.overlength, "train set",
                                          args.skip_invalid, args.dataset_num_proc)
        # Held-out pairs are truncated as in evaluation, never dropped: the accuracy is on the set the user chose
        # (a pair whose responses become the same tokens scores as a tie, as in evaluation).
        held_out, eval_tok = tokenize_pairs(held_out, tokenizer, training_args.max_length, "truncate", "eval set",
                                            args.skip_invalid, keep_same_tokens=True)
    if args.loss_type == "odin":  # the held-out loss is plain BT: only the training pairs need lengths
        train = train.map(response_lengths, batched=True, fn_kwargs={"tokenizer": tokenizer}, desc="response lengths")
    data_stats["train"].update(train_tok, used=len(train))
    data_stats["eval"].update(eval_tok, used=len(held_out))
    if len(train) == 0 or len(held_out) == 0:
        raise UserError("no pairs left to train or evaluate on after validation and length filtering")

    # Built after the training arguments so that ZeRO-3 partitions the weights as they load.
    model = load_reward_model(args.model_name, "--model_name", tokenizer, dtype, args.attn_implementation,
                              args.trust_remote_code, num_labels=2 if args.loss_type == "odin" else 1,
                              new_weights=REWARD_HEAD_WEIGHTS,  # a base model gets a new head
                              pickled_weights=args.load_pickled_weights, **quantization)
    model.config.use_cache = False
    record_kind(model, "bt")  # every checkpoint says what it is
    if args.loss_type == "odin":
        check_odin_head(model)
    # Before LoRA wraps the model: the adapters keep their own --lora_dropout.
    if args.disable_dropout and (turned_off := disable_dropout(model)) and is_main:
        print(f"Dropout off in training: {turned_off} dropout layers of {args.model_name} (--disable_dropout false "
              "keeps them)")
    padding_free, share_prefix = choose_packing(model, args, is_main, training_args.device)
    if lora_args.use_peft:
        model = wrap_with_lora(model, lora_args, TaskType.SEQ_CLS, training_args)
    check_resume_settings(model, resume)

    # Seeded batch orders, each epoch's drawn from (data_seed, epoch): a resumed run trains on what it would have.
    data_seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
    batch_sampler = None
    if args.max_tokens_per_batch:
        if not padding_free:
            raise UserError("--max_tokens_per_batch needs padding-free training, which this model cannot do (see the "
                            "note above)")
        batch_sampler = TokenBudgetBatches([pair_cost(c, r, share_prefix) for c, r in zip(
            train["chosen_input_ids"], train["rejected_input_ids"])], args.max_tokens_per_batch, data_seed)
        if is_main:
            print(f"Token-budget batches: {len(batch_sampler)} of up to {args.max_tokens_per_batch} tokens per epoch "
                  f"(mean {len(train) / len(batch_sampler):.1f} pairs; --per_device_train_batch_size is not used)")
    elif training_args.group_by_length:
        # The lengths as a list: a datasets Column is read one index at a time, each read rebuilding a table of every
        # record batch (quadratic: 12 s before the first step at 100K pairs, about 5 min per epoch at 700K).
        batch_sampler = LengthGroupedBatches(
            train.with_format("arrow")["length"].to_pylist(), training_args.train_batch_size,
            training_args.train_batch_size * training_args.gradient_accumulation_steps,
            training_args.dataloader_drop_last, data_seed)

    trainer = BradleyTerryTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        data_collator=PairwiseCollator(tokenizer, padding_free=padding_free, share_prefix=share_prefix),
        compute_metrics=compute_metrics,
        callbacks=[checkpoints.DropPickledArguments(), StopOnNonFiniteLoss()],
        center_rewards_coefficient=args.center_rewards_coefficient,
        odin=(args.odin_length_coefficient, args.odin_ortho_coefficient) if args.loss_type == "odin" else None,
        batch_sampler=batch_sampler,
    )
    if resume:
        trainer.token_counter.restore(resume, training_args.process_index)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.read_pending_stats()
    # The held-out pairs are scored once: their accuracy and loss, the pictures, and the reload check's reference.
    prediction = trainer.predict(held_out, metric_key_prefix="eval")
    trainer.log(prediction.metrics)
    eval_metrics, held_out_rewards = prediction.metrics, prediction.predictions.reshape(-1, 2)

    # Written and verified in a staging directory, then moved into place: a killed save never looks complete.
    staging = checkpoints.staging_dir(training_args.output_dir)
    checkpoint_dir = os.path.join(staging, "last_checkpoint")
    if args.loss_type == "odin":  # both heads beside it; last_checkpoint/ is the quality head alone
        two_heads = os.path.join(staging, checkpoints.TWO_HEADS_DIR)
        checkpoints.save_final_checkpoint(trainer, two_heads)
        if is_main:
            export_quality_head(two_heads, checkpoint_dir, tokenizer, dtype)
        trainer.accelerator.wait_for_everyone()
    else:  # with LoRA, the adapter goes beside it and last_checkpoint/ gets the base model with the adapter merged
        save_final_model(trainer, checkpoint_dir, lora_args.use_peft, lambda: load_reward_model(
            args.model_name, "--model_name", tokenizer, dtype, args.attn_implementation, args.trust_remote_code,
            new_weights=REWARD_HEAD_WEIGHTS, pickled_weights=args.load_pickled_weights), tokenizer)
    if is_main:
        checkpoints.record_reward_scale(checkpoint_dir, eval_metrics["eval_reward_mean"],
                                        eval_metrics["eval_reward_std"])
    n_check = min(args.reload_check_pairs, len(held_out))
    reload_diff = verify_checkpoint(trainer, checkpoint_dir, held_out.select(range(n_check)),
                                    held_out_rewards[:n_check], dtype)

    if is_main:
        metrics = {
            "eval_accuracy": eval_metrics["eval_accuracy"],
            "eval_loss": eval_metrics["eval_loss"],
            "eval_ties": eval_metrics["eval_ties"],
            **{key: eval_metrics[key] for key in ("eval_margin", "eval_reward_mean", "eval_reward_std")},
            "examples": data_stats,
            "reload_max_abs_diff": reload_diff,
            "train_tokens": {**trainer.train_tokens, "padding_free": padding_free, "prefix_sharing": share_prefix},
            "config": config,
            **({"lora": asdict(lora_args)} if lora_args.use_peft else {}),
        }
        metrics_path = run_metrics.write_run_metrics(staging, metrics, started, train_result, args, training_args,
                                                     precision, resumed_from=resume)
        plot_curves(trainer.state.log_history, os.path.join(staging, "curves.png"))
        plot_rewards(held_out_rewards[:, 0], held_out_rewards[:, 1], os.path.join(staging, "rewards.png"))
        write_model_card(checkpoint_dir, json.loads(Path(metrics_path).read_text()), base_model=args.model_name,
                         kind="bt", command=launch_command())
        ties = int(metrics["eval_ties"])  # counted wrong: said, since a collapsed model's accuracy is all ties
        print(f"Held-out pair accuracy {metrics['eval_accuracy']:.4f}, loss {metrics['eval_loss']:.4f} "
              f"on {len(held_out)} pairs{f' ({ties} tied, counted wrong)' if ties else ''}; wall time "
              f"{time.time() - started:.1f} s")
        final = checkpoints.publish_run(training_args.output_dir)
        print(f"Checkpoint: {final}\nMetrics: {os.path.join(training_args.output_dir, 'metrics.json')}")
        if training_args.push_final_checkpoint:
            print(f"Pushed to the Hub: {push_checkpoint(training_args, final)}")


def run_with_recipe(recipe: str) -> None:
    """Upstream's per-model scripts (gemma_2B_rm.py, llama3_8B_rm.py, mistral_7B_rm.py, ODIN's gemma_two_head.py):
    this script with that model's recipe in configs/ as the default (a recipe or --config on the command line still
    wins)."""
    run_cli(lambda: main(str(Path(DEFAULT_CONFIG).parent / recipe)))


if __name__ == "__main__":
    run_cli(main)
