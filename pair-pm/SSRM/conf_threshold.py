"""Semi-supervised reward modeling (SSRM, arXiv 2409.06903), step 2: keep the pseudo-labels the PM is confident of.

    python pair-pm/SSRM/conf_threshold.py [--data_name NAME] [--conf_threshold 0.8] [--output_path FILE.jsonl]

Reads what pair-pm/SSRM/pseudo_label.py writes (default: its default output for the same --data_name,
outputs/ssrm/<data_name>-pred-probs.jsonl, or all its shard files after a run with --n_shards, as upstream's script
gathers every shard of its folder): standard-format pairs with "chosen_prob", P(chosen preferred). A pair is
kept when its confidence max(p, 1 - p) > --conf_threshold (strictly, as upstream), with chosen the response the PM prefers (p < 0.5, as in
a file of unoriented pairs, swaps them). Writes standard-format pairs (default outputs/ssrm/<data_name>-selected.jsonl)
with their "chosen_prob", ready for bradley-terry-rm/train.py or pair-pm/process_pair_data.py (step 3: train on them
with the labelled data). Invalid rows stop the run with the row and the rule, or with --skip_invalid are dropped and
counted.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import Dataset, DatasetDict
from pseudo_label import PROB_COLUMN, SWAPPED_COLUMN, pred_probs_inputs

from useful_code.output_files import atomic_write_text, check_output_file
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data import load_split
from useful_code.formats import enforce_validity, standardize_pairs

PROB_RULES = {"bad_prob": f"{PROB_COLUMN} must be a number between 0 and 1"}


def selected_path(data_name: str) -> str:
    """This script's default output for a data name."""
    return str(Path("outputs", "ssrm", f"{data_name}-selected.jsonl"))


@dataclass
class ScriptArguments:
    """The pseudo-labelled pairs, the confidence threshold and where the kept pairs go."""

    data_name: str = field(default="ssrm", metadata={
        "help": "Names the default input (pseudo_label.py's default output for the same --data_name) and output."})
    input_path: Optional[str] = field(default=None, metadata={
        "help": "Pseudo-labelled pairs. Default: outputs/ssrm/<data_name>-pred-probs.jsonl, or all of "
                "outputs/ssrm/<data_name>-pred-probs-shard-<i>-of-<n>.jsonl"})
    output_path: Optional[str] = field(default=None, metadata={
        "help": "The kept pairs (.jsonl). Default: outputs/ssrm/<data_name>-selected.jsonl"})
    conf_threshold: float = field(default=0.8, metadata={
        "min": 0.5, "max": 1.0, "help": "Keep a pair when max(p, 1 - p) > this (upstream: 0.8)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Also push the kept pairs to this hub repo id."})


def resolve_paths(args) -> tuple[list[str], str]:
    """(inputs, output), the output checked before any work: a writable .jsonl file, none of the inputs."""
    sources = [args.input_path] if args.input_path else pred_probs_inputs(args.data_name)
    target = args.output_path or selected_path(args.data_name)
    if Path(target).suffix != ".jsonl":
        raise UserError(f"--output_path: {target} must be a .jsonl file")
    check_output_file(target, "--output_path", inputs=tuple(sources))
    return sources, target


def load_pseudo_labels(sources: list[str], skip_invalid: bool):
    """The pseudo-labelled pairs of every source (shards in order), validated as pairs and as probabilities, with the
    number of rows read. Errors name the file when there are several (rows count within it)."""
    parts, read = [], 0
    for source in sources:
        name = "pseudo labels" if len(sources) == 1 else f"pseudo labels {source}"
        raw = load_split(source, "train", "--input_path", skip_invalid)
        if PROB_COLUMN not in raw.column_names:
            raise UserError(f"--input_path: {source} has no '{PROB_COLUMN}' column (found: "
                            f"{', '.join(raw.column_names)}); it is written by pair-pm/SSRM/pseudo_label.py")
        pairs, _ = standardize_pairs(raw, skip_invalid, name)

        def reason(p) -> dict:
            number = isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p)
            return {"invalid_reason": "" if number and 0.0 <= p <= 1.0 else "bad_prob"}

        marked = pairs.map(reason, input_columns=PROB_COLUMN, desc="checking probabilities")
        parts.append(enforce_validity(marked, PROB_RULES, skip_invalid, name)[0])
        read += len(raw)
    if len(parts) == 1:
        return parts[0], read
    # Rebuilt from rows rather than concatenate_datasets: a column all null in one shard has another Arrow type there.
    return Dataset.from_list([row for part in parts for row in part.to_list()]), read


def select(rows: list[dict], threshold: float) -> tuple[list[dict], int]:
    """The rows with confidence max(p, 1 - p) > threshold (upstream's strict rule), each with chosen the preferred response and p its
    probability; and how many of them had to be swapped."""
    kept, swapped = [], 0
    for row in rows:
        p = row[PROB_COLUMN]
        confidence = max(p, 1.0 - p)
        if confidence <= threshold:
            continue
        row = {k: v for k, v in row.items() if k != SWAPPED_COLUMN}  # relative to the unlabelled input only
        if p < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            swapped += 1
        kept.append({**row, PROB_COLUMN: confidence})
    return kept, swapped


def main(argv: Optional[list[str]] = None):
    args = parse_args((ScriptArguments,), argv=argv)[0]
    sources, target = resolve_paths(args)
    pairs, read = load_pseudo_labels(sources, args.skip_invalid)
    source = sources[0] if len(sources) == 1 else f"{len(sources)} shards ({sources[0]} ...)"

    kept, swapped = select(pairs.to_list(), args.conf_threshold)
    atomic_write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))

    share = f"{100 * len(kept) / len(pairs):.2f}%" if len(pairs) else "-"
    print(f"Confidence threshold: {args.conf_threshold} (kept when max(p, 1 - p) > it)\n"
          f"  {source}: {read} read, {read - len(pairs)} invalid dropped; kept {len(kept)} ({share} of "
          f"{len(pairs)}), dropped {len(pairs) - len(kept)} not above the threshold; chosen/rejected swapped to the PM's "
          f"preference: {swapped}\n"
          f"Wrote {len(kept)} standard-format pairs to {target}")
    if args.push_to_hub and kept:
        DatasetDict({"train": Dataset.from_list(kept)}).push_to_hub(args.push_to_hub)
        print(f"Pushed to the hub: {args.push_to_hub}")


if __name__ == "__main__":
    run_cli(main)
