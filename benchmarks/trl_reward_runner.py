"""TRL's RewardTrainer on pre-tokenized pairs: bench_bt_training.py's baseline contestant, run as its own process.

    python benchmarks/trl_reward_runner.py --model_name DIR --train_set_path TRAIN.jsonl \\
        --eval_set_path HELD_OUT.jsonl --output_dir DIR [any RewardConfig flag]

The jsonl files hold chosen_ids / rejected_ids (and length) rows: the token ids this project's tokenize_pairs made,
so TRL trains on exactly what the BT trainer does. Writes <output_dir>/metrics.json with the keys the BT trainer's
metrics.json has for the same things (train_runtime_s, train_steps, train_loss, eval_accuracy, eval_loss,
train_tokens).
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from transformers import AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import RewardConfig, RewardTrainer

from useful_code.cli import parse_args, run_cli
from useful_code.hardware import peak_gpu_memory_mib


@dataclass
class RunnerArguments:
    model_name: str = field(metadata={"help": "A saved sequence classifier (num_labels=1) with its tokenizer."})
    train_set_path: str = field(metadata={"help": "jsonl of chosen_ids / rejected_ids / length rows."})
    eval_set_path: str = field(metadata={"help": "Held-out pairs, same format; scored once after training."})
    attn_implementation: str = field(default="sdpa")


class CountingRewardTrainer(RewardTrainer):
    """RewardTrainer that also counts, over the training batches its collator formed, the tokens of the sequences
    (attention mask) and the tokens computed (the padded [2 * pairs, width] tensor)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_tokens, self.computed_tokens = [], 0  # the real counts stay on the device until the run ends

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # no read from the device here: on a GPU it would wait for the step, which TRL does not
            self.real_tokens.append(inputs["attention_mask"].sum())
            self.computed_tokens += inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @property
    def train_tokens(self) -> dict:
        real = int(torch.stack(self.real_tokens).sum()) if self.real_tokens else 0
        return {"real": real, "computed": self.computed_tokens, "padding": self.computed_tokens - real}

    def _get_train_sampler(self, train_dataset=None):
        # transformers' length grouping drawn from the seed, not the global RNG: the first epoch of the BT trainer's
        # LengthGroupedBatches, so that both train on the same batches (useful_code/batch_samplers.py).
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
            sampler.generator = torch.Generator().manual_seed(seed)
        return sampler


def held_out_scores(trainer, dataset, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean BT loss) on the held-out pairs in file order, batched by TRL's own collator; a tie counts as
    wrong, as in the BT trainer's compute_metrics."""
    model = trainer.model.eval()
    gaps = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = trainer.data_collator([{"chosen_ids": c, "rejected_ids": r}
                                           for c, r in zip(rows["chosen_ids"], rows["rejected_ids"])])
            rewards = model(input_ids=batch["input_ids"].to(model.device),
                            attention_mask=batch["attention_mask"].to(model.device), use_cache=False).logits
            chosen, rejected = torch.chunk(rewards.squeeze(-1).float(), 2)
            gaps.append(chosen - rejected)
    gap = torch.cat(gaps)
    return float((gap > 0).float().mean()), float(-F.logsigmoid(gap).mean())


def main():
    args, config, _ = parse_args((RunnerArguments, RewardConfig))
    # Only the ids and the sampler's length column: with remove_unused_columns (TRL's default) the length column
    # would be dropped before the length-grouped sampler reads it, and that sampler would look for input_ids.
    config.remove_unused_columns = False
    # fp32 weights, as the BT trainer loads them without DeepSpeed: with --bf16 both run mixed precision (the
    # Trainer's bf16 autocast over fp32 weights), so the contestants compute alike.
    config.model_init_kwargs = {"dtype": "float32", "attn_implementation": args.attn_implementation}
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    train = load_dataset("json", data_files=args.train_set_path, split="train")
    held_out = load_dataset("json", data_files=args.eval_set_path, split="train")
    trainer = CountingRewardTrainer(model=args.model_name, args=config, train_dataset=train,
                                    processing_class=tokenizer)
    print(f"TRL RewardTrainer: {len(train)} train pairs (after its max_length={config.max_length} filter), "
          f"{len(held_out)} held-out, pad token {tokenizer.pad_token!r}, "
          f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M parameters")
    result = trainer.train()
    accuracy, loss = held_out_scores(trainer, held_out, config.per_device_eval_batch_size)
    metrics = {
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_runtime_s": result.metrics["train_runtime"],
        "peak_gpu_memory_mib": peak_gpu_memory_mib(),
        "eval_accuracy": accuracy,
        "eval_loss": loss,
        "examples": {"train": {"used": len(train)}, "eval": {"used": len(held_out)}},
        "train_tokens": {**trainer.train_tokens, "padding_free": False, "prefix_sharing": False},
        "log_history": trainer.state.log_history,
    }
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
    print(f"Held-out pair accuracy {accuracy:.4f}, loss {loss:.4f}; train loss {result.training_loss:.4f}, "
          f"train runtime {result.metrics['train_runtime']:.1f} s")


if __name__ == "__main__":
    run_cli(main)
