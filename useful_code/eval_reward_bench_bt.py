"""Score a Bradley-Terry (sequence classifier) reward model on RewardBench.

    python useful_code/eval_reward_bench_bt.py --reward_name_or_path DIR --record_dir FILE

Scoring follows allenai/reward-bench (useful_code/reward_bench.py): an example is correct only when chosen
scores strictly higher; sections are weighted by the official per-subset counts. Appends to record_dir as
upstream does and writes a results JSON (per-example rewards, per-subset accuracy, sections, score).
"""

from dataclasses import dataclass, field
from typing import Optional

from useful_code.cli import parse_args, run_cli
from useful_code.evaluation import EvalArguments, check_outputs, load_examples, save_and_report
from useful_code.modeling import load_for_scoring, load_reward_model
from useful_code.reward_bench import score_examples
from useful_code.scoring import score_pairs
from useful_code.templates import tokenize_pairs


@dataclass
class ScriptArguments(EvalArguments):
    """The shared RewardBench eval flags (EvalArguments), with a BT reward model by default."""

    reward_name_or_path: Optional[str] = field(
        default="sfairXC/FsfairX-LLaMA3-RM-v0.1", metadata={"help": "Reward model: hub name or checkpoint directory."}
    )


def load_tokenized_examples(path: str, split: Optional[str], flag: str, args, tokenizer):
    """Load and validate RewardBench-format examples, then tokenize them (cut from the left, counted)."""
    dataset, stats = load_examples(path, split, flag, args.skip_invalid)
    dataset, token_stats = tokenize_pairs(dataset, tokenizer, args.max_length, "truncate", flag.lstrip("-"),
                                          args.skip_invalid)
    return dataset, {**stats, **token_stats}


def main():
    args = parse_args((ScriptArguments,))[0]
    check_outputs(args)  # before any scoring, not after it
    model, tokenizer = load_for_scoring(load_reward_model, args.reward_name_or_path, "--reward_name_or_path",
                                        args.bf16, args.attn_implementation, args.trust_remote_code,
                                        pickled_weights=args.load_pickled_weights)
    examples, stats = load_tokenized_examples(args.data_set_name, args.split, "--data_set_name", args, tokenizer)
    prior = None
    if args.prior_sets_path:
        prior, stats["prior_sets"] = load_tokenized_examples(args.prior_sets_path, None, "--prior_sets_path", args,
                                                             tokenizer)

    chosen, rejected = score_pairs(model, tokenizer, examples, args.batch_size)
    prior_scores = None
    if prior is not None:
        prior_scores = (prior["id"], prior["subset"], *score_pairs(model, tokenizer, prior, args.batch_size))

    results = score_examples(examples["id"], examples["subset"], chosen, rejected, tie_credit=args.tie_credit,
                             prior=prior_scores)
    save_and_report(results, args, stats)


if __name__ == "__main__":
    run_cli(main)
