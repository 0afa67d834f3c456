"""Math reward models (math-rm), their data: process (PRM) and outcome (ORM) reward models are causal LMs answering
"+"/"-". A PRM reads a solution as a multi-turn chat: each step is a user turn (the first led by the problem) and the
assistant answers "+" (the step is right, the solution can still reach the right answer) or "-". An ORM is the same
chat with the whole solution in one user turn and one label. Here: the label tokens, training-row rules and
tokenization (the loss on the label tokens alone, upstream's axolotl "train_on_inputs: false"), evaluation rows
(RLHFlow's best-of-N test sets), step splitting and final answers."""

from __future__ import annotations

import re
from typing import Optional

from datasets import Features, Value

from useful_code.cli import UserError
from useful_code.defaults import ASSETS
from useful_code.formats import MESSAGES_FEATURE, enforce_validity, map_rows
from useful_code.templates import (
    TEMPLATE_REJECTS,
    TemplateRefusal,
    enforce_max_length,
    reject_untemplatable,
    render_conversations,
    single_token_ids,
    special_token_pattern,
)

LABELS = ("+", "-")
TOY_MATH = ASSETS / "data" / "toy_math"
TOY_PRM = str(TOY_MATH / "prm")  # splits train and test
TOY_BEST_OF_N = str(TOY_MATH / "best_of_n_test.jsonl")
# Where upstream's test sets cut an answer into steps: Mistral's answers tag each step's end with "ки" (MetaMath /
# Math-Shepherd), Deepseek's separate steps with a blank line. The tag counts only as a tag, at a line's end and not
# the end of a Cyrillic word ("книги", "Никита" are words, not steps; upstream splits at "ки\n").
MISTRAL_TAG = "ки"
STEP_SEPARATORS = {"Mistral": re.compile(r"(?<![А-Яа-яЁё])ки(?=[ \t]*(?:\n|\Z))"), "Deepseek": re.compile(r"\n\n")}


def remove_step_tags(answer: str) -> str:
    """The answer without Mistral's step tags (and the space before each)."""
    return re.sub(r"[ \t]?" + STEP_SEPARATORS["Mistral"].pattern, "", answer)


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "+" and "-": single tokens, for P(+) to be read off one position."""
    return single_token_ids(tokenizer, LABELS, "a math reward model")


# ============================================================================ training rows

# Rules of one training row: a chat whose user turns are steps and whose assistant turns are their labels.
TRAIN_RULES = {
    "not_a_message_list": "a row must be a non-empty list of {role, content} messages",
    "unknown_role": "every role must be 'user' or 'assistant' (one leading 'system' message allowed)",
    "empty_step": "no step (user turn) may be empty",
    "roles_not_alternating": "roles must alternate user (a step) / assistant (its label), starting with user",
    "no_labels": "a row must label at least one step (an assistant turn)",
    "last_not_assistant": "every step must be followed by its label: the last message must be the assistant's",
    "bad_label": "every label (assistant turn) must be '+' or '-'",
    "special_token_in_content": "no message may contain one of the tokenizer's special tokens as text (it would "
                                "forge a turn or a label)",
}
CONVERSATION_COLUMNS = ("conversations", "messages")  # upstream's RLHFlow PRM/ORM data, and this project's format


def training_invalid_reason(messages) -> str:
    """'' for a valid training row, else the first broken rule's key in TRAIN_RULES."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        return "not_a_message_list"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] not in ("user", "assistant") for m in turns):
        return "unknown_role"
    if any(m["role"] == "user" and not m["content"].strip() for m in turns):
        return "empty_step"
    if not all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
        return "roles_not_alternating"
    if len(turns) < 2:
        return "no_labels"
    if turns[-1]["role"] != "assistant":
        return "last_not_assistant"
    if any(m["role"] == "assistant" and m["content"].strip() not in LABELS for m in turns):
        return "bad_label"
    return ""


def validate_training_rows(dataset, tokenizer, skip_invalid: bool, name: str, num_proc: Optional[int] = None):
    """Check every row against TRAIN_RULES: an invalid row is an error naming it and its rule, or with skip_invalid
    is dropped and counted (num_proc: datasets.map's processes). Returns (dataset with one 'messages' column of clean
    {role, content} messages, stats)."""
    column = next((c for c in CONVERSATION_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise UserError(f"{name}: needs a 'conversations' (or 'messages') column of steps and '+'/'-' labels "
                        f"(found: {', '.join(dataset.column_names)})")
    special = special_token_pattern(tokenizer)

    def check(messages) -> dict:
        reason = training_invalid_reason(messages)
        if not reason and any(special.search(m["content"]) for m in messages):
            reason = "special_token_in_content"
        clean = [{"role": m["role"], "content": m["content"].strip() if m["role"] == "assistant" else m["content"]}
                 for m in messages] if not reason else []
        return {"messages": clean, "invalid_reason": reason}

    # Batched (map_rows): row by row, this map took 3.6 s per 100K rows, batched 2.1 s (toy PRM rows, one thread).
    marked = map_rows(dataset, check, [column], desc=f"validating {name}", num_proc=num_proc,
                      remove_columns=dataset.column_names,
                      features=Features({"messages": MESSAGES_FEATURE, "invalid_reason": Value("string")}))
    return enforce_validity(marked, TRAIN_RULES, skip_invalid, name)


def to_outcome(messages: list[dict]) -> list[dict]:
    """An ORM row from a PRM row, as upstream made its ORM data: the steps joined into one user turn, and the last
    label (a solution is right when its last step is), kept."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    steps = [m["content"] for m in messages if m["role"] == "user"]
    label = messages[-1]["content"]
    return head + [{"role": "user", "content": "\n".join(steps)}, {"role": "assistant", "content": label}]


def label_count(messages: list[dict]) -> int:
    """How many labels a training conversation carries: one per assistant turn."""
    return sum(m["role"] == "assistant" for m in messages)


# ============================================================================ tokenization


def encode_labeled(tokenizer, conversations: list[list[dict]], name: str = "data",
                   first_row: int = 0) -> list[tuple[list[int], list[int]]]:
    """(token ids, positions of the label tokens) of each conversation: the chat template with exactly one BOS, as
    both training and scoring see it, and one position per assistant turn.

    A label's position is found where the template puts it (the length of the conversation up to that turn,
    rendered with the generation prompt) and must be a single "+"/"-" token there: a tokenizer that merged the label
    with its neighbours would train and score a different token. Fails naming the row (counted from first_row)
    otherwise."""
    label_ids = dict(zip(LABELS, label_token_ids(tokenizer)))
    conversations = [list(messages) for messages in conversations]  # a datasets Column is not a list
    if not conversations:
        return []
    texts = render_conversations(tokenizer, conversations)
    prefixes, owners = [], []
    for row, messages in enumerate(conversations):
        for j, message in enumerate(messages):
            if message["role"] == "assistant":
                prefixes.append(messages[:j])
                owners.append((row, message["content"].strip()))
    prefix_texts = render_conversations(tokenizer, prefixes, add_generation_prompt=True)
    encodings = tokenizer(texts, add_special_tokens=True)
    result = [(ids, []) for ids in encodings["input_ids"]]
    for (row, label), prefix in zip(owners, prefix_texts):
        start = len(prefix)
        if not texts[row].startswith(prefix):
            raise UserError(f"{name}: row {first_row + row}: the chat template does not render the conversation as "
                            "its turns in order (a prefix of it rendered with the generation prompt is not a prefix "
                            "of the whole)")
        if not texts[row].startswith(label, start):  # Qwen3: an empty think block before the last answer only
            raise UserError(f"{name}: row {first_row + row}: the chat template writes {texts[row][start:start + 30]!r} "
                            f"where the generation prompt ends, not the label {label!r}: one forward would not read "
                            "each step as its own prefix does; train with a chat template that writes the label right "
                            "after the generation prompt (math-rm/train.py --chat_template)")
        position = encodings.char_to_token(row, start)
        if position is None or result[row][0][position] != label_ids[label]:
            found = None if position is None else tokenizer.convert_ids_to_tokens(result[row][0][position])
            raise UserError(f"{name}: row {first_row + row}: the label '{label}' is not a token of its own in "
                            f"context (the tokenizer makes {found!r} of it); this tokenizer cannot be used for a math "
                            "reward model")
        result[row][1].append(position)
    return result


def tokenize_examples(dataset, tokenizer, max_length: int, overlength: str, name: str,
                      num_proc: Optional[int] = None, skip_invalid: bool = False):
    """input_ids = the templated chat; labels = -100 except on every label token, so the loss is on the "+"/"-"
    answers alone. An example longer than max_length is an error naming the first by its text, or with overlength ==
    'drop' is dropped and counted (a cut would lose the problem or the last labels). num_proc: datasets.map's
    processes (placing the labels renders every step's prefix: about 400 rows/s on one core). A row the chat
    template refuses is an error naming it, or with skip_invalid dropped and counted. Returns (dataset, stats)."""
    if overlength not in ("error", "drop"):
        raise UserError(f"--overlength must be 'error' or 'drop' for a math reward model, not '{overlength}'")

    def encode(batch, indices):
        encoded = encode_labeled(tokenizer, batch["messages"], name, first_row=indices[0] if indices else 0)
        labels = []
        for ids, positions in encoded:
            masked = [-100] * len(ids)
            for p in positions:
                masked[p] = ids[p]
            labels.append(masked)
        return {"input_ids": [ids for ids, _ in encoded], "labels": labels}

    def tokenize(rows):
        return rows.map(encode, batched=True, with_indices=True, num_proc=num_proc, remove_columns=rows.column_names,
                        desc=f"tokenizing {name}")

    try:
        encoded, refused = tokenize(dataset), 0
    except TemplateRefusal:  # Gemma's template and a system message: name the rows, or drop them (skip_invalid)
        dataset, refused = reject_untemplatable(dataset, tokenizer, ("messages",), skip_invalid, name)
        encoded = tokenize(dataset)
    encoded, dropped = enforce_max_length(encoded, max_length, overlength, name, tokenizer)
    return encoded, {"dropped_overlength": dropped, **({TEMPLATE_REJECTS: refused} if refused else {})}


# ============================================================================ evaluation rows

# Rules of one best-of-N problem (RLHFlow's Mistral/Deepseek-GSM8K/MATH500-Test: prompt, answers, label).
EVAL_RULES = {
    "bad_prompt": "prompt must be a non-empty string",
    "bad_answers": "answers must be a non-empty list of strings, each with text besides step tags",
    "bad_labels": "label must be a list of 0/1 (or true/false, 0.0/1.0), one per answer",
    "special_token_in_content": "text must not contain the tokenizer's special tokens (they would forge turns)",
}


def eval_invalid_reason(row: dict, special: re.Pattern) -> str:
    """'' for a valid best-of-N problem, else the first broken rule's key in EVAL_RULES."""
    prompt, answers, labels = row["prompt"], row["answers"], row["label"]
    if not (isinstance(prompt, str) and prompt.strip()):
        return "bad_prompt"
    if not (isinstance(answers, list) and answers and all(
            isinstance(a, str) and remove_step_tags(a).strip() for a in answers)):
        return "bad_answers"
    if not (isinstance(labels, list) and len(labels) == len(answers) and all(
            isinstance(y, (bool, int, float)) and y in (0, 1) for y in labels)):  # upstream: label == 1
        return "bad_labels"
    if special.search(prompt) or any(special.search(a) for a in answers):
        return "special_token_in_content"
    return ""


def validate_eval_rows(dataset, tokenizer, skip_invalid: bool, name: str):
    """Check every problem against EVAL_RULES (an error naming the row, or with skip_invalid a counted drop).
    upstream's README calls the label column 'labels' and its code 'label': either is read."""
    if "label" not in dataset.column_names and "labels" in dataset.column_names:
        dataset = dataset.rename_column("labels", "label")
    missing = {"prompt", "answers", "label"} - set(dataset.column_names)
    if missing:
        raise UserError(f"{name}: best-of-N data needs columns prompt, answers and label (missing: "
                        f"{', '.join(sorted(missing))})")
    special = special_token_pattern(tokenizer)
    marked = dataset.map(lambda row: {"invalid_reason": eval_invalid_reason(row, special)}, desc=f"validating {name}")
    dataset, stats = enforce_validity(marked, EVAL_RULES, skip_invalid, name)
    if len(dataset) == 0:
        raise UserError(f"{name}: no valid problems left to evaluate")
    return dataset.map(lambda labels: {"label": [int(y) for y in labels]}, input_columns="label"), stats


def split_steps(answer: str, model_type: str) -> list[str]:
    """The steps of an answer: cut at the model type's step separator, stripped, empty pieces dropped (upstream
    kept the last step's "ки" tag with Mistral answers and passed empty steps on with Deepseek's)."""
    return [step.strip() for step in STEP_SEPARATORS[model_type].split(answer) if step.strip()]


def prm_conversation(prompt: str, steps: list[str]) -> list[dict]:
    """A solution as the PRM reads it: the problem and first step, then one user turn per step, each answered "+"
    (a placeholder: the model's P(+) is read where it stands)."""
    turns = []
    for k, step in enumerate(steps):
        turns += [{"role": "user", "content": f"{prompt} {step}" if k == 0 else step},
                  {"role": "assistant", "content": "+"}]
    return turns


def orm_conversation(prompt: str, answer: str, model_type: str) -> list[dict]:
    """A solution as the ORM reads it: problem and whole answer in one user turn (Mistral's step tags removed,
    as upstream did), answered "+"."""
    text = remove_step_tags(answer) if model_type == "Mistral" else answer
    return [{"role": "user", "content": f"{prompt} {text.strip()}"}, {"role": "assistant", "content": "+"}]


def _boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...}, braces balanced; None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(answer: str) -> Optional[str]:
    """The final answer a candidate states, for majority voting: the last \\boxed{...} (Deepseek), else what follows
    the last "The answer is" (MetaMath/Mistral), normalized (spaces, "$" and a final "." dropped); None if neither."""
    text = remove_step_tags(answer)
    found = _boxed(text)
    if found is None:
        stated = re.findall(r"answer is:?\s*([^\n]+)", text, flags=re.IGNORECASE)
        found = stated[-1] if stated else None
    if found is None:
        return None
    # the sentence's "." first: "$18$." is 18, as "18." is
    normalized = re.sub(r"\s+", "", found).rstrip(".").strip("$").rstrip(".")
    return normalized or None
