"""Score a pairwise preference model (pair-pm) on RewardBench 1 or 2.

    python useful_code/eval_reward_bench_pm.py --reward_name_or_path DIR --record_dir FILE [--benchmark 2]
    torchrun --nproc_per_node N useful_code/eval_reward_bench_pm.py ...   # data-parallel: one slice per rank

Each comparison is made in both orders (first response as A, then as B) and the two probabilities averaged, as
upstream does, but batched: both orders of many comparisons share length-sorted forward passes. v1: P(chosen
preferred) is the chosen reward and one minus it the rejected one, so an example is correct when P > 0.5. v2: a PM
only compares, so every pair of a prompt's completions is compared and a completion's score is its mean
probability of being preferred over the others (its expected win rate); the v2 arithmetic then applies unchanged.
"""

from dataclasses import dataclass, field
from typing import Optional

from useful_code.cli import parse_args, run_cli
from useful_code.data_parallel import finish, main_process_first, process_state
from useful_code.evaluation import (
    EvalArguments,
    check_eval_arguments,
    load_benchmark,
    load_examples,
    prepare_examples,
    prepare_examples_v2,
    save_and_report,
)
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.reward_bench import score_examples, score_examples_v2
from useful_code.templates import reject_special_tokens, special_token_pattern


@dataclass
class ScriptArguments(EvalArguments):
    """The shared RewardBench eval flags (EvalArguments) plus the softmax temperature."""

    reward_name_or_path: Optional[str] = field(
        default="RLHFlow/pair-preference-model-LLaMA3-8B", metadata={"help": "PM: hub name or checkpoint directory."}
    )
    # above 0: 0 divides by zero and a negative one turns every preference around, and both would print a score
    temperature: float = field(default=1.0, metadata={"above": 0, "help": "Softmax temperature on the A/B logits."})


def checked_pairs(examples, flag: str, args, tokenizer):
    """Validated v1 examples; text holding a special token is an error (or a counted drop)."""
    dataset, stats = examples
    dataset, stats["special_token_in_content"] = reject_special_tokens(dataset, tokenizer, ("chosen", "rejected"),
                                                                       args.skip_invalid, flag.lstrip("-"))
    return dataset, stats


def pair_rewards(scorer: PairPreferenceScorer, examples) -> tuple[list[float], list[float]]:
    """(chosen_reward, rejected_reward) per example: P(chosen preferred), both orders averaged, and 1 - it."""
    probs = scorer.score_pairs(examples, progress=scorer.state is None or scorer.state.is_main_process)["mean"]
    return probs.tolist(), (1.0 - probs).tolist()


def main():
    args = parse_args((ScriptArguments,))[0]
    state = process_state()
    check_eval_arguments(args, state)  # output paths and flag combinations, before any scoring
    scorer = PairPreferenceScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, pickled_weights=args.load_pickled_weights, device=state.device,
        device_map=args.device_map, batch_size=args.batch_size, max_length=args.max_length,
        temperature=args.temperature, state=state, max_tokens_per_batch=args.max_tokens_per_batch)
    with main_process_first(state):  # one rank fills the datasets cache, the others then read it
        benchmark, raw = load_benchmark(args)
        if benchmark == 2:
            examples, stats = prepare_examples_v2(raw, "--data_set_name", args.skip_invalid,
                                                  special_token_pattern(scorer.tokenizer))
        else:
            examples, stats = checked_pairs(prepare_examples(raw, args.data_set_name, "--data_set_name",
                                                             args.skip_invalid), "--data_set_name", args,
                                            scorer.tokenizer)
            prior_examples = None
            if args.prior_sets_path:
                prior_examples, stats["prior_sets"] = checked_pairs(
                    load_examples(args.prior_sets_path, None, "--prior_sets_path", args.skip_invalid),
                    "--prior_sets_path", args, scorer.tokenizer)

    if benchmark == 2:
        scores = scorer.response_scores(examples["context"], examples["responses"], progress=state.is_main_process)
        results = score_examples_v2(examples["id"], examples["subset"], scores, examples["num_correct"])
    else:
        chosen, rejected = pair_rewards(scorer, examples)
        prior = None
        if prior_examples is not None:
            prior = (prior_examples["id"], prior_examples["subset"], *pair_rewards(scorer, prior_examples))
        results = score_examples(examples["id"], examples["subset"], chosen, rejected, tie_credit=args.tie_credit,
                                 prior=prior)
    stats["truncated"] = scorer.truncated
    if scorer.truncated and state.is_main_process:
        print(f"{scorer.truncated} sequences longer than max_length={args.max_length} were cut from the left")
    if state.is_main_process:
        save_and_report(results, args, {**stats, "processes": state.num_processes}, scorer.model.dtype)
    finish(state)


if __name__ == "__main__":
    run_cli(main)
