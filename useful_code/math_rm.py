"""Math reward models (math-rm): process (PRM) and outcome (ORM) reward models that are causal LMs answering "+"/"-".

A PRM reads a solution as a multi-turn chat: each step is a user turn (the first led by the problem) and the
assistant answers "+" (the step is right, the solution can still reach the right answer) or "-". An ORM is the same
chat with the whole solution in one user turn and one label. Training puts the loss on the label tokens alone
(upstream's axolotl "train_on_inputs: false"); scoring renders a solution with "+" in every assistant turn, runs
ONE forward and reads P(+) = softmax over the "+"/"-" logits at every label position. Upstream ran one forward per
step over the whole prefix; by causality both read the same logits.

Shared by math-rm/train.py, prm_evaluate.py and orm_evaluate.py: the label tokens, training-row rules and
tokenization, evaluation rows (RLHFlow's best-of-N test sets), step splitting, scoring, step-score aggregation and
the best-of-N / majority-voting / pass@1 arithmetic with its JSON and plot.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from useful_code.cli import UserError
from useful_code.data import load_split
from useful_code.data_parallel import map_across_ranks
from useful_code.defaults import ASSETS
from useful_code.formats import enforce_validity
from useful_code.modeling import load_for_scoring, load_preference_model
from useful_code.scoring import length_sorted_batches, model_device
from useful_code.templates import render_conversations, special_token_pattern, tokenizer_adds_bos, truncate_left

LABELS = ("+", "-")
TOY_MATH = ASSETS / "data" / "toy_math"
TOY_PRM = str(TOY_MATH / "prm")  # splits train and test
TOY_BEST_OF_N = str(TOY_MATH / "best_of_n_test.jsonl")
# Where upstream's test sets cut an answer into steps: Mistral's answers tag each step's end with "ки" (MetaMath /
# Math-Shepherd), Deepseek's separate steps with a blank line.
STEP_SEPARATORS = {"Mistral": "ки", "Deepseek": "\n\n"}
AGGREGATIONS = ("min", "mean", "last", "prod")


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "+" and "-"; both must be single tokens for P(+) to be read off one position."""
    ids = []
    for label in LABELS:
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"the tokenizer encodes the label '{label}' as {len(encoded)} tokens {encoded}; a math "
                            "reward model needs '+' and '-' to be single tokens")
        ids.append(encoded[0])
    return ids[0], ids[1]


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


def validate_training_rows(dataset, tokenizer, skip_invalid: bool, name: str):
    """Check every row against TRAIN_RULES: an invalid row is an error naming it and its rule, or with skip_invalid
    is dropped and counted. Returns (dataset with one 'messages' column of clean {role, content} messages, stats)."""
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

    marked = dataset.map(check, input_columns=column, remove_columns=dataset.column_names, desc=f"validating {name}")
    return enforce_validity(marked, TRAIN_RULES, skip_invalid, name)


def to_outcome(messages: list[dict]) -> list[dict]:
    """An ORM row from a PRM row, as upstream made its ORM data: the steps joined into one user turn, and the last
    label (a solution is right when its last step is), kept."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    steps = [m["content"] for m in messages if m["role"] == "user"]
    label = messages[-1]["content"]
    return head + [{"role": "user", "content": "\n".join(steps)}, {"role": "assistant", "content": label}]


def label_count(messages: list[dict]) -> int:
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
        if not (texts[row].startswith(prefix) and texts[row].startswith(label, start)):
            raise UserError(f"{name}: row {first_row + row}: the chat template does not render the conversation as "
                            "its turns in order (a prefix of it rendered with the generation prompt is not a prefix "
                            "of the whole)")
        position = encodings.char_to_token(row, start)
        if position is None or result[row][0][position] != label_ids[label]:
            found = None if position is None else tokenizer.convert_ids_to_tokens(result[row][0][position])
            raise UserError(f"{name}: row {first_row + row}: the label '{label}' is not a token of its own in "
                            f"context (the tokenizer makes {found!r} of it); this tokenizer cannot be used for a math "
                            "reward model")
        result[row][1].append(position)
    return result


def tokenize_examples(dataset, tokenizer, max_length: int, overlength: str, name: str):
    """input_ids = the templated chat; labels = -100 except on every label token, so the loss is on the "+"/"-"
    answers alone. An example longer than max_length is an error naming the row, or with overlength == 'drop' is
    dropped and counted (a cut would lose the problem or the last labels). Returns (dataset, stats)."""
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

    encoded = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                          desc=f"tokenizing {name}")
    lengths = [len(ids) for ids in encoded["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and overlength == "error":
        raise UserError(
            f"{name}: {len(too_long)} of {len(lengths)} examples are longer than max_length={max_length} tokens "
            f"(first: row {too_long[0]}, {lengths[too_long[0]]} tokens); raise --max_length, or pass "
            "--overlength drop to drop them with a count")
    if too_long:
        encoded = encoded.select(sorted(set(range(len(lengths))) - set(too_long)))
        print(f"[{name}] dropped {len(too_long)} examples longer than max_length={max_length} tokens "
              "(--overlength drop)")
    return encoded, {"dropped_overlength": len(too_long)}


# ============================================================================ evaluation rows

# Rules of one best-of-N problem (RLHFlow's Mistral/Deepseek-GSM8K/MATH500-Test: prompt, answers, label).
EVAL_RULES = {
    "bad_prompt": "prompt must be a non-empty string",
    "bad_answers": "answers must be a non-empty list of strings, each with text besides step tags",
    "bad_labels": "label must be a list of 0/1 (or true/false), one per answer",
    "special_token_in_content": "text must not contain the tokenizer's special tokens (they would forge turns)",
}


def eval_invalid_reason(row: dict, special: re.Pattern) -> str:
    """'' for a valid best-of-N problem, else the first broken rule's key in EVAL_RULES."""
    prompt, answers, labels = row["prompt"], row["answers"], row["label"]
    if not (isinstance(prompt, str) and prompt.strip()):
        return "bad_prompt"
    if not (isinstance(answers, list) and answers and all(
            isinstance(a, str) and a.replace(STEP_SEPARATORS["Mistral"], "").strip() for a in answers)):
        return "bad_answers"
    if not (isinstance(labels, list) and len(labels) == len(answers) and all(
            isinstance(y, (bool, int)) and y in (0, 1) for y in labels)):
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
    return [step.strip() for step in answer.split(STEP_SEPARATORS[model_type]) if step.strip()]


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
    text = answer.replace(" ки", "").replace("ки", "") if model_type == "Mistral" else answer
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
    text = answer.replace("ки", "")
    found = _boxed(text)
    if found is None:
        stated = re.findall(r"answer is:?\s*([^\n]+)", text, flags=re.IGNORECASE)
        found = stated[-1] if stated else None
    if found is None:
        return None
    normalized = re.sub(r"\s+", "", found).strip("$").rstrip(".")
    return normalized or None


# ============================================================================ scoring


class StepScorer:
    """P(+) at every label position of templated chats: one forward per conversation, batched by length.

    Sequences are padded on the left with position ids counted from each one's first real token (as unpadded), and
    logits are computed only at the positions read (a boolean logits_to_keep), so a batch never holds
    [batch, length, vocabulary] logits."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, state=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.state = state  # a data_parallel.process_state(): the conversations are split across its ranks
        self.plus, self.minus = label_token_ids(tokenizer)
        self.truncated = 0  # sequences cut to max_length so far (counted, reported by the caller)

    @classmethod
    def from_pretrained(cls, path: str, flag: str = "--reward_name_or_path", bf16: bool = True,
                        attn_implementation: str = "auto", trust_remote_code: bool = False,
                        pickled_weights: bool = False, device=None, device_map=None, **kwargs):
        """Load a PRM/ORM checkpoint (or hub name): a causal LM, onto device (default: the GPU if there is one)."""
        model, tokenizer = load_for_scoring(load_preference_model, path, flag, bf16, attn_implementation,
                                            trust_remote_code, device=device, device_map=device_map,
                                            pickled_weights=pickled_weights)
        return cls(model, tokenizer, **kwargs)

    def truncate(self, encoded: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """Sequences over max_length cut from the left (BOS kept), counted in self.truncated. A label whose read
        position was cut off gets position -1 (its step scores NaN); the last label is always kept."""
        keep_first = tokenizer_adds_bos(self.tokenizer)
        out = []
        for ids, positions in encoded:
            cut = len(ids) - self.max_length
            if cut <= 0:
                out.append((ids, positions))
                continue
            self.truncated += 1
            first_kept = cut + 1 if keep_first else cut  # the first original index still there (BOS aside)
            out.append((truncate_left(ids, self.max_length, keep_first),
                        [p - cut if p - 1 >= first_kept else -1 for p in positions]))
        return out

    @torch.inference_mode()
    def label_probs(self, encoded: list[tuple[list[int], list[int]]], progress: bool = False) -> list[list[float]]:
        """P(+) (softmax over the "+"/"-" logits) predicted for each label position of each sequence, read one
        position before it; NaN for a position of -1."""
        device = model_device(self.model)
        pad_id = self.tokenizer.pad_token_id
        out: list[list[float]] = [[] for _ in encoded]
        for chunk in length_sorted_batches([ids for ids, _ in encoded], self.batch_size, progress=progress):
            width = max(len(encoded[i][0]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            keep = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                ids, positions = encoded[i]
                offset = width - len(ids)
                input_ids[row, offset:] = torch.tensor(ids)
                attention_mask[row, offset:] = 1
                keep[row, [offset + p - 1 for p in positions if p > 0]] = True
            # Left padding: positions must count from each sequence's first real token, as when unpadded.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=keep.to(device),
                                use_cache=False).logits
            if logits.dim() == 3:  # a model that computed every position anyway
                logits = logits[keep.to(logits.device)]
            probs = torch.softmax(logits[:, [self.plus, self.minus]].float(), dim=-1)[:, 0].cpu().tolist()
            # The kept positions come row by row, each row's in order: hand them back in that order.
            start = 0
            for i in chunk:
                positions = encoded[i][1]
                n = sum(p > 0 for p in positions)
                row_probs = iter(probs[start:start + n])
                out[i] = [next(row_probs) if p > 0 else math.nan for p in positions]
                start += n
        return out

    def score_conversations(self, conversations: list[list[dict]], progress: bool = True, name: str = "data",
                            chunk_size: int = 4096) -> list[list[float]]:
        """P(+) at each assistant turn of each conversation, the conversations split across the ranks of state.
        Each rank encodes and scores its slice chunk by chunk, so token ids are never held for all solutions at once
        (best-of-1024 on MATH500 is half a million solutions); self.truncated counts the cuts on every rank."""

        def score(part: list) -> list[tuple[list[float], bool]]:
            results = []
            for start in range(0, len(part), chunk_size):
                encoded = encode_labeled(self.tokenizer, part[start:start + chunk_size], name)
                cut = [len(ids) > self.max_length for ids, _ in encoded]
                results += zip(self.label_probs(self.truncate(encoded), progress), cut)
            return results

        before = self.truncated
        scored = map_across_ranks(self.state, score, conversations)
        self.truncated = before + sum(cut for _, cut in scored)
        return [probs for probs, _ in scored]


# ============================================================================ best-of-N arithmetic


def aggregate(step_scores: list[float], how: str) -> float:
    """One score for a solution from its steps' P(+): the weakest step (min, Math-Shepherd's choice), the mean
    (upstream's), the last step's, or the product (the chance that every step is right). Steps whose score is NaN
    (cut off by truncation) are left out."""
    values = [s for s in step_scores if not math.isnan(s)]
    if how not in AGGREGATIONS:
        raise UserError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}, not '{how}'")
    if not values:
        return math.nan
    if how == "min":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    if how == "last":
        return values[-1]
    return math.prod(values)


def n_values(num_n: int, most: int) -> list[int]:
    """N = 1, 2, 4, ... up to min(num_n, most), that limit included."""
    limit = min(num_n, most)
    ns = [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]
    return ns + ([limit] if ns[-1] != limit else [])


def best_pick(scores: list[float]) -> int:
    """The index of the highest score, the first on a tie (upstream's list.index(max)); NaN never wins."""
    values = [-math.inf if math.isnan(s) else s for s in scores]
    return values.index(max(values))


def majority_pick(final_answers: list[Optional[str]]) -> Optional[int]:
    """The first candidate whose final answer is the most common (a tie goes to the answer seen first); None when no
    candidate states one."""
    counts = Counter(a for a in final_answers if a is not None)
    if not counts:
        return None
    most = max(counts.values())
    return next(i for i, a in enumerate(final_answers) if a is not None and counts[a] == most)


def best_of_n_curve(scores: list[list[float]], labels: list[list[int]], final_answers: list[list[Optional[str]]],
                    ns: list[int]) -> list[dict]:
    """For each N, over the problems: accuracy of the top-scored of the first N candidates (best_of_n), of the most
    common final answer among them (majority; a problem where none states an answer counts as wrong), of the first
    candidate (pass_at_1), and whether any of them is right (oracle, the ceiling)."""
    curve = []
    for n in ns:
        best, majority, first, oracle = [], [], [], []
        for s, y, a in zip(scores, labels, final_answers):
            best.append(y[best_pick(s[:n])])
            pick = majority_pick(a[:n])
            majority.append(0 if pick is None else y[pick])
            first.append(y[0])
            oracle.append(int(any(y[:n])))
        curve.append({"n": n, "best_of_n": float(np.mean(best)), "majority": float(np.mean(majority)),
                      "pass_at_1": float(np.mean(first)), "oracle": float(np.mean(oracle))})
    return curve


def format_curve(curve: list[dict]) -> str:
    """The curve as a small table."""
    lines = [f"{'N':>5} {'best-of-N':>10} {'majority':>9} {'pass@1':>7} {'oracle':>7}"]
    lines += [f"{p['n']:>5} {p['best_of_n']:>10.4f} {p['majority']:>9.4f} {p['pass_at_1']:>7.4f} {p['oracle']:>7.4f}"
              for p in curve]
    return "\n".join(lines)


def plot_curve(curve: list[dict], path, title: str) -> str:
    """Accuracy against N (log2 axis): best-of-N, majority voting and pass@1."""
    from useful_code.training_plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [p["n"] for p in curve]
    for key, label, style in (("best_of_n", "best-of-N (reward model)", "o-"), ("majority", "majority voting", "s--"),
                              ("pass_at_1", "pass@1", ":")):
        ax.plot(ns, [p[key] for p in curve], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return save_figure(fig, path)


# ============================================================================ the evaluation scripts' flags and outputs


@dataclass
class BestOfNArguments:
    """Flags of prm_evaluate.py and orm_evaluate.py: upstream's (reward_name_or_path, dataset, output_dir, num_n,
    model_type) plus the split, batching, truncation and loading options of the project's eval scripts."""

    reward_name_or_path: str = field(default="RLHFlow/Llama3.1-8B-PRM-Mistral-Data",
                                     metadata={"help": "Hub name or checkpoint directory."})
    dataset: str = field(default=TOY_BEST_OF_N, metadata={
        "help": "Best-of-N problems (prompt, answers, label): hub name (e.g. RLHFlow/Mistral-GSM8K-Test) or local "
                "file/directory. Default: the bundled toy set."})
    split: str = field(default="test", metadata={"help": "Dataset split (a single local file is its own split)."})
    output_dir: str = field(default="outputs/math_best_of_n", metadata={
        "help": "Directory for best_of_n.json, best_of_n.png and scores.jsonl."})
    num_n: int = field(default=1024, metadata={"min": 1, "help": "Largest N: candidates used per problem."})
    model_type: str = field(default="Mistral", metadata={
        "choices": tuple(STEP_SEPARATORS), "help": "Step format of the answers: Mistral (steps end in 'ки') or "
                                                   "Deepseek (steps separated by a blank line)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Solutions per forward pass (length-sorted)."})
    max_length: int = field(default=4096, metadata={"min": 8, "help": "Longer inputs are cut from the left "
                                                                      "(counted; steps cut off are not scored)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid problems (counted) instead of failing."})
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})


def write_results(output_dir, curve: list[dict], summary: dict, problems, step_scores: list[list[list[float]]],
                  scores: list[list[float]], title: str) -> dict:
    """best_of_n.json (the curve and the run's summary), best_of_n.png and scores.jsonl (each problem with its
    candidates' scores, step scores where a PRM gave them, and final answers). Returns the JSON's content."""
    from useful_code.checkpoints import atomic_write_text

    out = Path(output_dir)
    results = {**summary, "curve": curve}
    atomic_write_text(out / "best_of_n.json", json.dumps(results, indent=2) + "\n")
    plot_curve(curve, out / "best_of_n.png", title)
    lines = []
    for row, steps, solution_scores in zip(problems, step_scores, scores):
        n = len(solution_scores)
        lines.append(json.dumps({"prompt": row["prompt"], "label": row["label"][:n], "scores": solution_scores,
                                 "step_scores": steps,
                                 "final_answers": [extract_final_answer(a) for a in row["answers"][:n]]}))
    atomic_write_text(out / "scores.jsonl", "\n".join(lines) + "\n")
    return results


def load_best_of_n_inputs(args: "BestOfNArguments", state):
    """What both best-of-N scripts start from: the scorer on this rank's device (its sequences split across the
    ranks of state) and the validated problems with their first --num_n candidates. Returns (scorer, problems,
    candidates per problem, stats)."""
    scorer = StepScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, pickled_weights=args.load_pickled_weights, device=state.device,
        batch_size=args.batch_size, max_length=args.max_length, state=state)
    with state.main_process_first():  # one rank fills the datasets cache, the others then read it
        problems, stats = validate_eval_rows(load_split(args.dataset, args.split, "--dataset", args.skip_invalid),
                                             scorer.tokenizer, args.skip_invalid, "--dataset")
    return scorer, problems, [row[: args.num_n] for row in problems["answers"]], stats
