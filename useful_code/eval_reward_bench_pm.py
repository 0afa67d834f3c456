"""Score a pairwise preference model (pair-pm) on RewardBench.

    python useful_code/eval_reward_bench_pm.py --reward_name_or_path DIR --record_dir FILE

Each example is scored in both orders (chosen as A, then as B) and the two P(chosen preferred) averaged, as
upstream does, but batched: both orders of many examples share length-sorted forward passes. For the shared
RewardBench arithmetic (useful_code/reward_bench.py), chosen_reward is that averaged probability and
rejected_reward is one minus it, so an example is correct when P(chosen preferred) > 0.5.
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import pm_utils, reward_bench, rm_utils  # noqa: E402


@dataclass
class ScriptArguments:
    """Upstream's flags plus batching, truncation, tie handling, prior sets and the results JSON."""

    data_set_name: Optional[str] = field(
        default="allenai/reward-bench",
        metadata={"help": f"Hub name or local file/directory (bundled sample: {rm_utils.REWARD_BENCH_SAMPLE})."},
    )
    record_dir: Optional[str] = field(default="./bench_mark_eval.txt", metadata={"help": "Text file appended to."})
    reward_name_or_path: Optional[str] = field(
        default="RLHFlow/pair-preference-model-LLaMA3-8B", metadata={"help": "PM: hub name or checkpoint directory."}
    )
    split: str = field(default="filtered", metadata={"help": "Dataset split (a single local file is its own split)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass (length-sorted)."})
    max_length: int = field(default=4096, metadata={"help": "Longer prompts are cut from the left (counted)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature on the A/B logits."})
    results_json: Optional[str] = field(default=None, metadata={"help": "Default: next to record_dir."})
    tie_credit: float = field(default=0.0, metadata={"help": "Credit for P = 0.5 exactly: 0 (reward-bench), 0.5 (upstream)."})
    prior_sets_path: Optional[str] = field(
        default=None, metadata={"help": "allenai/preference-test-sets-format data: adds Prior Sets and the leaderboard Score."}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})


def score_examples(scorer: pm_utils.PairPreferenceScorer, examples) -> tuple[list[float], list[float]]:
    """(chosen_reward, rejected_reward) per example: P(chosen preferred), both orders averaged, and 1 - it."""
    probs = scorer.prob_first_preferred([c[:-1] for c in examples["chosen"]],
                                        [c[-1]["content"] for c in examples["chosen"]],
                                        [r[-1]["content"] for r in examples["rejected"]], progress=True)["mean"]
    return probs.tolist(), (1.0 - probs).tolist()


def main():
    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    scorer = pm_utils.PairPreferenceScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, batch_size=args.batch_size, max_length=args.max_length,
        temperature=args.temperature)
    examples, stats = reward_bench.load_examples(args.data_set_name, args.split, "--data_set_name", args.skip_invalid)
    chosen, rejected = score_examples(scorer, examples)
    stats["truncated"] = scorer.truncated
    prior = None
    if args.prior_sets_path:
        prior_examples, stats["prior_sets"] = reward_bench.load_examples(args.prior_sets_path, None, "--prior_sets_path",
                                                                args.skip_invalid)
        prior = (prior_examples["id"], prior_examples["subset"], *score_examples(scorer, prior_examples))
    if scorer.truncated:
        print(f"{scorer.truncated} sequences longer than max_length={args.max_length} were cut from the left")

    results = reward_bench.score_examples(examples["id"], examples["subset"], chosen, rejected,
                                          tie_credit=args.tie_credit, prior=prior)
    results["options"] = asdict(args)
    results["data"] = stats
    results_json = args.results_json or reward_bench.default_results_json(args.record_dir, args.reward_name_or_path)
    reward_bench.write_results(results, args.reward_name_or_path, args.record_dir, results_json)
    print(reward_bench.format_report(results))
    print(f"Appended to {args.record_dir}; results JSON: {results_json}")


if __name__ == "__main__":
    rm_utils.run_cli(main)
