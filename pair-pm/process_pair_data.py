"""Turn standard-format preference pairs into pairwise-preference-model (PM) training data.

    python pair-pm/process_pair_data.py --dataset_path RLHFlow/HH-RLHF-Helpful-standard RLHFlow/SHP-standard \\
        --output_path data/pm_mix            # a `datasets` directory; or data/pm_mix.jsonl / .parquet

Each pair becomes upstream's layout: one user message "[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \\n"
(context in upstream's plain "<turn> user / <turn> assistant" template) and an assistant message "A" or "B".
Where chosen goes is drawn with --seed, balanced to within one per input dataset. The inputs are mixed and
shuffled (upstream's seed 42). Invalid rows stop the run with the row and the rule, or with --skip_invalid are
dropped and counted per reason.
"""

from dataclasses import dataclass, field
from typing import Optional

from datasets import DatasetDict, concatenate_datasets

from useful_code.output_files import save_dataset
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_PREFERENCE_DATA
from useful_code.formats import count_summary, standardize_pairs
from useful_code.pm_data import check_dataset_output, pairs_to_pm


@dataclass
class ScriptArguments:
    """Inputs, output and the seeds; input datasets may be in any format useful_code.data reads."""

    dataset_path: list[str] = field(
        default_factory=lambda: [DEFAULT_PREFERENCE_DATA],
        metadata={"help": "One or more hub names, dataset directories or .json/.jsonl/.parquet files."},
    )
    output_path: str = field(
        default="./data/pm_data",
        metadata={"help": "A .json/.jsonl/.parquet file, or a directory for datasets.save_to_disk."},
    )
    split: str = field(default="train", metadata={"help": "Split read from each input."})
    seed: int = field(default=42, metadata={"help": "Seed for where chosen goes and for the shuffle."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Also push the result to this hub repo id."})


def main():
    args = parse_args((ScriptArguments,))[0]
    check_dataset_output(args.output_path, "--output_path", tuple(args.dataset_path))
    parts = []
    for k, path in enumerate(args.dataset_path):
        pairs = load_split(path, args.split, "--dataset_path", args.skip_invalid)
        pairs, stats = standardize_pairs(pairs, args.skip_invalid, path)
        if len(pairs) == 0:  # every row dropped (--skip_invalid): nothing to convert
            print(f"{path}: {stats['read']} read, all invalid ({count_summary(stats['invalid'])})")
            continue
        converted = pairs_to_pm(pairs, args.seed + k)
        n_a = sum(m[1]["content"] == "A" for m in converted["messages"])
        print(f"{path}: {stats['read']} read, {sum(stats['invalid'].values())} invalid, {len(converted)} converted "
              f"(chosen as A: {n_a}, as B: {len(converted) - n_a})")
        parts.append(converted)
    if not parts:
        raise UserError("no valid pairs to write")
    combined = concatenate_datasets(parts).shuffle(seed=args.seed).flatten_indices()
    save_dataset(combined, args.output_path, "--output_path")
    print(f"Wrote {len(combined)} PM examples to {args.output_path}")
    if args.push_to_hub:
        DatasetDict({"train": combined}).push_to_hub(args.push_to_hub)
        print(f"Pushed to the hub: {args.push_to_hub}")


if __name__ == "__main__":
    run_cli(main)
