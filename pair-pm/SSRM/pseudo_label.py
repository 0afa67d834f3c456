"""Semi-supervised reward modeling (SSRM, arXiv 2409.06903), step 1: pseudo-label unlabelled pairs with a trained PM.

    python pair-pm/SSRM/pseudo_label.py --reward_name_or_path PM_DIR --dataset_path UNLABELLED [--data_name NAME]
    torchrun --nproc_per_node N pair-pm/SSRM/pseudo_label.py ...   # data-parallel: each rank scores a slice
    for i in 0 1 2 3; do python pair-pm/SSRM/pseudo_label.py ... --n_shards 4 --shard_idx $i --n_gpu 4 & done
    python pair-pm/SSRM/conf_threshold.py [--data_name NAME] --conf_threshold 0.8   # step 2 reads this output

Input: unlabelled pairs, where which response is "chosen" means nothing: standard-format pairs in any format the
project reads (useful_code/formats.py), or rows of "prompt" (a string or messages) or "context_messages" with
"responses", a list of exactly two strings. Each pair is scored in both orders and the two probabilities averaged:
p = P(first response preferred). The induced label puts the first response as chosen when p > 0.5 (p = 0.5, no
evidence, keeps the input's order), else the second.

Upstream's sharding flags: --n_shards N --shard_idx I (0-based, as upstream) label only the I-th of N contiguous
slices of the valid pairs (datasets' Dataset.shard, upstream's split), written by default to
outputs/ssrm/<data_name>-pred-probs-shard-<I+1>-of-<N>.jsonl; conf_threshold.py reads all N shards for the same
--data_name, in order, which is the input's order. --n_gpu G puts a process started without a launcher on GPU I % G,
as upstream (the loop above); under torchrun (or another launcher) each rank keeps the GPU the launcher gives it and
--n_gpu is ignored, with a note.

Output (--output_path, default outputs/ssrm/<data_name>-pred-probs.jsonl, the default input of conf_threshold.py):
one JSON line per pair with the induced "chosen" and "rejected", "chosen_prob" (P(chosen preferred) = max(p, 1 - p))
and "swapped" (whether chosen is the input's second response), plus any other columns of the input.
"""

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from useful_code.output_files import atomic_write_text, check_output_file
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data import load_split
from useful_code.data_parallel import finish, main_process_first, process_state
from useful_code.defaults import DEFAULT_PREFERENCE_DATA
from useful_code.formats import enforce_validity, standardize_pairs
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.reward_scorer import checkpoint_kind
from useful_code.score_dataset import ROW_RULES, parse_row
from useful_code.scoring import token_budget_field
from useful_code.templates import reject_special_tokens

PROB_COLUMN = "chosen_prob"  # upstream's column name; here P(the written chosen preferred), at least 0.5
SWAPPED_COLUMN = "swapped"
RESPONSE_ROW_RULES = {**ROW_RULES, "not_two_responses": "responses must hold exactly two responses to compare"}


def pred_probs_path(data_name: str, shard_idx: int = 0, n_shards: int = 1) -> str:
    """The pseudo-label file of a data name (of shard shard_idx, 0-based, when n_shards > 1): this script's default
    output and conf_threshold.py's default input (upstream's two scripts named it differently)."""
    shard = f"-shard-{shard_idx + 1}-of-{n_shards}" if n_shards > 1 else ""
    return str(Path("outputs", "ssrm", f"{data_name}-pred-probs{shard}.jsonl"))


def pred_probs_inputs(data_name: str) -> list[str]:
    """The pseudo-label files of a data name, as conf_threshold.py reads them by default: the one file of an
    unsharded run, or every shard file of a sharded one. None, a missing shard, shards of runs with different
    --n_shards, or both kinds at once is a UserError saying which."""
    single = Path(pred_probs_path(data_name))
    pattern = re.compile(re.escape(f"{data_name}-pred-probs-shard-") + r"(\d+)-of-(\d+)\.jsonl")
    shards = {}
    for path in sorted(single.parent.glob(f"{data_name}-pred-probs-shard-*-of-*.jsonl")):
        match = pattern.fullmatch(path.name)
        if match:
            shards.setdefault(int(match.group(2)), {})[int(match.group(1))] = str(path)
    rerun = f"run pair-pm/SSRM/pseudo_label.py --data_name {data_name} first, or pass --input_path"
    if single.exists() and shards:
        raise UserError(f"--input_path: both {single} and shard files {single.parent}/{data_name}-pred-probs-shard-*"
                        " exist; remove the stale ones, or pass --input_path")
    if single.exists():
        return [str(single)]
    if not shards:
        raise UserError(f"--input_path: {single} does not exist; {rerun}")
    if len(shards) > 1:
        raise UserError(f"--input_path: shard files of runs with different --n_shards {sorted(shards)} for "
                        f"--data_name {data_name}; remove the stale ones")
    n_shards, found = next(iter(shards.items()))
    missing = sorted(set(range(1, n_shards + 1)) - set(found))
    if missing:
        raise UserError(f"--input_path: shards {missing} of {n_shards} (1-based, as in the file names) of --data_name "
                        f"{data_name} are missing; run pair-pm/SSRM/pseudo_label.py --n_shards {n_shards} "
                        f"--shard_idx {missing[0] - 1} (0-based)")
    return [found[i] for i in range(1, n_shards + 1)]


@dataclass
class ScriptArguments:
    """The preference model, the unlabelled pairs and where their pseudo-labels go."""

    reward_name_or_path: str = field(metadata={"help": "Pairwise preference model: checkpoint directory or hub name."})
    dataset_path: str = field(default=DEFAULT_PREFERENCE_DATA, metadata={
        "help": "Unlabelled pairs: standard-format pairs (the chosen/rejected order is ignored) or rows of 'prompt' or "
                "'context_messages' with two 'responses'; a .json/.jsonl/.parquet file, a dataset directory or a hub "
                "name."})
    split: str = field(default="train", metadata={"help": "Dataset split (a single local file is its own split)."})
    data_name: str = field(default="ssrm", metadata={
        "help": "Names the default output, outputs/ssrm/<data_name>-pred-probs.jsonl (conf_threshold.py's default "
                "input for the same --data_name)."})
    output_path: Optional[str] = field(default=None, metadata={"help": "The pseudo-labelled pairs (.jsonl)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Sequences per padded forward (length-sorted)."})
    max_tokens_per_batch: int = token_budget_field()
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Longer inputs are cut from the left (counted)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    n_shards: int = field(default=1, metadata={
        "min": 1, "help": "Upstream's: label one of this many contiguous shards of the valid pairs (upstream's "
                          "default was 64; here 1, all pairs)."})
    shard_idx: int = field(default=0, metadata={"min": 0, "help": "Upstream's: which shard, 0-based."})
    n_gpu: int = field(default=1, metadata={
        "min": 1, "help": "Upstream's: without a launcher, run on GPU shard_idx %% n_gpu. Ignored under torchrun or "
                          "another launcher (each rank has its GPU) and on a machine without a GPU."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})


def output_path(args) -> str:
    """--output_path (default from --data_name and the shard), checked before any work: a writable .jsonl file, not
    the input."""
    if args.shard_idx >= args.n_shards:
        raise UserError(f"--shard_idx must be below --n_shards={args.n_shards} (0-based), got {args.shard_idx}")
    path = args.output_path or pred_probs_path(args.data_name, args.shard_idx, args.n_shards)
    if Path(path).suffix != ".jsonl":
        raise UserError(f"--output_path: {path} must be a .jsonl file")
    check_output_file(path, "--output_path", inputs=(args.dataset_path, args.reward_name_or_path))
    return path


def responses_to_pairs(dataset, skip_invalid: bool):
    """Rows of a prompt and two responses as chosen/rejected message lists (first response first)."""

    def convert(row):
        context, responses, reason = parse_row(row)
        if not reason and len(responses) != 2:
            reason = "not_two_responses"
        if reason:
            return {"chosen": None, "rejected": None, "invalid_reason": reason}
        return {"chosen": context + [{"role": "assistant", "content": responses[0]}],
                "rejected": context + [{"role": "assistant", "content": responses[1]}], "invalid_reason": ""}

    source = [c for c in ("prompt", "context_messages", "responses") if c in dataset.column_names]
    marked = dataset.map(convert, remove_columns=source, desc="reading responses")
    return enforce_validity(marked, RESPONSE_ROW_RULES, skip_invalid, "dataset_path")[0]


def load_pairs(args):
    """The unlabelled pairs as standard-format chosen/rejected (input order), validated, with counts."""
    raw = load_split(args.dataset_path, args.split, "--dataset_path", args.skip_invalid)
    read = len(raw)
    if "responses" in raw.column_names and not {"chosen", "rejected"} & set(raw.column_names):
        raw = responses_to_pairs(raw, args.skip_invalid)
    pairs, _ = standardize_pairs(raw, args.skip_invalid, "dataset_path")
    return pairs, read


def shard_device(args, state):
    """Upstream's GPU choice for a process started alone with --n_gpu G: GPU shard_idx % G. Under a launcher each
    rank keeps the launcher's GPU; without a GPU there is nothing to choose. Either way --n_gpu is then ignored, said
    once."""
    if args.n_gpu == 1:
        return state.device
    if state.num_processes > 1 or not torch.cuda.is_available():
        if state.is_main_process:
            why = "a launcher gives each rank its GPU" if state.num_processes > 1 else "this machine has no GPU"
            print(f"Note: --n_gpu {args.n_gpu} is ignored ({why})")
        return state.device
    if args.n_gpu > torch.cuda.device_count():
        raise UserError(f"--n_gpu {args.n_gpu}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(f"cuda:{args.shard_idx % args.n_gpu}")


def pseudo_labelled(row: dict, p: float) -> dict:
    """An output line: the pair in the order the PM prefers, with P(its chosen preferred)."""
    swapped = bool(p < 0.5)
    chosen, rejected = (row["rejected"], row["chosen"]) if swapped else (row["chosen"], row["rejected"])
    return {**row, "chosen": chosen, "rejected": rejected, PROB_COLUMN: float(1.0 - p if swapped else p),
            SWAPPED_COLUMN: swapped}


def main(argv: Optional[list[str]] = None):
    started = time.time()
    args = parse_args((ScriptArguments,), argv=argv)[0]
    path = output_path(args)
    if checkpoint_kind(args.reward_name_or_path) != "pm":
        raise UserError(f"--reward_name_or_path: {args.reward_name_or_path} is not a pairwise preference model "
                        "(a causal LM trained by pair-pm/train.py)")
    state = process_state()
    with main_process_first(state):  # one rank fills the datasets cache, the others then read it
        pairs, read = load_pairs(args)

    scorer = PairPreferenceScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, pickled_weights=args.load_pickled_weights,
        device=shard_device(args, state),
        batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
        max_length=args.max_length, state=state)
    with main_process_first(state):
        pairs, forged = reject_special_tokens(pairs, scorer.tokenizer, ("chosen", "rejected"), args.skip_invalid,
                                              "dataset_path")
    if len(pairs) == 0:
        raise UserError("--dataset_path: no valid pairs to label")
    valid = len(pairs)
    if args.n_shards > 1:  # after validation, so every shard splits the same valid pairs
        # datasets' contiguous shards: the first valid % n_shards hold one pair more (an empty one is an IndexError)
        if valid // args.n_shards + (args.shard_idx < valid % args.n_shards) == 0:
            raise UserError(f"--shard_idx {args.shard_idx}: shard {args.shard_idx} of {args.n_shards} holds none of "
                            f"the {valid} valid pairs; use fewer --n_shards")
        pairs = pairs.shard(num_shards=args.n_shards, index=args.shard_idx, contiguous=True)

    # Every rank scores its slice of the sequences and gets all the probabilities back.
    probs = scorer.score_pairs(pairs, progress=state.is_main_process)["mean"]

    if state.is_main_process:
        rows = [pseudo_labelled(row, float(p)) for row, p in zip(pairs.to_list(), probs)]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        swapped = sum(r[SWAPPED_COLUMN] for r in rows)
        shard = f"shard {args.shard_idx} of {args.n_shards} (0-based), " if args.n_shards > 1 else ""
        if args.n_shards == 1:
            following = f"--input_path {path}"
        elif args.output_path:  # conf_threshold.py finds shards by --data_name only where they are written by default
            following = f"--input_path ONE_FILE, the {args.n_shards} shards' outputs concatenated in shard order"
        else:
            following = f"--data_name {args.data_name}, once all {args.n_shards} shards are written"
        print(f"Pseudo-labelled {args.dataset_path} with {args.reward_name_or_path} ({state.num_processes} "
              f"process{'es' if state.num_processes > 1 else ''})\n"
              f"  pairs read: {read}, invalid dropped: {read - valid} (of which special tokens: {forged}), {shard}"
              f"labelled: {len(rows)}; the PM prefers the input's first response in {len(rows) - swapped}, the "
              f"second in {swapped}; truncated sequences: {scorer.truncated}\n"
              f"  wrote {path} in {time.time() - started:.1f}s; next: python pair-pm/SSRM/conf_threshold.py "
              f"{following}")
    finish(state)


if __name__ == "__main__":
    run_cli(main)
