"""Score a Bradley-Terry (sequence classifier) reward model on RewardBench.

    python useful_code/eval_reward_bench_bt.py --reward_name_or_path DIR --record_dir FILE

Scoring follows allenai/reward-bench (useful_code/reward_bench.py): an example is correct only when chosen
scores strictly higher; sections are weighted by the official per-subset counts. Appends to record_dir as
upstream does and writes a results JSON (per-example rewards, per-subset accuracy, sections, score).
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import reward_bench, rm_utils  # noqa: E402


@dataclass
class ScriptArguments:
    """Upstream's flags plus batching, truncation, tie handling, prior sets and the results JSON."""

    data_set_name: Optional[str] = field(
        default="allenai/reward-bench",
        metadata={"help": f"Hub name or local file/directory (bundled sample: {rm_utils.REWARD_BENCH_SAMPLE})."},
    )
    record_dir: Optional[str] = field(default="./bench_mark_eval.txt", metadata={"help": "Text file appended to."})
    reward_name_or_path: Optional[str] = field(
        default="sfairXC/FsfairX-LLaMA3-RM-v0.1", metadata={"help": "Reward model: hub name or checkpoint directory."}
    )
    split: str = field(default="filtered", metadata={"help": "Dataset split (a single local file is its own split)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass (length-sorted)."})
    max_length: int = field(default=4096, metadata={"help": "Longer conversations are truncated from the left."})
    results_json: Optional[str] = field(default=None, metadata={"help": "Default: next to record_dir."})
    tie_credit: float = field(default=0.0, metadata={"help": "Credit for a tie: 0 (reward-bench), 0.5 (upstream RLHFlow)."})
    prior_sets_path: Optional[str] = field(
        default=None, metadata={"help": "allenai/preference-test-sets-format data: adds Prior Sets and the leaderboard Score."}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})


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
    results["options"] = asdict(args)
    results["data"] = stats
    results_json = args.results_json or reward_bench.default_results_json(args.record_dir, args.reward_name_or_path)
    reward_bench.write_results(results, args.reward_name_or_path, args.record_dir, results_json)
    print(reward_bench.format_report(results))
    print(f"Appended to {args.record_dir}; results JSON: {results_json}")


if __name__ == "__main__":
    rm_utils.run_cli(main)
