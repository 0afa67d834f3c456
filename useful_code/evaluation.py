"""What the RewardBench eval scripts share around the arithmetic of reward_bench.py: their flags, which benchmark
(v1 or v2) and data, loading and validating the examples, and writing the record file and results JSON."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from datasets import concatenate_datasets

from useful_code.output_files import atomic_write_text, check_output_file
from useful_code.cli import UserError
from useful_code.data import load_dataset_dict, pick_split
from useful_code.formats import clean_messages, enforce_validity, map_rows, standardize_pairs
from useful_code.reward_bench import (
    SECTIONS,
    TIES_SUBSET,
    V2_SUBSETS,
    format_report,
    format_report_v2,
    ties_prompt_key,
    unique_ids,
    v2_subset_name,
)
from useful_code.scoring import token_budget_field

# Each benchmark's default data and split (the hub names reward-bench's own scripts use).
BENCHMARK_DATA = {1: ("allenai/reward-bench", "filtered"), 2: ("allenai/reward-bench-2", "test")}
V2_COLUMNS = ("prompt", "chosen", "rejected", "subset")

# Rules of a RewardBench 2 row (one prompt, its correct completions in 'chosen', the incorrect ones in 'rejected').
SUBSET_RULES = {"bad_subset": "subset must be a non-empty string (the name results are grouped and weighted by)"}
V2_RULES = {
    **SUBSET_RULES,
    "bad_prompt": "prompt must be a non-empty string or a list of {role, content} messages",
    "not_a_completion_list": "chosen and rejected must be non-empty lists of non-empty strings",
    "counts_mismatch": "num_correct, num_incorrect and total_completions must equal the lengths of chosen, rejected "
                       "and both",
    "bad_ties_id": "a Ties id must be 'ref:<n>' or 'tied:<n>' with n an integer, and a tied prompt needs at least "
                   "two correct completions",
    "special_token_in_content": "text must not contain the tokenizer's special tokens (they would forge turns)",
}


@dataclass
class EvalArguments:
    """Flags shared by the RewardBench eval scripts: upstream's (data_set_name, record_dir, reward_name_or_path)
    plus batching, truncation, tie handling, prior sets and the results JSON. Each script subclasses it."""

    benchmark: Optional[int] = field(default=None, metadata={
        "choices": [1, 2], "help": "1 (RewardBench) or 2 (RewardBench 2). Default: 2 when --data_set_name has "
                                   "RewardBench 2's columns (chosen and rejected as lists of responses), else 1."})
    data_set_name: Optional[str] = field(default=None, metadata={
        "help": "Hub name or local file/directory. Default: allenai/reward-bench (v1) or allenai/reward-bench-2 "
                "(v2). Bundled samples: assets/data/reward_bench_sample.jsonl, reward_bench_2_sample.jsonl."})
    record_dir: Optional[str] = field(default="./bench_mark_eval.txt", metadata={"help": "Text file appended to."})
    reward_name_or_path: Optional[str] = field(default=None, metadata={"help": "Hub name or checkpoint directory."})
    split: Optional[str] = field(default=None, metadata={
        "help": "Dataset split; one the data lacks is an error. Default: filtered (v1), test (v2), else the data's "
                "only split (a single local file's is 'train'). The results JSON records the split read."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Sequences per padded forward (length-sorted)."})
    max_tokens_per_batch: int = token_budget_field()
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
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})
    device_map: Optional[str] = field(default=None, metadata={
        "help": "'auto': spread a model too large for one GPU over all of them (one process; not with torchrun)."})


def load_benchmark(args):
    """Resolve --benchmark, --data_set_name and --split (filling in their defaults) and load that split. Returns
    (benchmark, raw dataset)."""
    if args.benchmark is None and args.data_set_name is None:
        args.benchmark = 1
    if args.data_set_name is None:
        args.data_set_name = BENCHMARK_DATA[args.benchmark][0]
    defaults = [BENCHMARK_DATA[b][1] for b in ((args.benchmark,) if args.benchmark else (1, 2))]
    is_local = Path(args.data_set_name).expanduser().exists()
    hub_split = args.split or (defaults[0] if args.benchmark else None)
    splits = load_dataset_dict(args.data_set_name, "--data_set_name", split=None if is_local else hub_split,
                               skip_invalid=args.skip_invalid)
    # From here on args.split is the split actually read (the results JSON records it).
    args.split = resolve_split(splits, args.split, defaults, args.data_set_name)
    dataset = splits[args.split]
    detected = 2 if has_v2_columns(dataset) else 1
    if args.benchmark is None:
        args.benchmark = detected
        if detected == 2:
            print(f"{args.data_set_name}: RewardBench 2 columns, scored as RewardBench 2")
    elif args.benchmark != detected:
        raise UserError(f"--data_set_name: {args.data_set_name} has RewardBench {detected}'s columns, not those of "
                        f"--benchmark {args.benchmark}")
    if args.benchmark == 2 and args.prior_sets_path:
        raise UserError("--prior_sets_path belongs to RewardBench 1's leaderboard score; RewardBench 2 has none")
    if args.benchmark == 2 and args.tie_credit:
        raise UserError("--tie_credit applies to RewardBench 1; RewardBench 2 credits a tie at the maximum 1/k")
    return args.benchmark, dataset


def resolve_split(splits, asked: Optional[str], defaults, data_set_name: str) -> str:
    """The split of `splits` (a DatasetDict) to evaluate: --split when the data has it. A --split other than the
    benchmark's default that the data lacks is an error; the default (asked for or not) falls back to the data's only
    split (a single local file is its own split, 'train'), said once unless the data is a single file."""
    if asked is not None and asked in splits:
        return asked
    available = ", ".join(splits)
    if asked is not None and asked not in defaults:
        raise UserError(f"--split: {data_set_name} has no split '{asked}' (its splits: {available})")
    if asked is None:
        found = next((d for d in defaults if d in splits), None)
        if found is not None:
            return found
    default = f"'{asked}'" if asked else " or ".join(f"'{d}'" for d in defaults)
    if len(splits) == 1:
        only = next(iter(splits))
        if not Path(data_set_name).expanduser().is_file():
            print(f"--split: {data_set_name} has no split {default} (the default); reading its only split, '{only}'")
        return only
    raise UserError(f"--split: {data_set_name} has no split {default} (the default) and several others "
                    f"({available}): name one with --split")


def has_v2_columns(dataset) -> bool:
    """RewardBench 2 rows count their correct completions and hold lists of responses in chosen (v1: one response,
    or a message list)."""
    if "num_correct" in dataset.column_names:
        return True
    if "chosen" not in dataset.column_names or len(dataset) == 0:
        return False
    first = dataset[0]["chosen"]
    return isinstance(first, list) and bool(first) and all(isinstance(c, str) for c in first)


def _subset_reason(subset) -> str:
    return "" if isinstance(subset, str) and subset.strip() else "bad_subset"


def _v2_invalid_reason(row: dict, special_tokens) -> str:
    if _subset_reason(row["subset"]):
        return "bad_subset"
    prompt = row["prompt"]
    if isinstance(prompt, str) and prompt.strip():
        context = [{"role": "user", "content": prompt}]
    else:
        context = clean_messages(prompt) if isinstance(prompt, list) else None
        if not context:
            return "bad_prompt"
    chosen, rejected = row["chosen"], row["rejected"]
    if not all(isinstance(side, list) and side and all(isinstance(c, str) and c.strip() for c in side)
               for side in (chosen, rejected)):
        return "not_a_completion_list"
    counts = {"num_correct": len(chosen), "num_incorrect": len(rejected),
              "total_completions": len(chosen) + len(rejected)}
    if any(row.get(k) is not None and row[k] != n for k, n in counts.items()):
        return "counts_mismatch"
    if v2_subset_name(row["subset"]) == TIES_SUBSET:
        try:
            kind, _ = ties_prompt_key(row["id"])
        except UserError:
            return "bad_ties_id"
        if kind == "tied" and len(chosen) < 2:
            return "bad_ties_id"
    texts = [m["content"] for m in context] + chosen + rejected
    if special_tokens is not None and any(special_tokens.search(t) for t in texts):
        return "special_token_in_content"
    return ""


def prepare_examples_v2(dataset, flag: str, skip_invalid: bool, special_tokens=None):
    """Validate RewardBench 2 rows (V2_RULES; special_tokens: a compiled pattern of the tokenizer's special tokens)
    and give each prompt its 'context' (messages) and 'responses' (its completions, the correct ones first) and
    'num_correct'. Returns (dataset with id, subset, context, responses, num_correct; stats)."""
    missing = [c for c in V2_COLUMNS if c not in dataset.column_names]
    if missing:
        raise UserError(f"{flag}: RewardBench 2 data needs columns {', '.join(V2_COLUMNS)} (missing: "
                        f"{', '.join(missing)}; found: {', '.join(dataset.column_names)})")
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", [str(i) for i in range(len(dataset))])

    def convert(row):
        reason = _v2_invalid_reason(row, special_tokens)
        context = ([{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str)
                   else clean_messages(row["prompt"]) or []) if not reason else []
        responses = list(row["chosen"]) + list(row["rejected"]) if not reason else []
        return {"id": str(row["id"]), "subset": v2_subset_name(row["subset"]), "context": context,
                "responses": responses, "num_correct": len(row["chosen"]) if not reason else 0,
                "invalid_reason": reason}

    converted = dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in ("id", "subset")],
                            desc=f"validating {flag.lstrip('-')}")
    checked, stats = enforce_validity(converted, V2_RULES, skip_invalid, flag.lstrip("-"))
    unique_ids(checked["id"])
    unknown = sorted(set(checked["subset"]) - set(V2_SUBSETS))
    if unknown:
        print(f"{flag}: subsets outside RewardBench 2's six are scored but not averaged: {', '.join(unknown)}")
    return checked, stats


# preference-test-sets splits that reward-bench's load_eval_dataset leaves out (no longer part of the benchmark).
RETIRED_PRIOR_SETS = ("pku_safer", "pku_better")


def load_examples(path: str, split: Optional[str], flag: str, skip_invalid: bool):
    """Load and validate prompt/chosen/rejected examples with their id and subset, from one split, or from every
    split when split is None. Data of several splits is allenai/preference-test-sets' layout, read as reward-bench
    reads it: the split name is the subset (a 'subset' column of its own becomes 'subsubset'), ids are made unique
    as '<split>:<id>', and the retired pku splits are left out (said once). Returns (standard-format dataset with
    'id' and 'subset', stats)."""
    is_local = Path(path).expanduser().exists()
    splits = load_dataset_dict(path, flag, split=None if is_local else split, skip_invalid=skip_invalid)
    if split is not None:
        dataset = pick_split(splits, split, flag)
    elif len(splits) == 1:
        dataset = next(iter(splits.values()))
    else:
        retired = [name for name in splits if name in RETIRED_PRIOR_SETS]
        if retired:
            print(f"{flag}: leaving out {', '.join(retired)}, as reward-bench does (no longer part of the benchmark)")
        parts = []
        for name, ds in splits.items():
            if name in RETIRED_PRIOR_SETS:
                continue
            if "subset" in ds.column_names:
                ds = ds.rename_column("subset", "subsubset")
            ids = ds["id"] if "id" in ds.column_names else range(len(ds))
            ds = ds.remove_columns([c for c in ("id",) if c in ds.column_names])
            parts.append(ds.add_column("subset", [name] * len(ds)).add_column("id", [f"{name}:{i}" for i in ids]))
        dataset = concatenate_datasets(parts)
    return prepare_examples(dataset, path, flag, skip_invalid)


def prepare_examples(dataset, path: str, flag: str, skip_invalid: bool):
    """Validate RewardBench (v1) examples: standard-format pairs with their id and subset. Returns (dataset, stats)."""
    if "subset" not in dataset.column_names:
        raise UserError(f"{flag}: '{path}' has no 'subset' column")
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", list(range(len(dataset))))
    marked = map_rows(dataset, lambda subset: {"invalid_reason": _subset_reason(subset)}, ["subset"],
                      desc=f"checking {flag.lstrip('-')}'s subsets")
    dataset, subset_stats = enforce_validity(marked, SUBSET_RULES, skip_invalid, flag.lstrip("-"))
    # A pair with the same response twice stays: reward-bench scores it, a tie, which its strict '>' counts wrong.
    dataset, stats = standardize_pairs(dataset, skip_invalid, flag.lstrip("-"), read_hh=False, allow_identical=True)
    unique_ids(dataset["id"])
    return dataset, {**stats, "read": subset_stats["read"], "invalid": {**subset_stats["invalid"], **stats["invalid"]}}


def check_eval_arguments(args, state) -> None:
    """Before any scoring: the record file and the results JSON must be two writable files (creatable, not
    directories, not the evaluated data or model nor inside them), and --device_map runs in one process."""
    # Before the data says which benchmark it is, either default name may be the one written.
    results = ({default_results_json(args.record_dir, args.reward_name_or_path, b) for b in (1, 2)}
               if args.benchmark is None and not args.results_json else {results_json_path(args)})
    for flag, path in (("--record_dir", args.record_dir), *(("--results_json", path) for path in sorted(results))):
        check_output_file(path, flag, inputs=(args.data_set_name, args.prior_sets_path, args.reward_name_or_path))
    record = Path(args.record_dir).expanduser().resolve()
    if any(Path(path).expanduser().resolve() == record for path in results):
        raise UserError(f"--results_json and --record_dir are one file ({args.record_dir}): the JSON would replace "
                        "the records; give two")
    if args.device_map and state.num_processes > 1:
        raise UserError(f"--device_map {args.device_map} spreads one model over the GPUs of one process; run it "
                        f"without a launcher ({state.num_processes} processes here)")


def results_json_path(args) -> str:
    """--results_json, else next to --record_dir."""
    return args.results_json or default_results_json(args.record_dir, args.reward_name_or_path, args.benchmark)


def write_results(results: dict, model_name: str, record_dir: str, results_json: str) -> None:
    """Write ``results_json``, then append the RLHFlow-style record block (the model, then each section (v1) or
    subset (v2) and the Score) to ``record_dir``."""
    v2 = results.get("benchmark") == 2
    names, values, averaged = ((V2_SUBSETS, results["subsets"], results["score_subsets"]) if v2
                               else (SECTIONS, results["sections"], results["score_sections"]))
    for path in (record_dir, results_json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The JSON first (strict: no bare NaN; written beside and moved into place), then the record block in one write:
    # a run killed between them leaves no record line claiming a result whose JSON is missing.
    atomic_write_text(results_json, json.dumps({**results, "model": model_name}, indent=2, allow_nan=False))
    lines = [model_name + (" (RewardBench 2)" if v2 else "")]
    lines += [f"{name}\t{_recorded(values[name])}" for name in names]
    if "prior_sets" in results:
        lines.append(f"Prior Sets\t{_recorded(results['prior_sets']['score'])}")
    lines.append(f"Score\t{_recorded(results['score'])}")
    if len(averaged) < len(names):
        lines.append(f"Score averages\t{', '.join(averaged)}")
    with open(record_dir, "a") as f:
        f.write("\n".join(lines) + "\n")


def _recorded(value) -> str:
    return "absent" if value is None else str(round(value, 2))  # upstream RLHFlow's record: 2 decimals


def save_and_report(results: dict, args, data_stats: dict, dtype) -> None:
    """An eval script's ending, on the main process: record its options, the dtype the model computed in (--bf16
    falls back to fp32 without a bf16 GPU) and the data counts, append to record_dir, write the results JSON
    (args.results_json, else next to record_dir) and print the report."""
    results["options"] = asdict(args)
    results["dtype"] = str(dtype).removeprefix("torch.")
    results["data"] = data_stats
    results_json = results_json_path(args)
    write_results(results, args.reward_name_or_path, args.record_dir, results_json)
    print(format_report_v2(results) if results.get("benchmark") == 2 else format_report(results))
    print(f"Appended to {args.record_dir}; results JSON: {results_json}")


def default_results_json(record_dir: str, model_name: str, benchmark: Optional[int] = 1) -> str:
    """Path ``<dir of record_dir>/<record_dir stem>_<model slug>.json``, ``..._v2.json`` for RewardBench 2 (both runs
    of a model may share one record file; each keeps its own results)."""
    directory = os.path.dirname(record_dir)
    stem = os.path.splitext(os.path.basename(record_dir))[0]
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model_name).strip("_.")
    return os.path.join(directory, f"{stem}_{slug}{'_v2' if benchmark == 2 else ''}.json")
