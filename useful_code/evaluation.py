"""What the RewardBench eval scripts share around the arithmetic of reward_bench.py: their flags, loading the
examples, and writing the record file and results JSON."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from datasets import concatenate_datasets

from useful_code.checkpoints import check_output_file
from useful_code.cli import UserError
from useful_code.data import load_dataset_dict, pick_split
from useful_code.formats import standardize_pairs
from useful_code.reward_bench import SECTIONS, format_report


@dataclass
class EvalArguments:
    """Flags shared by the RewardBench eval scripts: upstream's (data_set_name, record_dir, reward_name_or_path)
    plus batching, truncation, tie handling, prior sets and the results JSON. Each script subclasses it."""

    data_set_name: Optional[str] = field(
        default="allenai/reward-bench",
        metadata={"help": "Hub name or local file/directory (bundled sample: assets/data/reward_bench_sample.jsonl)."},
    )
    record_dir: Optional[str] = field(default="./bench_mark_eval.txt", metadata={"help": "Text file appended to."})
    reward_name_or_path: Optional[str] = field(default=None, metadata={"help": "Hub name or checkpoint directory."})
    split: str = field(default="filtered", metadata={"help": "Dataset split (a single local file is its own split)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Sequences per forward pass (length-sorted)."})
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Longer inputs are cut from the left (counted)."})
    results_json: Optional[str] = field(default=None, metadata={"help": "Default: next to record_dir."})
    tie_credit: float = field(default=0.0,
                              metadata={"min": 0, "max": 1,
                                        "help": "Credit for a tie: 0 (reward-bench), 0.5 (upstream RLHFlow)."})
    prior_sets_path: Optional[str] = field(
        default=None, metadata={"help": "allenai/preference-test-sets-format data: adds Prior Sets and the leaderboard Score."}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})


def load_examples(path: str, split: Optional[str], flag: str, skip_invalid: bool):
    """Load and validate prompt/chosen/rejected examples with their id and subset, from one split, or from every
    split when split is None (preference-test-sets keeps one set per split: the split name becomes the subset).
    Returns (standard-format dataset with 'id' and 'subset', stats)."""
    is_local = Path(path).expanduser().exists()
    splits = load_dataset_dict(path, flag, split=None if is_local else split, skip_invalid=skip_invalid)
    if split is not None:
        dataset = pick_split(splits, split, flag)
    else:
        dataset = concatenate_datasets([
            ds if "subset" in ds.column_names else ds.add_column("subset", [name] * len(ds))
            for name, ds in splits.items()
        ])
    if "subset" not in dataset.column_names:
        raise UserError(f"{flag}: '{path}' has no 'subset' column")
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", list(range(len(dataset))))
    return standardize_pairs(dataset, skip_invalid, flag.lstrip("-"))


def check_outputs(args) -> None:
    """Before any scoring: the record file and the results JSON must be writable files (creatable, not directories,
    not the evaluated data)."""
    for flag, path in (("--record_dir", args.record_dir), ("--results_json", results_json_path(args))):
        check_output_file(path, flag, inputs=(args.data_set_name, args.prior_sets_path))


def results_json_path(args) -> str:
    """--results_json, else next to --record_dir."""
    return args.results_json or default_results_json(args.record_dir, args.reward_name_or_path)


def write_results(results: dict, model_name: str, record_dir: str, results_json: str) -> None:
    """Append the RLHFlow-style record block to ``record_dir`` and dump ``results_json``."""
    for path in (record_dir, results_json):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
    with open(record_dir, "a") as f:
        f.write(model_name + "\n")
        for section in SECTIONS:
            f.write(f"{section}\t{_recorded(results['sections'][section])}\n")
        if "prior_sets" in results:
            f.write(f"Prior Sets\t{_recorded(results['prior_sets']['score'])}\n")
        f.write(f"Score\t{_recorded(results['score'])}\n")
        if len(results["score_sections"]) < len(SECTIONS):
            f.write(f"Score averages\t{', '.join(results['score_sections'])}\n")
    with open(results_json, "w") as f:
        json.dump({**results, "model": model_name}, f, indent=2, allow_nan=False)  # strict JSON: no bare NaN


def _recorded(value) -> str:
    return "absent" if value is None else str(value)


def save_and_report(results: dict, args, data_stats: dict) -> None:
    """An eval script's ending: record its options and data counts, append to record_dir, write the results
    JSON (args.results_json, else next to record_dir) and print the report."""
    results["options"] = asdict(args)
    results["data"] = data_stats
    results_json = results_json_path(args)
    write_results(results, args.reward_name_or_path, args.record_dir, results_json)
    print(format_report(results))
    print(f"Appended to {args.record_dir}; results JSON: {results_json}")


def default_results_json(record_dir: str, model_name: str) -> str:
    """Path ``<dir of record_dir>/<record_dir stem>_<model slug>.json``."""
    directory = os.path.dirname(record_dir)
    stem = os.path.splitext(os.path.basename(record_dir))[0]
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model_name).strip("_.")
    return os.path.join(directory, f"{stem}_{slug}.json")
