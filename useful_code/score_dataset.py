"""Score every candidate response of every prompt with a reward model: rejection sampling and iterative DPO data.

    python useful_code/score_dataset.py --reward_name_or_path DIR [--dataset_path FILE] [--output_path FILE.jsonl]
        [--best_of_n_path FILE.jsonl] [--pairs_path FILE.jsonl] [--margin_threshold M]
    torchrun --nproc_per_node N useful_code/score_dataset.py ...   # data-parallel: each rank scores a slice

The reward model is a BT checkpoint, an exported ArmoRM (--trust_remote_code) or a pairwise preference model (a
response then scores its mean win probability against the other candidates; a lone response has no opponent: its
reward is null). Each input row holds "responses" (a list of strings) and its context, the first of these it has:
"context_messages", "messages" or "conversations" (standard messages ending with the user's turn), or "prompt" (the
user's text, or such a message list: the jsonl of RLHFlow's generation/gen_hf2.py; a string of HH-RLHF turns ending
with "\\n\\nAssistant:" is read as those turns).

The rows are checked before the model loads (only its tokenizer is needed): a broken rule is an error naming the row
and the rule, or with --skip_invalid a counted drop. An empty response, or for ArmoRM one that --max_length cuts so
that no user turn is left, is a rule of that response: with --skip_invalid only it is dropped, and its row (kept
while a response is left) lists the dropped indices in "dropped_responses".

Writes --output_path (default outputs/scored/<dataset name>.jsonl): each valid row with "rewards", one per response
it keeps (its "responses" are the kept ones), values JSON has no type for (a parquet timestamp) written as strings,
appended a chunk of prompts at a time, so a killed run resumes where it stopped (--overwrite starts again); one run
at a time (<output>.lock). Beside it, <output stem>.scorer.json records the model and settings that scored it, and a
resume with others is refused. From the whole scored file it then writes --best_of_n_path ({"messages": context +
[best response], "reward"}: rejection-sampling fine-tuning) and --pairs_path (best vs worst response, {"chosen",
"rejected", "chosen_reward", "rejected_reward", "margin"}, when the margin is above --margin_threshold: iterative
DPO). Ties: the first of equal rewards is taken as the best, and as the worst.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm
from transformers import AutoConfig

from useful_code.armo_embeddings import holds_pattern
from useful_code.output_files import atomic_write_lines, atomic_write_text, check_output_file, own_lock, take_lock
from useful_code.cli import ModelOutputError, UserError, limits_aware_parser, parse_args, run_cli
from useful_code.data import load_split
from useful_code.data_parallel import finish, main_process_first, map_across_ranks, on_main, process_state
from useful_code.defaults import TOY_GENERATIONS
from useful_code.formats import (
    CONVERSATION_RULES,
    clean_messages,
    count_summary,
    enforce_validity,
    hh_prompt_messages,
    text_start,
    validate_conversation,
)
from useful_code.reward_scorer import KINDS, RewardScorer, checkpoint_kind
from useful_code.scoring import token_budget_field
from useful_code.templates import (
    SPECIAL_TOKEN_RULES,
    TEMPLATE_REJECTS,
    chat_template_error,
    encode_conversations,
    load_tokenizer,
    special_token_pattern,
    template_rejects_rule,
    tokenizer_adds_bos,
    truncate_all,
)

CONTEXT_COLUMNS = ("context_messages", "messages", "conversations")  # a message list ending with the user's turn
FORMAT_COLUMNS = (*CONTEXT_COLUMNS, "prompt")  # a row's context: the first of these it has (not null)
ROW_RULES = {
    "bad_prompt": "the context must be context_messages, messages or conversations (a list of {role, content} "
                  "messages), or prompt (a non-empty string or such a list)",
    "not_a_response_list": "responses must be a non-empty list of strings",
    **{k: v for k, v in CONVERSATION_RULES.items() if k != "not_a_message_list"},  # context + a response
    **SPECIAL_TOKEN_RULES,
}
# Rules of one response: with --skip_invalid only that response is dropped (its row, while one is left, is kept).
RESPONSE_RULES = {
    "empty_response": "no response may be empty or only whitespace",
    "no_user_turn_for_gating": "ArmoRM reads the prompt at the end of the last user turn: each context + response, "
                               "cut from the left to max_length={max_length} tokens, must keep it (a response that "
                               "long cuts it off)",
}
TEMPLATED_HINT = ("a string prompt holding the tokenizer's special tokens looks chat-templated (as RLHFlow's older "
                  "gen_hf.py writes it): give the prompt as the user's text or as the message list (gen_hf2.py's "
                  "jsonl), since a templated prompt would be templated twice")
DROPPED = "__score_dataset_dropped"  # internal column: a row's dropped responses, [[index, rule], ...] as JSON
TEMPLATED = "__score_dataset_templated"  # internal column: the row's string prompt holds special tokens
REFUSED = "__score_dataset_refused"  # internal column: what the chat template raised on the row's context, or ''
LOCK_SUFFIX = ".lock"


@dataclass
class ScriptArguments:
    """The reward model, the prompts with their responses, and the scored, best-of-n and pair files."""

    reward_name_or_path: str = field(metadata={"help": "BT, exported ArmoRM (--trust_remote_code) or PM checkpoint."})
    dataset_path: str = field(default=TOY_GENERATIONS, metadata={
        "help": "Rows of 'responses' with 'context_messages', 'messages', 'conversations' or 'prompt': a "
                ".jsonl/.json/.parquet file, a saved dataset or a hub name. Default: the bundled "
                "assets/data/toy_generations.jsonl."})
    split: str = field(default="train", metadata={"help": "Dataset split (a single local file is its own split)."})
    output_path: Optional[str] = field(default=None, metadata={
        "help": "Every row with its 'rewards' (.jsonl). Default: outputs/scored/<dataset name>.jsonl"})
    best_of_n_path: Optional[str] = field(default=None, metadata={
        "help": "Each prompt's best response (.jsonl); of equal rewards the first is taken."})
    pairs_path: Optional[str] = field(default=None, metadata={
        "help": "Best-vs-worst response pairs (.jsonl); of equal rewards the first is taken as best, and as worst."})
    margin_threshold: float = field(default=0.0, metadata={
        "min": 0, "help": "A pair is written only when best - worst reward is above this (equal rewards never)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Sequences per padded forward (length-sorted)."})
    max_tokens_per_batch: int = token_budget_field()
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Longer inputs are cut from the left (counted)."})
    prompts_per_chunk: int = field(default=64, metadata={
        "min": 1, "help": "Prompts scored, then appended to --output_path, at a time (what a kill can lose)."})
    skip_invalid: bool = field(default=False, metadata={
        "help": "Drop invalid rows, and empty (or, ArmoRM, user-turn-less) responses, counted, instead of failing."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={"help": "Read pickled (.bin) weights, weights-only."})
    overwrite: bool = field(default=False, metadata={"help": "Score everything again instead of resuming."})
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})


def print_help() -> None:
    """--help: this module's description, then the flags."""
    limits_aware_parser((ScriptArguments,), __doc__).print_help()


def output_paths(args) -> dict[str, Path]:
    """The output files by flag, checked before any work: .jsonl, distinct, not the input, and writable
    (check_output_file)."""
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
        check_output_file(str(path), flag, inputs=(args.dataset_path, args.reward_name_or_path))
    if len({p.resolve() for p in paths.values()}) < len(paths):
        raise UserError(f"{', '.join(paths)} must be different files")
    return paths


@contextmanager
def output_lock(output: Path):
    """Hold an exclusive lock on <output>.lock while this run writes output (main process only; output_files.take_lock):
    a second run into the same file stops with one line instead of appending the same rows again. The lock file
    (holding this PID) is removed on release; a killed run's lock goes with its process."""
    lock = output.with_name(output.name + LOCK_SUFFIX)
    try:
        fd, _ = take_lock(lock, lambda holder: f"--output_path: another run (PID {holder}) is writing {output} "
                                               f"({lock}); wait for it to finish, or choose another --output_path")
    except OSError as err:
        raise UserError(f"--output_path: cannot create the lock file {lock} ({err.strerror})") from None
    try:
        own_lock(fd)
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # still locked here: no other run can hold this file
        os.close(fd)


def row_context(row: dict):
    """A row's context column's value: the first of FORMAT_COLUMNS that is present and not null."""
    return next((row[c] for c in FORMAT_COLUMNS if row.get(c) is not None), None)


def parse_row(row: dict, special_tokens=None) -> tuple[list[dict], list[str], str]:
    """(context messages, responses, '' or the first broken rule of ROW_RULES) of a row in any format. Rules of one
    response (RESPONSE_RULES: empty_response) are response_problems'."""
    value = row_context(row)
    if isinstance(value, str):  # the user's text: a prompt's form only (a context column holds messages)
        prompt = row.get("prompt") is value and all(row.get(c) is None for c in CONTEXT_COLUMNS)
        context = (hh_prompt_messages(value) or [{"role": "user", "content": value}]) if prompt and value.strip() \
            else None
    else:
        context = clean_messages(value)
    responses = row.get("responses")
    if not context:
        return [], [], "bad_prompt"
    if not (isinstance(responses, list) and responses and all(isinstance(r, str) for r in responses)):
        return context, [], "not_a_response_list"
    reason = validate_conversation(context + [{"role": "assistant", "content": "response"}])
    texts = [m["content"] for m in context] + responses
    if not reason and special_tokens is not None and any(special_tokens.search(t) for t in texts):
        reason = "special_token_in_content"
    return context, responses, reason


def gating_check(tokenizer, pattern, max_length: int) -> Callable[[list[dict], list[str]], list[int]]:
    """ArmoRM: a function of (context, responses) giving the indices of the responses whose sequence, templated and
    cut from the left to max_length as RewardScorer encodes it, holds no gating pattern (RewardScorer.check_gating's
    rule, checked before scoring so that it names the row)."""
    adds_bos, pattern = tokenizer_adds_bos(tokenizer), np.asarray(pattern)

    def failures(context: list[dict], responses: list[str]) -> list[int]:
        conversations = [context + [{"role": "assistant", "content": r}] for r in responses]
        sequences, _ = truncate_all(tokenizer, encode_conversations(tokenizer, conversations, adds_bos=adds_bos),
                                    max_length, adds_bos)
        return [i for i, ids in enumerate(sequences) if not holds_pattern(ids, pattern)]

    return failures


def response_problems(context: list[dict], responses: list[str], gating=None) -> list[list]:
    """[[index, rule of RESPONSE_RULES], ...] of a valid row's responses, by index."""
    problems = [[i, "empty_response"] for i, r in enumerate(responses) if not r.strip()]
    if gating is not None:
        kept = [i for i, r in enumerate(responses) if r.strip()]
        problems += [[kept[j], "no_user_turn_for_gating"]
                     for j in gating(context, [responses[i] for i in kept])] if kept else []
    return sorted(problems)


def load_rows(args, tokenizer, gating_pattern=None, max_length: Optional[int] = None, templated: bool = True):
    """The valid rows of --dataset_path, checked with the tokenizer only (no model): a broken rule is an error naming
    the row (and response) and the rule, or with --skip_invalid a counted drop of the row, or of the response for
    RESPONSE_RULES (the row, while a response is left, keeps the others; the internal column DROPPED lists them).
    templated: each context + response is the tokenizer's chat template's (not a PM's, which reads the context as
    text), so a context the template refuses (Gemma: a system message) breaks TEMPLATE_REJECTS. gating_pattern
    (ArmoRM) adds no_user_turn_for_gating at max_length. Returns (dataset, stats)."""
    dataset = load_split(args.dataset_path, args.split, "--dataset_path", args.skip_invalid)
    columns = dataset.column_names
    if "responses" not in columns or not set(FORMAT_COLUMNS) & set(columns):
        hint = (' (an {"instances": [...]} file, as RLHFlow\'s older gen_hf.py writes, is not read: give the jsonl of '
                'its gen_hf2.py, {"prompt": messages, "responses": [...]} per line)' if "instances" in columns else "")
        raise UserError(f"--dataset_path: rows need 'responses' and one of {', '.join(map(repr, FORMAT_COLUMNS))} "
                        f"(found: {', '.join(columns)}){hint}")
    special_tokens = special_token_pattern(tokenizer)
    max_length = max_length or args.max_length
    gating = gating_check(tokenizer, gating_pattern, max_length) if gating_pattern is not None else None

    def mark(row) -> dict:
        context, responses, reason = parse_row(row, special_tokens)
        # the context decides what a template refuses (roles, their order): checked once, with a stand-in response
        refused = chat_template_error(tokenizer, context + [{"role": "assistant", "content": "response"}]) \
            if templated and not reason else ""
        reason = TEMPLATE_REJECTS if refused else reason
        problems = [] if reason else response_problems(context, responses, gating)
        kept = [r for i, r in enumerate(responses) if i not in {j for j, _ in problems}]
        where = ""
        if problems and not args.skip_invalid:  # the row's error names its first response at fault
            reason, where = problems[0][1], f"response {problems[0][0]}"
        elif problems and not kept:  # a row left with no response is dropped, under its first response's rule
            reason = problems[0][1]
        templated_prompt = (reason == "special_token_in_content" and isinstance(row_context(row), str)
                            and bool(special_tokens.search(row_context(row))))
        return {"invalid_reason": reason, "invalid_where": where, DROPPED: json.dumps(problems),
                TEMPLATED: templated_prompt, REFUSED: refused, "responses": row["responses"] if reason else kept}

    marked = dataset.map(mark, desc="validating dataset_path")
    responses_dropped = Counter(rule for reason, found in zip(marked["invalid_reason"], marked[DROPPED])
                                if not reason for _, rule in json.loads(found))
    rules = {**ROW_RULES, **{k: v.format(max_length=max_length) for k, v in RESPONSE_RULES.items()},
             TEMPLATE_REJECTS: template_rejects_rule(marked[REFUSED])}
    rows, stats = enforce_validity(marked, rules, args.skip_invalid, "dataset_path",
                                   hint=TEMPLATED_HINT if any(marked[TEMPLATED]) else "")
    if responses_dropped:
        print(f"[dataset_path] dropped {sum(responses_dropped.values())} invalid responses of the rows kept "
              f"(--skip_invalid; each row lists its own in 'dropped_responses'): {count_summary(responses_dropped)}")
    return rows.remove_columns([TEMPLATED, REFUSED]), {**stats, "responses_dropped": dict(responses_dropped)}


def to_json(value) -> str:
    """One output line's JSON: values JSON has no type for (a parquet timestamp, a date) written as strings."""
    return json.dumps(value, ensure_ascii=False, default=str)


def scored_row(row: dict, rewards: Optional[list] = None) -> dict:
    """An output line: the row as read, less the other formats' columns (null in a mixed file), with the responses
    it keeps and, when some were dropped (--skip_invalid), their indices in the row as read ("dropped_responses";
    an input that was itself scored brings its own, which would name other indices); and its rewards, one per kept
    response."""
    kept = {k: v for k, v in row.items()
            if not (k in FORMAT_COLUMNS and v is None) and k not in (DROPPED, "dropped_responses")}
    dropped = json.loads(row.get(DROPPED) or "[]")
    if dropped:
        kept["dropped_responses"] = [i for i, _ in dropped]
    return kept if rewards is None else {**kept, "rewards": rewards}


# The files of a local checkpoint that do not change its rewards: documentation (and hidden files, such as locks).
UNSCORED_SUFFIXES = (".md",)


def scorer_record(args, scorer: RewardScorer) -> dict:
    """What decides the rewards in --output_path: the model (a local directory's files by name, size and time: all
    of them, weights, configs, tokenizer files, chat template and remote code, but documentation; a hub model's
    revision), --max_length and the dtype. A resumed run must match it, or its rows would mix two models."""
    path = Path(args.reward_name_or_path).expanduser()
    if path.is_dir():
        model = str(path.resolve())
        files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir())
                 if f.is_file() and not f.name.startswith(".") and f.suffix not in UNSCORED_SUFFIXES]
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
        def canonical(line: str) -> Optional[str]:  # the row as written, less its rewards; key order aside
            try:
                return json.dumps({**json.loads(line), "rewards": None}, sort_keys=True)
            except (ValueError, TypeError):  # not a JSON object: not a line this script wrote
                return None
        mismatch = canonical(last) != canonical(to_json(scored_row(rows[done - 1])))
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


def score_prompts(scorer: RewardScorer, items: list[tuple[list[dict], list[str]]]) -> list[tuple[list, int]]:
    """(rewards, sequences cut) per (context, responses): the cut count of the whole call rides on its first item,
    since map_across_ranks gathers one result per item. A PM gives a lone response no reward (None): it has no
    opponent to win against."""
    if not items:
        return []
    scores, cut = scorer.response_scores([context for context, _ in items], [responses for _, responses in items])
    if scorer.kind == "pm":
        scores = [[None] if len(s) == 1 else s for s in scores]
    return [(s, cut if i == 0 else 0) for i, s in enumerate(scores)]


def check_finite_rewards(results: list[tuple[list, int]], items: list[tuple[list[dict], list[str]]],
                         first_row: int) -> None:
    """Stop on a NaN or infinite reward before its chunk is written: a NaN compares false, so it would be written
    into the JSON and silently decide the best response and the pair. Names the first such response by its row
    (counted among the rows kept, from first_row) and the start of the row's last context message."""
    for i, ((rewards, _), (context, _)) in enumerate(zip(results, items)):
        bad = [j for j, r in enumerate(rewards) if r is not None and not math.isfinite(r)]
        if bad:
            text = context[-1]["content"] if context else ""
            raise ModelOutputError(f"the reward model gave a NaN or infinite reward to response {bad[0]} of row "
                                   f"{first_row + i} (0-based, of the rows kept), prompt {text_start(text)}; its "
                                   "weights may hold NaN, or it overflows in this dtype (nothing of its "
                                   "--prompts_per_chunk rows was written)")


def best_and_pairs(path: Path, expected: int, threshold: float, counts: dict):
    """For each row of the whole scored file (so a resumed run's earlier rows count once), read as it goes (a file
    larger than memory): (its best response as a best-of-n row, its best-vs-worst pair when the margin is above
    threshold, else None). The first of equal rewards is taken as the best, and as the worst, so ties resolve the
    same way in every run. A lone response is its row's best (with its reward, null from a PM) and makes no pair.
    counts gets rows, pairs, below_margin and one_response; a file of other than expected rows is an error, at its
    end."""
    counts.update(rows=0, pairs=0, below_margin=0, one_response=0)
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            context, responses, _ = parse_row(row)
            rewards = row["rewards"]
            if len(rewards) != len(responses):
                raise RuntimeError(f"{path}: a row has {len(rewards)} rewards for {len(responses)} responses")
            counts["rows"] += 1
            if len(rewards) == 1:
                counts["one_response"] += 1
                alone = context + [{"role": "assistant", "content": responses[0]}]
                yield {"messages": alone, "reward": rewards[0]}, None
                continue
            best = max(range(len(rewards)), key=rewards.__getitem__)
            worst = min(range(len(rewards)), key=rewards.__getitem__)
            chosen = context + [{"role": "assistant", "content": responses[best]}]
            margin = rewards[best] - rewards[worst]
            pair = None
            # threshold >= 0, so equal rewards never make a pair; nor does one text twice (its rewards may differ
            # by batching noise, and such a pair teaches nothing).
            if margin > threshold and responses[best] != responses[worst]:
                counts["pairs"] += 1
                pair = {"chosen": chosen, "rejected": context + [{"role": "assistant", "content": responses[worst]}],
                        "chosen_reward": rewards[best], "rejected_reward": rewards[worst], "margin": margin}
            else:
                counts["below_margin"] += 1
            yield {"messages": chosen, "reward": rewards[best]}, pair
    if counts["rows"] != expected:
        raise RuntimeError(f"{path} holds {counts['rows']} scored rows, expected {expected}")


def main(argv: Optional[list[str]] = None):
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    args = parse_args((ScriptArguments,), argv=argv)[0]
    paths = output_paths(args)
    output = paths["--output_path"]
    state = process_state()
    flag = "--reward_name_or_path"
    with ExitStack() as held:
        # One run writes output at a time, from before it reads what an earlier run left to its last line.
        on_main(state, lambda: str(held.enter_context(output_lock(output))))
        # The data is checked before the model loads, with its tokenizer only: a bad row costs seconds, not minutes.
        kind = checkpoint_kind(args.reward_name_or_path, flag)
        gating = (getattr(AutoConfig.from_pretrained(args.reward_name_or_path), "gating_pattern", None) or None
                  if kind == "armo" else None)
        tokenizer = load_tokenizer(args.reward_name_or_path, flag, args.trust_remote_code)
        with main_process_first(state):  # one rank fills the datasets cache, the others then read it
            rows, stats = load_rows(args, tokenizer, gating, templated=kind != "pm")
        # The PM's own rank split stays off (state=None): the prompts of each chunk are split across the ranks below.
        scorer = RewardScorer.from_pretrained(args.reward_name_or_path, flag, args.max_length, args.batch_size,
                                              args.bf16, args.attn_implementation, args.trust_remote_code,
                                              args.load_pickled_weights, device=state.device, state=None,
                                              max_tokens_per_batch=args.max_tokens_per_batch)
        if gating is not None and scorer.max_length < args.max_length:  # a learned position table lowered it
            with main_process_first(state):
                rows, stats = load_rows(args, scorer.tokenizer, gating, scorer.max_length)

        # Only the main rank reads (and repairs) the output; the others learn where to start, or its error.
        resumed = on_main(state, lambda: resume_point(output, args.overwrite, rows, scorer_record(args, scorer)))

        scored = truncated = 0
        bar = tqdm(total=len(rows), initial=resumed, unit="prompt", desc="scoring",
                   disable=not state.is_main_process)
        with open(output, "a", encoding="utf-8") if state.is_main_process else nullcontext() as out:
            for start in range(resumed, len(rows), args.prompts_per_chunk):
                chunk = rows.select(range(start, min(start + args.prompts_per_chunk, len(rows)))).to_list()
                items = [parse_row(row)[:2] for row in chunk]
                results = map_across_ranks(state, partial(score_prompts, scorer), items)
                check_finite_rewards(results, items, start)  # every rank has the results: all stop together
                if out is not None:
                    out.write("".join(to_json(scored_row(row, rewards)) + "\n"
                                      for row, (rewards, _) in zip(chunk, results)))
                    out.flush()
                    os.fsync(out.fileno())  # a chunk on disk stays there: resuming starts after it
                scored += len(chunk)
                truncated += sum(cut for _, cut in results)
                bar.update(len(chunk))
        bar.close()

        if state.is_main_process:
            counts = {}  # one pass over the scored file per output written, streamed; one to count if none is
            for flag_name, which in (("--best_of_n_path", 0), ("--pairs_path", 1)):
                if flag_name in paths:
                    atomic_write_lines(paths[flag_name], (to_json(derived[which]) + "\n" for derived in best_and_pairs(
                        output, len(rows), args.margin_threshold, counts) if derived[which] is not None))
            if not counts:
                for _ in best_and_pairs(output, len(rows), args.margin_threshold, counts):
                    pass
            dropped = count_summary(stats["invalid"]) or "none"
            responses_dropped = stats["responses_dropped"]
            lone = (" (a PM gives a lone response no reward: null)" if scorer.kind == "pm" and counts["one_response"]
                    else "")
            where = {f: paths.get(f, f"not written (no {f})") for f in ("--best_of_n_path", "--pairs_path")}
            print(f"Scored {args.dataset_path} with {KINDS[scorer.kind]} {args.reward_name_or_path} "
                  f"({state.num_processes} process{'es' if state.num_processes > 1 else ''})\n"
                  f"  prompts read: {stats['read']}, dropped: {stats['read'] - stats['used']} ({dropped}), "
                  f"scored now: {scored}, resumed: {resumed}, truncated sequences: {truncated}, responses "
                  f"dropped: {sum(responses_dropped.values())} ({count_summary(responses_dropped) or 'none'})\n"
                  f"  scored rows: {output}\n  best-of-n rows: {counts['rows']} -> {where['--best_of_n_path']}\n"
                  f"  pairs: {counts['pairs']} -> {where['--pairs_path']}; below the margin ({args.margin_threshold}): "
                  f"{counts['below_margin']}, one response only: {counts['one_response']}{lone}\n"
                  f"  wall time: {time.time() - started:.1f}s")
        finish(state)


if __name__ == "__main__":
    run_cli(main)
