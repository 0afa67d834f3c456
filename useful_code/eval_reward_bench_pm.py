"""Score a pairwise preference model (pair-pm) on RewardBench.

    python useful_code/eval_reward_bench_pm.py --reward_name_or_path DIR --record_dir FILE

Each example is scored in both orders (chosen as A, then as B) and the two P(chosen preferred) averaged, as
upstream does, but batched: both orders of many examples share length-sorted forward passes. For the shared
RewardBench arithmetic (useful_code/reward_bench.py), chosen_reward is that averaged probability and
rejected_reward is one minus it, so an example is correct when P(chosen preferred) > 0.5.
"""

from dataclasses import dataclass, field
from typing import Optional

from useful_code.cli import parse_args, run_cli
from useful_code.evaluation import EvalArguments, check_outputs, load_examples, save_and_report
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.reward_bench import score_examples
from useful_code.templates import reject_special_tokens


@dataclass
class ScriptArguments(EvalArguments):
    """The shared RewardBench eval flags (EvalArguments) plus the softmax temperature."""

    reward_name_or_path: Optional[str] = field(
        default="RLHFlow/pair-preference-model-LLaMA3-8B", metadata={"help": "PM: hub name or checkpoint directory."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature on the A/B logits."})


def load_checked_examples(path: str, split, flag: str, args, tokenizer):
    """Load and validate RewardBench-format examples; text holding a special token is an error (or a counted drop)."""
    dataset, stats = load_examples(path, split, flag, args.skip_invalid)
    dataset, stats["special_token_in_content"] = reject_special_tokens(dataset, tokenizer, ("chosen", "rejected"),
                                                                       args.skip_invalid, flag.lstrip("-"))
    return dataset, stats


def pair_rewards(scorer: PairPreferenceScorer, examples) -> tuple[list[float], list[float]]:
    """(chosen_reward, rejected_reward) per example: P(chosen preferred), both orders averaged, and 1 - it."""
    probs = scorer.score_pairs(examples)["mean"]
    return probs.tolist(), (1.0 - probs).tolist()


def main():
    args = parse_args((ScriptArguments,))[0]
    check_outputs(args)  # before any scoring, not after it
    scorer = PairPreferenceScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, pickled_weights=args.load_pickled_weights,
        batch_size=args.batch_size, max_length=args.max_length, temperature=args.temperature)
    examples, stats = load_checked_examples(args.data_set_name, args.split, "--data_set_name", args, scorer.tokenizer)
    chosen, rejected = pair_rewards(scorer, examples)
    stats["truncated"] = scorer.truncated
    prior = None
    if args.prior_sets_path:
        prior_examples, stats["prior_sets"] = load_checked_examples(args.prior_sets_path, None, "--prior_sets_path",
                                                                    args, scorer.tokenizer)
        prior = (prior_examples["id"], prior_examples["subset"], *pair_rewards(scorer, prior_examples))
    if scorer.truncated:
        print(f"{scorer.truncated} sequences longer than max_length={args.max_length} were cut from the left")

    results = score_examples(examples["id"], examples["subset"], chosen, rejected, tie_credit=args.tie_credit,
                             prior=prior)
    save_and_report(results, args, stats)


if __name__ == "__main__":
    run_cli(main)
