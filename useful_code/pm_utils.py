"""Pairwise preference models (pair-pm): the prompt format, label tokens, batched both-order scoring and the
knock-out tournament, shared by pair-pm/process_pair_data.py, pair-pm/train.py, pair-pm/rank_responses.py and
useful_code/eval_reward_bench_pm.py.

A preference model is a causal LM. It reads one user message,
    "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \\n",
rendered with the model's own chat template and its generation prompt, and answers with one token, "A" or "B".
P(A preferred) is the softmax of the "A" and "B" logits at the answer position. Training puts the loss on that
answer token alone, and scoring reads the logits at the same position, so both see the same token sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from useful_code import rm_utils

PM_PROMPT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"
LABELS = ("A", "B")


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
    """Token ids of "A" and "B"; both must be single tokens for P(A) to be read off one position."""
    ids = []
    for label in LABELS:
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise rm_utils.UserError(
                f"the tokenizer encodes the label '{label}' as {len(encoded)} tokens {encoded}; a preference model "
                "needs 'A' and 'B' to be single tokens")
        ids.append(encoded[0])
    return ids[0], ids[1]


def encode_pm_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids up to the answer position: the chat template with its generation prompt, exactly one BOS."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    texts = rm_utils.render_conversations(tokenizer, conversations, add_generation_prompt=True)
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


PM_INVALID_REASONS = {
    "not_a_pm_example": "a PM example is two messages, user (the prompt) then assistant (the label)",
    "bad_label": "the assistant's answer must be 'A' or 'B'",
    "empty_prompt": "the prompt must not be empty",
}


def pm_invalid_reason(messages) -> str:
    """'' for a valid PM-format example, else the broken rule's key in PM_INVALID_REASONS."""
    if not (isinstance(messages, list) and len(messages) == 2 and all(isinstance(m, dict) for m in messages)
            and [m.get("role") for m in messages] == ["user", "assistant"]):
        return "not_a_pm_example"
    if messages[1].get("content") not in LABELS:
        return "bad_label"
    if not (messages[0].get("content") or "").strip():
        return "empty_prompt"
    return ""


def is_pm_format(dataset) -> bool:
    """Whether a dataset is already in PM format: a 'messages' column whose first row ends in an "A"/"B" answer
    (anything else is read as standard-format preference pairs)."""
    if "messages" not in dataset.column_names or len(dataset) == 0:
        return False
    first = dataset[0]["messages"]
    return isinstance(first, list) and bool(first) and first[-1].get("content") in LABELS


def validate_pm_examples(dataset, skip_invalid: bool, name: str):
    """Check every PM-format row; fail naming the row and rule, or drop and count with skip_invalid."""
    marked = dataset.map(lambda messages: {"invalid_reason": pm_invalid_reason(messages)},
                         input_columns="messages", desc=f"validating {name}")
    marked, stats = rm_utils.enforce_validity(marked, PM_INVALID_REASONS, skip_invalid, name)
    return marked, {"format": "pm", **stats}


def pairs_to_pm(pairs, seed: int):
    """Validated standard-format pairs -> PM examples ('messages' only), chosen's position balanced and seeded."""
    positions = balanced_positions(len(pairs), seed)

    def to_pm(row, index):
        return {"messages": pm_messages(row["chosen"][:-1], row["chosen"][-1]["content"],
                                        row["rejected"][-1]["content"], positions[index])}

    return pairs.map(to_pm, with_indices=True, remove_columns=pairs.column_names, desc="formatting PM examples")


def tokenize_pm_examples(dataset, tokenizer, max_length: int, overlength: str, name: str):
    """input_ids = prompt up to the answer position + the label token; labels = -100 except on the label token,
    so the loss is on the answer alone (upstream's train_on_inputs: false). An example longer than max_length
    is an error naming the row, or dropped and counted with overlength == 'drop' (cutting it would lose either
    the context's start or the answer). Returns (dataset, stats)."""
    if overlength not in ("error", "drop"):
        raise rm_utils.UserError(f"--overlength must be 'error' or 'drop' for a PM, not '{overlength}'")
    label_ids = label_token_ids(tokenizer)

    def encode(batch):
        prompts = encode_pm_prompts(tokenizer, [m[0]["content"] for m in batch["messages"]])
        labels = [label_ids[LABELS.index(m[1]["content"])] for m in batch["messages"]]
        return {"input_ids": [p + [label] for p, label in zip(prompts, labels)],
                "labels": [[-100] * len(p) + [label] for p, label in zip(prompts, labels)]}

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenizing {name}")
    lengths = [len(ids) for ids in encoded["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and overlength == "error":
        raise rm_utils.UserError(
            f"{name}: {len(too_long)} of {len(lengths)} examples are longer than max_length={max_length} tokens "
            f"(first: row {too_long[0]}, {lengths[too_long[0]]} tokens); raise --max_length, or pass "
            "--overlength drop to drop them with a count")
    if too_long:
        keep = sorted(set(range(len(lengths))) - set(too_long))
        encoded = encoded.select(keep)
        print(f"[{name}] dropped {len(too_long)} examples longer than max_length={max_length} tokens "
              "(--overlength drop)")
    return encoded, {"dropped_overlength": len(too_long)}


# ----------------------------------------------------------------------------------------------- scoring


@dataclass
class Match:
    """One knock-out comparison: indices into the candidate list and P(first beats second), both orders averaged."""

    first: int
    second: int
    prob_first: float

    @property
    def winner(self) -> int:
        """The index that goes through; an exact tie goes to the earlier candidate."""
        return self.first if self.prob_first >= 0.5 else self.second


@dataclass
class TournamentResult:
    """Outcome of a knock-out tournament over n candidates (n - 1 matches)."""

    winner: int
    matches: list[Match] = field(default_factory=list)
    rounds: int = 0


class PairPreferenceScorer:
    """Scores pairs with a preference model: P(first response preferred), each pair in both orders, batched.

    All sequences of a call (both orders of every pair) are sorted by length and padded on the left, so one
    forward pass serves many pairs and only the last position's logits are computed (logits_to_keep=1)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, temperature: float = 1.0):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.temperature = temperature
        self.token_a, self.token_b = label_token_ids(tokenizer)
        self.truncated = 0  # sequences cut to max_length so far (counted, reported by the caller)

    @classmethod
    def from_pretrained(cls, path: str, flag: str = "--reward_name_or_path", bf16: bool = True,
                        attn_implementation: str = "auto", trust_remote_code: bool = False, **kwargs):
        """Load a PM checkpoint (or hub name) onto the GPU if there is one."""
        tokenizer = rm_utils.load_tokenizer(path, flag, trust_remote_code)
        model = load_preference_model(path, flag, tokenizer, rm_utils.resolve_dtype(bf16), attn_implementation,
                                      trust_remote_code)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device).eval(), tokenizer, **kwargs)

    @torch.no_grad()
    def label_logits(self, sequences: list[list[int]], progress: bool = False) -> np.ndarray:
        """[n, 2] float32 logits of "A" and "B" at the last position of each token sequence."""
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        out = np.zeros((len(sequences), 2), dtype=np.float32)
        for chunk in rm_utils.length_sorted_batches(sequences, self.batch_size, progress=progress):
            width = max(len(sequences[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = sequences[i]
                input_ids[row, width - len(seq):] = torch.tensor(seq)
                attention_mask[row, width - len(seq):] = 1
            # Left padding: positions must count from each sequence's first real token, as when unpadded.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=1, use_cache=False).logits[:, -1]
            out[chunk] = logits[:, [self.token_a, self.token_b]].float().cpu().numpy()
        return out

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of PM prompts, cut from the left to max_length (counted in self.truncated)."""
        keep_first = rm_utils.tokenizer_adds_bos(self.tokenizer)
        sequences = []
        for ids in encode_pm_prompts(self.tokenizer, prompts):
            self.truncated += len(ids) > self.max_length
            sequences.append(rm_utils.truncate_left(ids, self.max_length, keep_first))
        return sequences

    def prob_first_preferred(self, contexts: list[list[dict]], first: list[str], second: list[str],
                             progress: bool = False) -> dict[str, np.ndarray]:
        """P(first preferred over second) for each pair: as response A, as response B, and their mean."""
        n = len(contexts)
        prompts = [build_pm_prompt(c, a, b) for c, a, b in zip(contexts, first, second)]
        prompts += [build_pm_prompt(c, b, a) for c, a, b in zip(contexts, first, second)]
        logits = self.label_logits(self.encode(prompts), progress) / self.temperature
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        as_a = probs[:n, 0]  # first shown as A: P(answer A)
        as_b = probs[n:, 1]  # first shown as B: P(answer B)
        return {"first_as_A": as_a, "first_as_B": as_b, "mean": (as_a + as_b) / 2}

    def score_pairs(self, pairs, progress: bool = True) -> dict[str, np.ndarray]:
        """prob_first_preferred for standard-format pairs (chosen/rejected message lists): P(chosen preferred)."""
        return self.prob_first_preferred([c[:-1] for c in pairs["chosen"]], [c[-1]["content"] for c in pairs["chosen"]],
                                         [r[-1]["content"] for r in pairs["rejected"]], progress)

    def knockout(self, context: list[dict], responses: list[str]) -> TournamentResult:
        """Best of n responses by a knock-out tournament: n - 1 comparisons (each in both orders), one batch
        per round. With an odd number left, the last candidate passes the round unplayed."""
        return self.knockout_many([context], [responses])[0]

    def knockout_many(self, contexts: list[list[dict]], candidates: list[list[str]]) -> list[TournamentResult]:
        """Run one tournament per prompt; the matches of a round across all prompts share forward passes."""
        if any(len(c) == 0 for c in candidates):
            raise rm_utils.UserError("a tournament needs at least one candidate response per prompt")
        alive = [list(range(len(c))) for c in candidates]
        results = [TournamentResult(winner=-1) for _ in candidates]
        while any(len(a) > 1 for a in alive):
            pairings = [(p, alive[p][k], alive[p][k + 1]) for p in range(len(alive))
                        for k in range(0, len(alive[p]) - 1, 2)]
            probs = self.prob_first_preferred([contexts[p] for p, _, _ in pairings],
                                              [candidates[p][i] for p, i, _ in pairings],
                                              [candidates[p][j] for p, _, j in pairings])["mean"]
            survivors = [[] for _ in alive]
            for (p, i, j), prob in zip(pairings, probs):
                match = Match(i, j, float(prob))
                results[p].matches.append(match)
                survivors[p].append(match.winner)
            for p, a in enumerate(alive):
                if len(a) > 1:
                    results[p].rounds += 1
                if len(a) % 2:
                    survivors[p].append(a[-1])  # the bye
            alive = survivors
        for result, a in zip(results, alive):
            result.winner = a[0]
        return results


def load_preference_model(name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
                          trust_remote_code: bool = False):
    """Load a causal LM as a preference model, aligned with the tokenizer's vocabulary and pad token."""
    from transformers import AutoModelForCausalLM

    return rm_utils.load_model(AutoModelForCausalLM, name, flag, tokenizer, dtype, attn_implementation,
                               trust_remote_code)
