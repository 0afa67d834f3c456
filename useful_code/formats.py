"""Preference-data formats and the rules every row must follow.

Three input formats become one standard format (chosen/rejected message lists): standard messages, a prompt with
its two responses (RewardBench's strings, TRL's explicit-prompt messages) and raw Anthropic HH-RLHF text. Every row
is validated; an invalid row is an error naming its index and rule, or with skip_invalid a counted and printed drop.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Iterable, Optional

from datasets import Features, Value

from useful_code.cli import UserError

ROLES = ("system", "user", "assistant")
# The datasets type of a cleaned message list: maps that may return [] for a bad row declare it, else a first write
# batch of only bad rows fixes the column as a list of nulls and the next batch fails to cast.
MESSAGES_FEATURE = [{"role": Value("string"), "content": Value("string")}]

# Rules of one conversation (ArmoRM's multi-objective rows, and each side of a pair).
CONVERSATION_RULES = {
    "not_a_message_list": "a conversation must be a non-empty list of {role, content} messages",
    "unknown_role": "every role must be 'system', 'user' or 'assistant'",
    "empty_content": "no message may have empty content",
    "roles_not_alternating": "roles must alternate user/assistant, starting with user (one leading system message allowed)",
    "last_not_assistant": "the last message must be the assistant's",
}
INVALID_REASONS = {
    **CONVERSATION_RULES,
    "not_a_message_list": "chosen/rejected must be non-empty lists of {role, content} messages",
    "context_mismatch": "chosen and rejected must share the same context (every message but the last)",
    "identical_responses": "chosen and rejected must differ (their last messages are the same)",
    "bad_prompt": "prompt must be a non-empty string or a list of {role, content} messages",
    "unparseable_hh": "string chosen/rejected without a prompt are read as HH-RLHF text, which must be a sequence "
                      "of '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns (else give a prompt column, or "
                      "chosen/rejected as message lists)",
}

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_conversation(text: str) -> Optional[list[dict]]:
    """Parse an Anthropic HH-RLHF string ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages; None if the
    text does not start with a turn marker."""
    if not isinstance(text, str):
        return None
    pieces = _HH_TURN.split(text)
    # split() yields [prefix, speaker, content, speaker, content, ...]; a valid text has no prefix.
    if len(pieces) < 3 or pieces[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(pieces[1::2], pieces[2::2])]


def hh_prompt_messages(prompt: str) -> Optional[list[dict]]:
    """A prompt string of HH-RLHF turns ending with the empty assistant turn to answer (Dahoas/rm-static's layout:
    "\\n\\nHuman: ...\\n\\nAssistant:") as its messages, that last turn left off; None for any other text."""
    messages = parse_hh_conversation(prompt)
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages = messages[:-1]
    return messages or None


def _starts_with_assistant(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict) \
        and messages[0].get("role") == "assistant"


def check_pair_columns(column_names: Iterable[str]) -> None:
    """Preference data must have 'chosen' and 'rejected' columns."""
    columns = set(column_names)
    if not {"chosen", "rejected"} <= columns:
        raise UserError(f"preference data needs 'chosen' and 'rejected' columns (found: {', '.join(sorted(columns))})")


def detect_format(row: dict, read_hh: bool = True) -> str:
    """Name one row's format: 'messages' (standard), 'prompt' (a prompt and two responses: RewardBench's strings, or
    TRL's explicit-prompt messages, the responses' lists starting with the assistant's turn) or 'hh' (raw HH-RLHF).
    Decided per row, so a malformed row is that row's error and never changes how the others are read. read_hh:
    string responses of HH-RLHF turns are whole HH-RLHF conversations even beside a prompt (a copy of their start)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        explicit = row.get("prompt") is not None and _starts_with_assistant(chosen) and _starts_with_assistant(rejected)
        return "prompt" if explicit else "messages"
    if read_hh and row.get("prompt") is not None and parse_hh_conversation(chosen) is not None:
        return "hh"
    # A file mixing formats gives every row the 'prompt' column, null where the row had none: a null prompt beside
    # HH-RLHF turns is an HH-RLHF row, beside anything else a RewardBench row missing its prompt.
    if "prompt" in row and (row["prompt"] is not None or not _HH_TURN.search(str(row.get("chosen") or ""))):
        return "prompt"
    return "hh"


def clean_messages(messages: Any) -> Optional[list[dict]]:
    """The messages as plain {role, content} dicts (extra keys dropped), or None if they are not a non-empty list
    of messages with string role and content."""
    if not isinstance(messages, list) or not messages:
        return None
    cleaned = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content")
        if not isinstance(content, str):
            return None
        cleaned.append({"role": message["role"], "content": content})
    return cleaned


def to_standard_pair(row: dict, fmt: str, read_hh: bool = True) -> tuple[list[dict], list[dict], str]:
    """Convert one row to (chosen messages, rejected messages, invalid reason or ''). read_hh: a prompt string of
    HH-RLHF turns is read as those turns (hh_prompt_messages), its responses stripped as HH-RLHF text's are."""
    if fmt == "hh":
        chosen, rejected = parse_hh_conversation(row["chosen"]), parse_hh_conversation(row["rejected"])
        if chosen is None or rejected is None:
            return [], [], "unparseable_hh"
    elif fmt == "prompt":
        prompt, responses = row["prompt"], [row["chosen"], row["rejected"]]
        hh_turns = hh_prompt_messages(prompt) if read_hh else None
        if isinstance(prompt, list):
            context = clean_messages(prompt)
        elif isinstance(prompt, str) and prompt.strip():
            context = hh_turns or [{"role": "user", "content": prompt}]
        else:
            return [], [], "bad_prompt"
        if all(isinstance(r, str) for r in responses):
            responses = [[{"role": "assistant", "content": r.strip() if hh_turns else r}] for r in responses]
        else:  # TRL's explicit-prompt messages: the responses' own turns
            responses = [clean_messages(r) for r in responses]
        if context is None or None in responses:
            return [], [], "not_a_message_list"
        chosen, rejected = context + responses[0], context + responses[1]
    else:
        chosen, rejected = clean_messages(row["chosen"]), clean_messages(row["rejected"])
        if chosen is None or rejected is None:
            return [], [], "not_a_message_list"
    return chosen, rejected, validate_pair(chosen, rejected)


def validate_conversation(messages: list[dict]) -> str:
    """'' for a valid conversation of clean messages, else the first broken rule's key in CONVERSATION_RULES."""
    if any(m["role"] not in ROLES for m in messages):
        return "unknown_role"
    if any(not m["content"].strip() for m in messages):
        return "empty_content"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns or not all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
        return "roles_not_alternating"
    if turns[-1]["role"] != "assistant":
        return "last_not_assistant"
    return ""


def validate_pair(chosen: list[dict], rejected: list[dict]) -> str:
    """Return '' for a valid pair, else the first broken rule's key in INVALID_REASONS."""
    # Rules are checked in order over both sides, so a pair reports the same rule whichever side breaks it first.
    reasons = {validate_conversation(chosen), validate_conversation(rejected)} - {""}
    for reason in CONVERSATION_RULES:
        if reason in reasons:
            return reason
    if chosen[:-1] != rejected[:-1]:
        return "context_mismatch"
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return "identical_responses"
    return ""


def map_rows(dataset, function, input_columns: list[str], desc: str, num_proc: Optional[int] = None,
             remove_columns: Optional[list[str]] = None, features=None):
    """dataset.map of function(*one row's values of input_columns) -> {column: value}, run over batches of rows
    (column lists in and out) with the same rows, columns and values as a row-by-row map."""
    # Batched: row by row, each of these maps took 1-3 s more per 100K pairs (measured on HH-RLHF, one thread).
    def batch(*columns) -> dict:
        rows = [function(*values) for values in zip(*columns)]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    return dataset.map(batch, input_columns=input_columns, batched=True, num_proc=num_proc,
                       remove_columns=remove_columns, features=features, desc=desc)


PAIR_VALUE_RULES = {
    "bad_margin": "margin must be a finite number (the reward gap the pair asks for)",
    "bad_weight": "weight must be a finite number >= 0 (the pair's share of the loss)",
}


def validate_pair_values(dataset, column: str, skip_invalid: bool, name: str):
    """Check a per-pair number column a loss reads (margin, weight): missing is an error; a row whose value breaks
    PAIR_VALUE_RULES is an error naming it, or with skip_invalid is dropped and counted. Returns (dataset, stats)."""
    if column not in dataset.column_names:
        raise UserError(f"{name}: this loss needs a '{column}' column (found: {', '.join(dataset.column_names)})")

    def reason(value) -> dict:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = number and (column != "weight" or value >= 0)
        return {"invalid_reason": "" if ok else f"bad_{column}"}

    marked = map_rows(dataset, reason, [column], desc=f"checking {name}'s {column}")
    return enforce_validity(marked, PAIR_VALUE_RULES, skip_invalid, name)


def standardize_pairs(dataset, skip_invalid: bool, name: str, read_hh: bool = True, allow_identical: bool = False):
    """Convert a preference dataset to the standard format (chosen/rejected message lists) and validate
    every row. An invalid row is an error naming its index and rule, unless skip_invalid, in which case it
    is dropped and counted. read_hh: HH-RLHF turns in a prompt string, or in responses beside a prompt, are read as
    turns (off for RewardBench, whose prompt is the user's text as reward-bench reads it). allow_identical: a pair
    whose responses are the same is kept (a benchmark scores it as a tie). Returns (dataset, stats) with
    stats = {'format', 'read', 'invalid': {reason: n}, 'used'}."""
    check_pair_columns(dataset.column_names)
    source_columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]

    def convert(*values):
        row = dict(zip(source_columns, values))
        fmt = detect_format(row, read_hh)
        chosen, rejected, reason = to_standard_pair(row, fmt, read_hh)
        if allow_identical and reason == "identical_responses":
            reason = ""
        return {"chosen": chosen, "rejected": rejected, "invalid_reason": reason, "source_format": fmt}

    # Typed output (MESSAGES_FEATURE), which also keeps a message's extra keys (e.g. 'name') from being carried as
    # nulls.
    features = Features({**{c: f for c, f in dataset.features.items() if c not in source_columns},
                         "chosen": MESSAGES_FEATURE, "rejected": MESSAGES_FEATURE, "invalid_reason": Value("string"),
                         "source_format": Value("string")})
    converted = map_rows(dataset, convert, source_columns, desc=f"validating {name}", remove_columns=source_columns,
                         features=features)
    formats = Counter(converted["source_format"])
    converted, stats = enforce_validity(converted.remove_columns("source_format"), INVALID_REASONS, skip_invalid, name)
    # One name for uniform data (the usual case), else every format seen with its count.
    fmt = ", ".join(f"{f}: {n}" for f, n in formats.most_common()) if len(formats) > 1 else next(iter(formats), "messages")
    return converted, {"format": fmt, **stats}


def validate_conversations(dataset, skip_invalid: bool, name: str):
    """Check every 'messages' conversation against CONVERSATION_RULES: an invalid row is an error naming it, or with
    skip_invalid is dropped and counted. Returns (dataset, stats)."""
    if "messages" not in dataset.column_names:
        raise UserError(f"{name}: needs a 'messages' column (a conversation ending with the assistant's turn)")

    def reason(messages) -> dict:
        cleaned = clean_messages(messages)
        return {"invalid_reason": validate_conversation(cleaned) if cleaned else "not_a_message_list"}

    marked = map_rows(dataset, reason, ["messages"], desc=f"validating {name}")
    return enforce_validity(marked, CONVERSATION_RULES, skip_invalid, name)


def enforce_validity(dataset, rules: dict[str, str], skip_invalid: bool, name: str, hint: str = ""):
    """Act on an 'invalid_reason' column ('' = valid, else a key of rules): fail naming the first invalid rows
    and their rules, or, with skip_invalid, drop them and print the count per reason. An optional 'invalid_where'
    column names the part of a row at fault ('response 1': 'row 5 response 1 (rule)'); hint, when given, ends the
    error and the drop's note. Both columns are removed. Returns (dataset, stats) with stats = {'read',
    'invalid': {reason: n}, 'used'}."""
    reasons = dataset["invalid_reason"]
    wheres = dataset["invalid_where"] if "invalid_where" in dataset.column_names else [""] * len(reasons)
    invalid = Counter(r for r in reasons if r)
    stats = {"read": len(dataset), "invalid": dict(invalid)}
    hint = f"; {hint}" if hint else ""
    if invalid and not skip_invalid:
        first = [(i, w, r) for i, (w, r) in enumerate(zip(wheres, reasons)) if r][:5]
        examples = ", ".join(f"row {i}{' ' + w if w else ''} ({r})" for i, w, r in first)
        broken = "; ".join(f"{r}: {rules[r]}" for r in invalid)
        raise UserError(
            f"{name}: {sum(invalid.values())} of {len(dataset)} rows are invalid ({count_summary(invalid)}); "
            f"first: {examples} (0-based). Rules: {broken}{hint}. "
            f"Fix the data, or pass --skip_invalid to drop them with a count."
        )
    if invalid:
        dataset = dataset.filter(lambda reason: not reason, input_columns="invalid_reason")
        print(f"[{name}] dropped {sum(invalid.values())} of {len(reasons)} invalid rows (--skip_invalid): "
              f"{count_summary(invalid)}{hint}")
    stats["used"] = len(dataset)
    return dataset.remove_columns([c for c in ("invalid_reason", "invalid_where") if c in dataset.column_names]), stats


def text_start(text: str, length: int = 40) -> str:
    """The start of a text, quoted (cut texts end in ...): names a row in a message by its prompt or problem."""
    return repr(text[:length] + ("..." if len(text) > length else ""))


def count_summary(counts: dict) -> str:
    """'reason: n, ...', the most frequent first."""
    return ", ".join(f"{reason}: {n}" for reason, n in Counter(counts).most_common())
