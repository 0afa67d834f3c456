"""Pairwise preference models (pair-pm): the prompt format, label tokens, PM-format validation, conversion of
standard pairs and tokenization, shared by pair-pm/process_pair_data.py, pair-pm/train.py and pm_scoring.py.

A preference model is a causal LM. It reads one user message,
    "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \\n",
rendered with the model's own chat template and its generation prompt, and answers with one token, "A" or "B".
P(A preferred) is the softmax of the "A" and "B" logits at the answer position. Training puts the loss on that
answer token alone, and scoring reads the logits at the same position, so both see the same token sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from useful_code.output_files import check_output_file
from useful_code.cli import UserError
from useful_code.formats import enforce_validity, map_rows
from useful_code.templates import encode_conversations, enforce_max_length, single_token_ids

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")  # an output path ending so is a file, anything else a directory
PM_PROMPT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"
LABELS = ("A", "B")
TIE_LABEL = "Same"  # RRM's augmented ties (pair-pm/RRM): trained on, never scored (scoring compares A with B)
ANSWERS = (*LABELS, TIE_LABEL)


def format_context(messages: list[dict]) -> str:
    """Render a conversation's context with upstream's plain "<turn> user / <turn> assistant" template.

    Byte-identical to what transformers' Jinja renderer (trim_blocks, no kept trailing newline) makes of
    upstream's template for a user/assistant conversation; a leading system message renders as "<turn> system"."""
    turns = "".join(f"\n<turn> {m['role']}\n {m['content']}" for m in messages)
    return f"\n{turns}\n"


def build_pm_prompt(context: list[dict], response_a: str, response_b: str) -> str:
    """The user message a preference model reads: context and the two responses in the order A, B."""
    return PM_PROMPT_TEMPLATE.format(context=format_context(context), response_A=response_a, response_B=response_b)


def pm_messages(context: list[dict], chosen: str, rejected: str, chosen_position: int) -> list[dict]:
    """One training example in upstream's layout: the prompt as a user message and the label as the answer."""
    responses = (chosen, rejected) if chosen_position == 0 else (rejected, chosen)
    return [
        {"role": "user", "content": build_pm_prompt(context, *responses)},
        {"role": "assistant", "content": LABELS[chosen_position]},
    ]


def balanced_positions(n: int, seed: int) -> list[int]:
    """Where chosen goes (0 = A, 1 = B) for n examples: a seeded shuffle of equal halves, so the labels are
    balanced to within one (upstream draws each independently, which leaves the balance to chance)."""
    positions = np.array([i % 2 for i in range(n)])
    np.random.default_rng(seed).shuffle(positions)
    return positions.tolist()


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "A" and "B": single tokens, for P(A) to be read off one position."""
    return single_token_ids(tokenizer, LABELS, "a preference model")


def encode_pm_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids up to the answer position: the chat template with its generation prompt, exactly one BOS."""
    return encode_conversations(tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                add_generation_prompt=True)


PM_INVALID_REASONS = {
    "not_a_pm_example": "a PM example is two messages, user (the prompt) then assistant (the label)",
    "bad_label": "the assistant's answer must be 'A', 'B' or 'Same' (an RRM tie)",
    "empty_prompt": "the prompt must not be empty",
}


def pm_invalid_reason(messages) -> str:
    """'' for a valid PM-format example, else the broken rule's key in PM_INVALID_REASONS."""
    if not (isinstance(messages, list) and len(messages) == 2 and all(isinstance(m, dict) for m in messages)
            and [m.get("role") for m in messages] == ["user", "assistant"]):
        return "not_a_pm_example"
    if messages[1].get("content") not in ANSWERS:
        return "bad_label"
    if not (messages[0].get("content") or "").strip():
        return "empty_prompt"
    return ""


def is_pm_format(dataset) -> bool:
    """Whether a dataset is already in PM format: a 'messages' column, no chosen/rejected pair, and a row that ends in
    an "A"/"B"/"Same" answer; its other rows are then validated as PM examples, a broken first one too (anything else
    is read as standard-format preference pairs)."""
    if "messages" not in dataset.column_names or {"chosen", "rejected"} <= set(dataset.column_names):
        return False
    for batch in dataset.select_columns(["messages"]).iter(batch_size=1024):  # stops at the first answer: row 0
        for messages in batch["messages"]:
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                    and messages[-1].get("content") in ANSWERS:
                return True
    return False


def validate_pm_examples(dataset, skip_invalid: bool, name: str):
    """Check every PM-format row; fail naming the row and rule, or drop and count with skip_invalid."""
    # Batched (map_rows): row by row, this map took 2.9 s per 100K examples, batched 0.9 s (HH-RLHF, one thread).
    marked = map_rows(dataset, lambda messages: {"invalid_reason": pm_invalid_reason(messages)}, ["messages"],
                      desc=f"validating {name}")
    marked, stats = enforce_validity(marked, PM_INVALID_REASONS, skip_invalid, name)
    return marked, {"format": "pm", **stats}


def pairs_to_pm(pairs, seed: int):
    """Validated standard-format pairs -> PM examples ('messages' only), chosen's position balanced and seeded."""
    positions = balanced_positions(len(pairs), seed)

    def to_pm(chosen, rejected, indices):
        return {"messages": [pm_messages(c[:-1], c[-1]["content"], r[-1]["content"], positions[i])
                             for c, r, i in zip(chosen, rejected, indices)]}

    # Batched: row by row, this map took 3.2 s per 100K pairs, batched 1.5 s (HH-RLHF, one thread).
    return pairs.map(to_pm, input_columns=["chosen", "rejected"], with_indices=True, batched=True,
                     remove_columns=pairs.column_names, desc="formatting PM examples")


def tokenize_pm_examples(dataset, tokenizer, max_length: int, overlength: str, name: str,
                         num_proc: Optional[int] = None):
    """input_ids = prompt up to the answer position + the answer's tokens (one for A/B, those of 'Same' for an RRM
    tie); labels = -100 except on them, so the loss is on the answer alone (upstream's train_on_inputs: false). An
    example longer than max_length is an error naming the first by its text, or dropped and counted with overlength
    == 'drop' (cutting it would lose either the context's start or the answer). num_proc: datasets.map's processes.
    Returns (dataset, stats)."""
    if overlength not in ("error", "drop"):
        raise UserError(f"--overlength must be 'error' or 'drop' for a PM, not '{overlength}'")
    label_ids = label_token_ids(tokenizer)
    answer_ids = {**{label: [i] for label, i in zip(LABELS, label_ids)},
                  TIE_LABEL: tokenizer.encode(TIE_LABEL, add_special_tokens=False)}

    def encode(batch):
        prompts = encode_pm_prompts(tokenizer, [m[0]["content"] for m in batch["messages"]])
        answers = [answer_ids[m[1]["content"]] for m in batch["messages"]]
        return {"input_ids": [p + a for p, a in zip(prompts, answers)],
                "labels": [[-100] * len(p) + a for p, a in zip(prompts, answers)]}

    encoded = dataset.map(encode, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                          desc=f"tokenizing {name}")
    encoded, dropped = enforce_max_length(encoded, max_length, overlength, name, tokenizer)
    return encoded, {"dropped_overlength": dropped}


def check_dataset_output(path: str, flag: str, inputs: tuple[str, ...]) -> None:
    """Before any work, for a script that writes PM data (process_pair_data.py, RRM): a .json/.jsonl/.parquet path is a
    file, checked by check_output_file; any other is a `datasets` directory, which must not be a file nor an input
    however it is spelled (./d is d: save_to_disk cannot overwrite the dataset being read)."""
    if Path(path).suffix in FILE_SUFFIXES:
        check_output_file(path, flag, inputs=inputs)
        return
    target = Path(path).expanduser().resolve()
    if target.is_file():
        raise UserError(f"{flag}: {path} is a file; a path without .json/.jsonl/.parquet is a datasets directory")
    same = [p for p in inputs if p and Path(p).expanduser().resolve() == target]
    if same:
        raise UserError(f"{flag}: {path} is an input of this run ({same[0]}); give a new directory")
