"""Tokenizers and chat templates: a pad token that is never EOS, exactly one BOS, left truncation, and the
tokenized pairs every BT script trains and scores on."""

from __future__ import annotations

from transformers import AutoTokenizer

from useful_code.cli import UserError


def load_tokenizer(name: str, flag: str, trust_remote_code: bool = False):
    """Load a tokenizer, pad on the right, and make sure it has a pad token distinct from EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag}: could not load tokenizer '{name}' ({str(err).splitlines()[0]}); "
                        f"pass a local model directory with {flag}") from None
    if tokenizer.chat_template is None:
        raise UserError(f"{flag}: tokenizer of '{name}' has no chat template; use an instruct/chat model or set one")
    # Right padding keeps position ids identical to the unpadded sequence, so a reward does not depend on
    # what it was batched with; the classifier reads the last non-pad token either way.
    tokenizer.padding_side = "right"
    ensure_pad_token(tokenizer)
    return tokenizer


# Unused special tokens that model families reserve; taking one avoids growing the embedding matrix.
_RESERVED_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]", "<|pad|>")


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token that is not EOS; return True if a new token was added to the vocab.

    A sequence classifier reads its reward at the last non-pad token, so padding with EOS makes it skip the
    EOS that ends every conversation and score the wrong token (upstream's identical Llama-3 rewards)."""
    eos_ids = {tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in _RESERVED_PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in eos_ids and vocab[candidate] != tokenizer.bos_token_id:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return True


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether calling the tokenizer on text prepends BOS by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def render_conversations(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Apply the chat template as upstream does: the BOS the template writes is removed when the tokenizer
    adds its own, so every sequence starts with exactly one BOS."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)
    bos = tokenizer.bos_token
    if bos and tokenizer_adds_bos(tokenizer):
        texts = [t[len(bos):] if t.startswith(bos) else t for t in texts]
    return texts


def encode_conversations(tokenizer, conversations: list[list[dict]],
                         add_generation_prompt: bool = False) -> list[list[int]]:
    """Token ids of each conversation, templated, untruncated."""
    texts = render_conversations(tokenizer, conversations, add_generation_prompt)
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def truncate_left(ids: list[int], max_length: int, keep_first: bool) -> list[int]:
    """Keep the last max_length tokens (where a reward, embedding or answer is read), and with keep_first the
    first token (the BOS) too."""
    if len(ids) <= max_length:
        return ids
    return ids[:1] + ids[len(ids) - max_length + 1:] if keep_first else ids[len(ids) - max_length:]


def truncate_all(tokenizer, sequences: list[list[int]], max_length: int) -> tuple[list[list[int]], int]:
    """Every sequence cut to its last max_length tokens, keeping the BOS the tokenizer adds; returns them and how
    many were cut."""
    keep_first = tokenizer_adds_bos(tokenizer)
    cut = sum(len(s) > max_length for s in sequences)
    return [truncate_left(s, max_length, keep_first) for s in sequences], cut


def tokenize_pairs(dataset, tokenizer, max_length: int, overlength: str, name: str):
    """Add chosen_input_ids / rejected_input_ids / length columns. Over-long sequences are truncated from
    the left (upstream's rule: the response end, where the reward is read, is kept) or dropped when
    overlength == 'drop'; either way the count is printed. Returns (dataset, stats)."""
    if overlength not in ("truncate", "drop"):
        raise UserError(f"--overlength must be 'truncate' or 'drop', not '{overlength}'")

    def encode(batch):
        chosen = encode_conversations(tokenizer, batch["chosen"])
        rejected = encode_conversations(tokenizer, batch["rejected"])
        too_long = [max(len(c), len(r)) > max_length for c, r in zip(chosen, rejected)]
        return {
            "chosen_input_ids": [ids[-max_length:] for ids in chosen],
            "rejected_input_ids": [ids[-max_length:] for ids in rejected],
            "length": [min(max(len(c), len(r)), max_length) for c, r in zip(chosen, rejected)],
            "overlength": too_long,
        }

    encoded = dataset.map(encode, batched=True, desc=f"tokenizing {name}")
    n_over = sum(encoded["overlength"])
    stats = {"overlength": n_over, "truncated": 0, "dropped_overlength": 0}
    if n_over and overlength == "drop":
        encoded = encoded.filter(lambda over: not over, input_columns="overlength")
        stats["dropped_overlength"] = n_over
        print(f"[{name}] dropped {n_over} pairs longer than max_length={max_length} tokens (--overlength drop)")
    elif n_over:
        stats["truncated"] = n_over
        print(f"[{name}] truncated {n_over} pairs longer than max_length={max_length} tokens from the left")
    return encoded.remove_columns("overlength"), stats
