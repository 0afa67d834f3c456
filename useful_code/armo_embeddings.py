"""ArmoRM's embeddings: the frozen reward model's final hidden state at each conversation's last token and at its
gating position (the end of the last user turn), batched, without autograd; and the prepare stages' shared flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Callable, Optional

import numpy as np
import torch

from useful_code.cli import ModelOutputError, UserError
from useful_code.defaults import DEFAULT_MODEL
from useful_code.modeling_armo_rm import find_gating_positions
from useful_code.packing import packed_hidden_states, packed_rows, padding_free_ready, prefix_sharing_pays
from useful_code.scoring import DEFAULT_SCORING_TOKENS, length_sorted_batches, model_device, token_budget_field
from useful_code.templates import chat_template_error, render_conversations


@dataclass
class PrepareArguments:
    """Flags both prepare stages share: upstream's model, sharding and device, plus batching and the output."""

    model_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Reward model (its transformer is used)."})
    n_shards: int = field(default=1, metadata={"min": 1})
    shard_idx: int = field(default=1, metadata={"min": 1, "help": "1-based, as upstream."})
    device: int = field(default=0, metadata={"help": "GPU index (the CPU when there is no GPU)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Default: ./armo_data/embeddings/<model>."})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "Sequences per padded forward."})
    max_tokens_per_batch: int = token_budget_field()
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    bf16: bool = field(default=True)
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})


# Probe messages of gating_pattern: distinctive words that tokenize apart from any template's markers (no leading or
# trailing whitespace for a template to trim, no marker characters), each found once in a rendered probe. The second
# turn ends a question with '?' and starts an answer with a common word, which a tokenizer may merge with a space the
# template writes before it (Mistral's '[/INST] '): what a response can absorb is not part of the pattern.
_GATE_SYSTEM, _GATE_TURNS = "Zqx0 system note", ("Zqx1 question", "Zqx2 answer", "Zqx3 question?", "the Zqx4 answer")


def _gate_separators(tokenizer, conversation: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The token ids of the templated conversation (as encode_conversations makes them) and, per user turn followed by
    an assistant turn, the token span (start, end) between them: from the first token that starts after the user's
    content to the last before the token holding the assistant's first character. A UserError when the template does
    not write a message's content as it is."""
    text = render_conversations(tokenizer, [conversation])[0]
    encoding = tokenizer(text, add_special_tokens=True)
    ids, located, at = encoding["input_ids"], [], 0
    for message in conversation:
        at = text.find(message["content"], at)
        if at < 0:
            raise UserError(f"the chat template does not write a {message['role']} message's text as it is (the probe "
                            f"{message['content']!r} is missing from {text!r}), so ArmoRM's gating position (the end "
                            "of the last user turn) cannot be located")
        located.append((message["role"], at, at + len(message["content"])))
        at += len(message["content"])
    turns = [(user_end, assistant_start) for (role, _, user_end), (next_role, assistant_start, _)
             in pairwise(located) if (role, next_role) == ("user", "assistant")]
    if not getattr(tokenizer, "is_fast", False):  # no offsets: the tokens the text up to each place shares with all
        return ids, [tuple(_shared_prefix(ids, tokenizer(text[:c], add_special_tokens=True)["input_ids"])
                           for c in turn) for turn in turns]
    chars = [encoding.token_to_chars(t) for t in range(len(ids))]  # None for a token the tokenizer adds (BOS)
    return ids, [(next(t for t, c in enumerate(chars) if c is not None and c.start >= user_end),
                  next(t for t, c in enumerate(chars) if c is not None and c.end > assistant_start))
                 for user_end, assistant_start in turns]


def _shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def gating_pattern(tokenizer) -> list[int]:
    """Token ids that end a user turn and open the assistant's, read off conversations the chat template renders (not
    its generation prompt, which a rendered assistant turn may not contain: DeepSeek-R1's '<think>\\n', Phi-3's EOS):
    the tokens between the user's content and the assistant's that every user-then-assistant turn of probe
    conversations starts with (two one-turn ones, then with a system message and with two turns unless the template
    refuses those), checked to be last found where their last user turn ends. For Llama-3 this is
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n and for Gemma-2 <end_of_turn>\\n<start_of_turn>model\\n,
    upstream's hard-coded patterns; its first token is where the prompt embedding is read. A template whose
    conversations hold no such pattern, or hold it again after the last user turn, is a one-line UserError."""
    user, answer, user2, answer2 = ({"role": r, "content": c} for r, c in zip(("user", "assistant") * 2, _GATE_TURNS))
    probes = [[user, answer], [user2, answer2]]
    refused = chat_template_error(tokenizer, probes[0])
    if refused:
        raise UserError(f"the chat template refuses a plain user-then-assistant conversation ({refused}), so ArmoRM's "
                        "gating position (the end of the last user turn) cannot be located")
    for optional in ([{"role": "system", "content": _GATE_SYSTEM}, user, answer], [user, answer, user2, answer2]):
        if not chat_template_error(tokenizer, optional):  # Gemma-2 refuses a system message: that data is refused too
            probes.append(optional)
    rendered = [_gate_separators(tokenizer, p) for p in probes]
    separators = [ids[s:e] for ids, spans in rendered for s, e in spans]
    pattern = separators[0]
    for separator in separators[1:]:
        pattern = pattern[:_shared_prefix(pattern, separator)]
    advice = ("so ArmoRM's gating position (the end of the last user turn) cannot be located; use a chat model whose "
              "template marks the assistant's turn")
    if not pattern:
        shown = " or ".join(dict.fromkeys(repr(tokenizer.decode(s)) for s in separators))
        raise UserError(f"the chat template writes no marker that opens every assistant turn after a user message "
                        f"(between the two it writes {shown}), {advice}")
    for ids, spans in rendered:
        found = [i for i in range(len(ids) - len(pattern) + 1) if ids[i:i + len(pattern)] == pattern]
        if not found or found[-1] != spans[-1][0]:
            raise UserError(f"what the chat template writes between a user message and the assistant's "
                            f"({tokenizer.decode(pattern)!r}) occurs again after the last user turn (in "
                            f"{tokenizer.decode(ids)!r}), {advice}")
    return pattern


def holds_pattern(ids: list[int], pattern) -> bool:
    """Whether the token sequence contains pattern as a contiguous run."""
    if len(ids) < len(pattern):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ids), len(pattern))
    return bool((windows == np.asarray(pattern)).all(axis=1).any())


def check_gating_sequences(tokenizer, sequences: list[list[int]], pattern, name: Callable[[int], str],
                           cut_to: Optional[int] = None, was_cut: Optional[list[bool]] = None) -> None:
    """Every sequence must hold the gating pattern (the end of a user turn and the start of the assistant's), where
    ArmoRM reads the prompt: one that does not (a tokenizer can merge the template's last marker token with the
    response's first characters, e.g. a newline; or, was_cut[i], the cut from the left to cut_to tokens took its user
    turn) is a UserError naming name(i) and the rule, before any forward (the model would fail the whole batch with a
    ValueError naming a batch row)."""
    for i, ids in enumerate(sequences):
        if not holds_pattern(ids, pattern):
            why = (f"after the cut from the left to max_length={cut_to} tokens, its user turn is gone (shorten it)"
                   if was_cut and was_cut[i] else "its user turn and the assistant's response do not meet as the "
                   f"chat template writes them ({tokenizer.decode(ids)[:200]!r})")
            raise UserError(f"{name(i)} does not hold the gating pattern {tokenizer.decode(pattern)!r} (tokens "
                            f"{np.asarray(pattern).tolist()}) that ArmoRM reads the prompt at: {why} "
                            "(no_user_turn_for_gating)")


@torch.inference_mode()
def embed(model, tokenizer, sequences: list[list[int]], batch_size: int, gating_pattern_ids=None,
          progress: bool = True, max_tokens_per_batch: int = DEFAULT_SCORING_TOKENS,
          name: Callable[[int], str] = "sequence {} to embed".format) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final-layer hidden state at each sequence's last token, and (with gating_pattern_ids) at its gating
    position; packed without padding up to max_tokens_per_batch tokens per forward where the model allows
    (packing.enable_padding_free), else batched by length (longest first) with right padding. Returns CPU tensors in
    the model's dtype. A sequence without the gating pattern is a UserError naming name(its index)
    (check_gating_sequences)."""
    if gating_pattern_ids is not None:
        check_gating_sequences(tokenizer, sequences, gating_pattern_ids, name)
    device = model_device(model)
    hidden_size = model.config.hidden_size
    last = torch.zeros(len(sequences), hidden_size, dtype=model.dtype)
    gated = torch.zeros(len(sequences), hidden_size, dtype=model.dtype) if gating_pattern_ids else None
    if max_tokens_per_batch and padding_free_ready(model):  # packed rows, read at each sequence's positions
        packed = packed_rows(sequences, max_tokens_per_batch, device, "embedding", progress,
                             share_prefix=prefix_sharing_pays(model))
        for chunk, row, inputs in packed:
            hidden = packed_hidden_states(model, inputs)[0]
            last[chunk] = hidden[row.last_positions.to(device)].cpu()
            if gated is not None:
                within = torch.cat([find_gating_positions(torch.tensor([sequences[i]]), gating_pattern_ids)
                                    for i in chunk])
                gated[chunk] = hidden[row.token_positions(within).to(device)].cpu()
    else:
        for chunk in length_sorted_batches(sequences, batch_size, "embedding", progress):
            batch = tokenizer.pad({"input_ids": [sequences[i] for i in chunk]}, padding=True, return_tensors="pt")
            input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            rows = torch.arange(len(chunk), device=device)
            last[chunk] = hidden[rows, mask.sum(-1) - 1].cpu()
            if gated is not None:
                gated[chunk] = hidden[rows, find_gating_positions(input_ids, gating_pattern_ids)].cpu()
    # Written to disk, a NaN embedding stops stage 1's ridge fit with a scikit-learn traceback, long after.
    bad = ~torch.isfinite(last).all(-1)
    if gated is not None:
        bad |= ~torch.isfinite(gated).all(-1)
    if bad.any():
        raise ModelOutputError(f"the model gave NaN or infinite hidden states for {int(bad.sum())} of {len(sequences)} "
                               f"sequences (first: {name(int(bad.nonzero()[0]))}); its weights may hold NaN, or it "
                               "overflows in this dtype")
    return last, gated
