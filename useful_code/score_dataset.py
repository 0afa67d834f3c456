"""Score every candidate response of every prompt with a reward model: rejection sampling and iterative DPO data.

    python useful_code/score_dataset.py --reward_name_or_path DIR [--dataset_path FILE] [--output_path FILE.jsonl]
        [--best_of_n_path FILE.jsonl] [--pairs_path FILE.jsonl] [--margin_threshold M]
    torchrun --nproc_per_node N useful_code/score_dataset.py ...   # data-parallel: each rank scores a slice

The reward model is a BT checkpoint, an exported ArmoRM (--trust_remote_code) or a pairwise preference model (a
response then scores its mean win probability against the other candidates). Each input row holds "responses" (a
list of strings) and either "prompt" (a string or a message list: RLHFlow's generation output) or
"context_messages" (standard messages ending with the user's turn), decided per row.

Writes --output_path (default outputs/scored/<dataset name>.jsonl): each valid row with "rewards", one per response,
appended a chunk of prompts at a time, so a killed run resumes where it stopped (--overwrite starts again); beside it,
<output stem>.scorer.json records the model and settings that scored it, and a resume with others is refused. From the
whole scored file it then writes --best_of_n_path ({"messages": context + [best response], "reward"}: rejection-
sampling fine-tuning) and --pairs_path (best vs worst response, {"chosen", "rejected", "chosen_reward",
"rejected_reward", "margin"}, when the margin is above --margin_threshold: iterative DPO).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from useful_code.checkpoints import atomic_write_text, check_output_file
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data import load_split
from useful_code.data_parallel import finish, map_across_ranks, process_state
from useful_code.defaults import TOY_GENERATIONS
from useful_code.formats import CONVERSATION_RULES, clean_messages, enforce_validity, validate_conversation
from useful_code.reward_scorer import KINDS, RewardScorer
from useful_code.scoring import token_budget_field
from useful_code.templates import SPECIAL_TOKEN_RULES, special_token_pattern

FORMAT_COLUMNS = ("context_messages", "prompt")
ROW_RULES = {
    "bad_prompt": "prompt must be a non-empty string or a list of {role, content} messages, or context_messages "
                  "a list of messages",
    "not_a_response_list": "responses must be a non-empty list of non-empty strings",
    **{k: v for k, v in CONVERSATION_RULES.items() if k != "not_a_message_list"},  # context + a response
    **SPECIAL_TOKEN_RULES,
}


@dataclass
class ScriptArguments:
    """The reward model, the prompts with their responses, and the scored, best-of-n and pair files."""

    reward_name_or_path: str = field(metadata={"help": "BT, exported ArmoRM (--trust_remote_code) or PM checkpoint."})
    dataset_path: str = field(default=TOY_GENERATIONS, metadata={
        "help": "Rows of 'responses' with 'prompt' or 'context_messages': a .jsonl/.json/.parquet file, a saved "
                "dataset or a hub name. Default: the bundled assets/data/toy_generations.jsonl."})
    split: str = field(default="train", metadata={"help": "Dataset split (a single local file is its own split)."})
    output_path: Optional[str] = field(default=None, metadata={
        "help": "Every row with its 'rewards' (.jsonl). Default: outputs/scored/<dataset name>.jsonl"})
    best_of_n_path: Optional[str] = field(default=None, metadata={"help": "Each prompt's best response (.jsonl)."})
    pairs_path: Optional[str] = field(default=None, metadata={"help": "Best-vs-worst response pairs (.jsonl)."})
    margin_threshold: float = field(default=0.0, metadata={
        "min": 0, "help": "A pair is written only when best - worst reward is above this (equal rewards never)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Sequences per padded forward (length-sorted)."})
    max_tokens_per_batch: int = token_budget_field()
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Longer inputs are cut from the left (counted)."})
    prompts_per_chunk: int = field(default=64, metadata={
        "min": 1, "help": "Prompts scored, then appended to --output_path, at a time (what a kill can lose)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={"help": "Read pickled (.bin) weights, weights-only."})
    overwrite: bool = field(default=False, metadata={"help": "Score everything again instead of resuming."})
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})


def output_paths(args) -> dict[str, Path]:
    """The output files by flag, checked before any work: .jsonl, distinct, writable and not the input."""
    if args.output_path is None:
        name = Path(args.dataset_path.rstrip("/")).name
        for suffix in (".gz", ".bz2", ".xz", ".zst", ".jsonl", ".json", ".parquet"):
            name = name.removesuffix(suffix)
        args.output_path = str(Path("outputs", "scored", f"{name or 'scored'}.jsonl"))
    paths = {flag: Path(path).expanduser() for flag, path in (("--output_path", args.output_path),
             ("--best_of_n_path", args.best_of_n_path), ("--pairs_path", args.pairs_path)) if path}
    for flag, path in paths.items():
        if path.suffix != ".jsonl":
            raise UserError(f"{flag}: {path} must be a .jsonl file")
        check_output_file(str(path), flag, inputs=(args.dataset_path,))
    if len({p.resolve() for p in paths.values()}) < len(paths):
        raise UserError(f"{', '.join(paths)} must be different files")
    return paths


def parse_row(row: dict, special_tokens=None) -> tuple[list[dict], list[str], str]:
    """(context messages, responses, '' or the first broken rule of ROW_RULES) of a row in either format."""
    if row.get("context_messages") is not None:
        context = clean_messages(row["context_messages"])
    elif isinstance(row.get("prompt"), str):
        context = [{"role": "user", "content": row["prompt"]}] if row["prompt"].strip() else None
    else:
        context = clean_messages(row.get("prompt"))
    responses = row.get("responses")
    if not context:
        return [], [], "bad_prompt"
    if not (isinstance(responses, list) and responses and all(isinstance(r, str) and r.strip() for r in responses)):
        return context, [], "not_a_response_list"
    reason = validate_conversation(context + [{"role": "assistant", "content": responses[0]}])
    texts = [m["content"] for m in context] + responses
    if not reason and special_tokens is not None and any(special_tokens.search(t) for t in texts):
        reason = "special_token_in_content"
    return context, responses, reason


def load_rows(args, special_tokens):
    """The valid rows of --dataset_path: an invalid row is an error naming it and its rule, or with --skip_invalid
    is dropped and counted. Returns (dataset, stats)."""
    dataset = load_split(args.dataset_path, args.split, "--dataset_path", args.skip_invalid)
    if "responses" not in dataset.column_names or not set(FORMAT_COLUMNS) & set(dataset.column_names):
        raise UserError(f"--dataset_path: rows need 'responses' and 'prompt' or 'context_messages' (found: "
                        f"{', '.join(dataset.column_names)})")
    marked = dataset.map(lambda row: {"invalid_reason": parse_row(row, special_tokens)[2]},
                         desc="validating dataset_path")
    return enforce_validity(marked, ROW_RULES, args.skip_invalid, "dataset_path")


def scored_row(row: dict, rewards: Optional[list[float]] = None) -> dict:
    """An output line: the row as read, less the other format's column (null in a mixed file), and its rewards."""
    kept = {k: v for k, v in row.items() if not (k in FORMAT_COLUMNS and v is None)}
    return kept if rewards is None else {**kept, "rewards": rewards}


def scorer_record(args, scorer: RewardScorer) -> dict:
    """What decides the rewards in --output_path: the model (a local directory's files by name, size and time; a hub
    model's revision), --max_length and the dtype. A resumed run must match it, or its rows would mix two models."""
    path = Path(args.reward_name_or_path).expanduser()
    if path.is_dir():
        model = str(path.resolve())
        files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir())
                 if f.is_file() and f.suffix in (".safetensors", ".bin", ".json")]
    else:
        model, files = args.reward_name_or_path, getattr(scorer.model.config, "_commit_hash", None)
    return {"reward_name_or_path": model, "files": files, "max_length": args.max_length, "dtype": str(scorer.dtype)}


def record_path(output: Path) -> Path:
    """The file beside --output_path that records what scored it (scorer_record)."""
    return output.with_suffix(".scorer.json")


def resume_point(path: Path, overwrite: bool, rows, record: dict) -> int:
    """How many rows a previous run scored into path (complete lines; a line cut by a kill is truncated away); 0 with
    overwrite, which empties the file. The last of them must be the same input row, or the file is of other data,
    and the model and settings must be record, those that scored them (record_path), or its rows would mix two."""
    if overwrite or not path.exists() or path.stat().st_size == 0:
        path.write_text("")
        atomic_write_text(record_path(path), json.dumps(record, indent=1))
        return 0
    done, end, last = 0, 0, None
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            done, end, last = done + 1, end + len(line), line
    if end < path.stat().st_size:
        os.truncate(path, end)
    mismatch = done > len(rows)
    if done and not mismatch:
        try:
            scored = {**json.loads(last), "rewards": None}
        except (ValueError, TypeError):  # not a JSON object: not a line this script wrote
            scored = None
        mismatch = scored != {**json.loads(json.dumps(scored_row(rows[done - 1]))), "rewards": None}
    if mismatch:
        raise UserError(f"--output_path: {path} holds {done} scored rows that are not the first of --dataset_path's "
                        f"{len(rows)} valid rows (other data or other --skip_invalid); pass --overwrite or choose "
                        "another --output_path")
    if done:
        try:
            previous = json.loads(record_path(path).read_text())
        except (OSError, ValueError):
            previous = None
        if previous != json.loads(json.dumps(record)):
            changed = ("no record of the model that scored them" if not isinstance(previous, dict) else
                       "scored with other " + ", ".join(k for k in record if previous.get(k) != record[k]))
            raise UserError(f"--output_path: {path} holds {done} scored rows, {changed} ({record_path(path)}); "
                            "pass --overwrite to score them all again, or choose another --output_path")
        print(f"Resuming {path}: {done} of {len(rows)} prompts already scored (--overwrite starts again)")
    return done


def score_prompts(scorer: RewardScorer, items: list[tuple[list[dict], list[str]]]) -> list[tuple[list[float], int]]:
    """(rewards, sequences cut) per (context, responses): the cut count of the whole call rides on its first item,
    since map_across_ranks gathers one result per item."""
    if not items:
        return []
    scores, cut = scorer.response_scores([context for context, _ in items], [responses for _, responses in items])
    return [(s, cut if i == 0 else 0) for i, s in enumerate(scores)]


def best_and_pairs(path: Path, expected: int, threshold: float) -> tuple[list[dict], list[dict], dict]:
    """From the whole scored file (so a resumed run's earlier rows count once): each prompt's best response, and
    its best-vs-worst pair when the margin is above threshold. Returns (best-of-n rows, pairs, counts)."""
    best_rows, pairs, counts = [], [], {"below_margin": 0, "one_response": 0}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            context, responses, _ = parse_row(row)
            rewards = row["rewards"]
            if len(rewards) != len(responses):
                raise RuntimeError(f"{path}: a row has {len(rewards)} rewards for {len(responses)} responses")
            # The first of equal rewards wins, so ties resolve the same way in every run.
            best = max(range(len(rewards)), key=rewards.__getitem__)
            worst = min(range(len(rewards)), key=rewards.__getitem__)
            chosen = context + [{"role": "assistant", "content": responses[best]}]
            best_rows.append({"messages": chosen, "reward": rewards[best]})
            margin = rewards[best] - rewards[worst]
            if len(rewards) == 1:
                counts["one_response"] += 1
            # threshold >= 0, so equal rewards never make a pair; nor does one text twice (its rewards may differ
            # by batching noise, and such a pair teaches nothing).
            elif margin > threshold and responses[best] != responses[worst]:
                pairs.append({"chosen": chosen, "rejected": context + [{"role": "assistant",
                              "content": responses[worst]}], "chosen_reward": rewards[best],
                              "rejected_reward": rewards[worst], "margin": margin})
            else:
                counts["below_margin"] += 1
    if len(best_rows) != expected:
        raise RuntimeError(f"{path} holds {len(best_rows)} scored rows, expected {expected}")
    return best_rows, pairs, counts


def main(argv: Optional[list[str]] = None):
    started = time.time()
    args = parse_args((ScriptArguments,), argv=argv)[0]
    paths = output_paths(args)
    output = paths["--output_path"]
    state = process_state()
    # The PM's own rank split stays off (state=None): the prompts of each chunk are split across the ranks below.
    scorer = RewardScorer.from_pretrained(args.reward_name_or_path, "--reward_name_or_path", args.max_length,
                                          args.batch_size, args.bf16, args.attn_implementation, args.trust_remote_code,
                                          args.load_pickled_weights, device=state.device, state=None,
                                          max_tokens_per_batch=args.max_tokens_per_batch)
    with state.main_process_first():  # one rank fills the datasets cache, the others then read it
        rows, stats = load_rows(args, special_token_pattern(scorer.tokenizer))

    # Only the main rank reads (and repairs) the output; the others learn where to start, or its error.
    resume = [None, None]
    if state.is_main_process:
        try:
            resume[0] = resume_point(output, args.overwrite, rows, scorer_record(args, scorer))
        except UserError as err:
            resume[1] = str(err)
    resumed, error = broadcast_object_list(resume)
    if error:
        raise UserError(error)

    scored = truncated = 0
    bar = tqdm(total=len(rows), initial=resumed, unit="prompt", desc="scoring", disable=not state.is_main_process)
    with open(output, "a", encoding="utf-8") if state.is_main_process else nullcontext() as out:
        for start in range(resumed, len(rows), args.prompts_per_chunk):
            chunk = rows.select(range(start, min(start + args.prompts_per_chunk, len(rows)))).to_list()
            items = [parse_row(row)[:2] for row in chunk]
            results = map_across_ranks(state, partial(score_prompts, scorer), items)
            if out is not None:
                out.write("".join(json.dumps(scored_row(row, rewards), ensure_ascii=False) + "\n"
                                  for row, (rewards, _) in zip(chunk, results)))
                out.flush()
                os.fsync(out.fileno())  # a chunk on disk stays there: resuming starts after it
            scored += len(chunk)
            truncated += sum(cut for _, cut in results)
            bar.update(len(chunk))
    bar.close()

    if state.is_main_process:
        best_rows, pairs, counts = best_and_pairs(output, len(rows), args.margin_threshold)
        for flag, derived in (("--best_of_n_path", best_rows), ("--pairs_path", pairs)):
            if flag in paths:
                atomic_write_text(paths[flag], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in derived))
        dropped = ", ".join(f"{r}: {n}" for r, n in stats["invalid"].items()) or "none"
        where = {flag: paths.get(flag, f"not written (no {flag})") for flag in ("--best_of_n_path", "--pairs_path")}
        print(f"Scored {args.dataset_path} with {KINDS[scorer.kind]} {args.reward_name_or_path} "
              f"({state.num_processes} process{'es' if state.num_processes > 1 else ''})\n"
              f"  prompts read: {stats['read']}, dropped: {stats['read'] - stats['used']} ({dropped}), "
              f"scored now: {scored}, resumed: {resumed}, truncated sequences: {truncated}\n"
              f"  scored rows: {output}\n  best-of-n rows: {len(best_rows)} -> {where['--best_of_n_path']}\n"
              f"  pairs: {len(pairs)} -> {where['--pairs_path']}; below the margin ({args.margin_threshold}): "
              f"{counts['below_margin']}, one response only: {counts['one_response']}\n"
              f"  wall time: {time.time() - started:.1f}s")
    finish(state)


if __name__ == "__main__":
    run_cli(main)
