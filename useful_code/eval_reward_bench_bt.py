"""Score a Bradley-Terry (sequence classifier) reward model on RewardBench.

    python useful_code/eval_reward_bench_bt.py --reward_name_or_path DIR --record_dir FILE

Scoring follows allenai/reward-bench (useful_code/reward_bench.py): an example is correct only when chosen
scores strictly higher; sections are weighted by the official per-subset counts. Appends to record_dir as
upstream does and writes a results JSON (per-example rewards, per-subset accuracy, sections, score).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import reward_bench, rm_utils  # noqa: E402


@dataclass
class ScriptArguments(reward_bench.EvalArguments):
    """The shared RewardBench eval flags (reward_bench.EvalArguments), with a BT reward model by default."""

    reward_name_or_path: Optional[str] = field(
        default="sfairXC/FsfairX-LLaMA3-RM-v0.1", metadata={"help": "Reward model: hub name or checkpoint directory."}
    )


def load_examples(path: str, split: Optional[str], flag: str, args, tokenizer):
    """Load and validate RewardBench-format examples (reward_bench.load_examples), then tokenize them."""
    dataset, stats = reward_bench.load_examples(path, split, flag, args.skip_invalid)
    dataset, token_stats = rm_utils.tokenize_pairs(dataset, tokenizer, args.max_length, "truncate", flag.lstrip("-"))
    return dataset, {**stats, **token_stats}


def main():
    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    tokenizer = rm_utils.load_tokenizer(args.reward_name_or_path, "--reward_name_or_path", args.trust_remote_code)
    examples, stats = load_examples(args.data_set_name, args.split, "--data_set_name", args, tokenizer)
    prior = None
    if args.prior_sets_path:
        prior, stats["prior_sets"] = load_examples(args.prior_sets_path, None, "--prior_sets_path", args, tokenizer)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = rm_utils.load_reward_model(args.reward_name_or_path, "--reward_name_or_path", tokenizer,
                                       rm_utils.resolve_dtype(args.bf16), args.attn_implementation,
                                       args.trust_remote_code).to(device).eval()
    chosen, rejected = rm_utils.score_pairs(model, tokenizer, examples, args.batch_size)
    prior_scores = None
    if prior is not None:
        prior_scores = (prior["id"], prior["subset"], *rm_utils.score_pairs(model, tokenizer, prior, args.batch_size))

    results = reward_bench.score_examples(examples["id"], examples["subset"], chosen, rejected,
                                          tie_credit=args.tie_credit, prior=prior_scores)
    reward_bench.save_and_report(results, args, stats)


if __name__ == "__main__":
    rm_utils.run_cli(main)
