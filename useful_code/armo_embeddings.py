"""ArmoRM's embeddings: the frozen reward model's final hidden state at each conversation's last token and at its
gating position (the end of the last user turn), batched, without autograd; and the prepare stages' shared flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from jinja2.exceptions import TemplateError

from useful_code.cli import UserError
from useful_code.defaults import DEFAULT_MODEL
from useful_code.formats import enforce_validity
from useful_code.modeling_armo_rm import find_gating_positions
from useful_code.packing import packed_hidden_states, packed_rows, padding_free_ready, supports_prefix_sharing
from useful_code.scoring import DEFAULT_SCORING_TOKENS, length_sorted_batches, model_device, token_budget_field
from useful_code.templates import encode_conversations


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


TEMPLATE_REJECTS = "chat_template_rejects"


def chat_template_error(tokenizer, conversation: list[dict]) -> str:
    """'' when the tokenizer's chat template renders the conversation, else the template's own message (Gemma-2's
    template raises 'System role not supported' for a system message)."""
    try:
        tokenizer.apply_chat_template(conversation, tokenize=False)
    except TemplateError as err:
        return str(err) or type(err).__name__
    return ""


def reject_untemplatable(dataset, tokenizer, columns: tuple[str, ...], skip_invalid: bool, name: str):
    """Check that the chat template renders every conversation of the given message-list columns: a row it refuses
    is an error naming the row and the template's message, or with skip_invalid is dropped and counted (where
    templating would stop the run with a jinja traceback). Returns (dataset, number dropped)."""

    def check(row) -> dict:
        error = next((e for e in (chat_template_error(tokenizer, row[c]) for c in columns) if e), "")
        return {"invalid_reason": TEMPLATE_REJECTS if error else "", "template_error": error}

    marked = dataset.map(check, desc=f"checking {name} against the chat template")
    said = sorted({e for e in marked["template_error"] if e})
    rules = {TEMPLATE_REJECTS: "the model's chat template must accept the conversation (it raised: "
                               f"{'; '.join(map(repr, said[:3]))}{' ...' if len(said) > 3 else ''})"}
    checked, stats = enforce_validity(marked.remove_columns("template_error"), rules, skip_invalid, name)
    return checked, stats["read"] - stats["used"]


def gating_pattern(tokenizer) -> list[int]:
    """Token ids that end a user turn and open the assistant's, read off the chat template: from the last
    non-whitespace token of a rendered context to the end of the generation prompt. For Llama-3 this is
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n and for Gemma-2 <end_of_turn>\\n<start_of_turn>model\\n,
    upstream's hard-coded patterns; its first token is where the prompt embedding is read."""
    probe = [[{"role": "user", "content": "Hello"}]]
    context = encode_conversations(tokenizer, probe)[0]  # a template that refuses it is a UserError there
    with_header = encode_conversations(tokenizer, probe, add_generation_prompt=True)[0]
    if with_header[:len(context)] != context or len(with_header) == len(context):
        raise UserError("the chat template's generation prompt does not extend the rendered context, so the "
                        "start of the assistant turn cannot be located")
    gate = len(context) - 1
    while gate > 0 and not tokenizer.decode([context[gate]]).strip():
        gate -= 1
    return context[gate:] + with_header[len(context):]


@torch.inference_mode()
def embed(model, tokenizer, sequences: list[list[int]], batch_size: int, gating_pattern_ids=None,
          progress: bool = True, max_tokens_per_batch: int = DEFAULT_SCORING_TOKENS
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final-layer hidden state at each sequence's last token, and (with gating_pattern_ids) at its gating
    position; packed without padding up to max_tokens_per_batch tokens per forward where the model allows
    (packing.enable_padding_free), else batched by length (longest first) with right padding. Returns CPU tensors in
    the model's dtype."""
    device = model_device(model)
    hidden_size = model.config.hidden_size
    last = torch.zeros(len(sequences), hidden_size, dtype=model.dtype)
    gated = torch.zeros(len(sequences), hidden_size, dtype=model.dtype) if gating_pattern_ids else None
    if max_tokens_per_batch and padding_free_ready(model):  # packed rows, read at each sequence's positions
        packed = packed_rows(sequences, max_tokens_per_batch, device, "embedding", progress,
                             share_prefix=supports_prefix_sharing(model))
        for chunk, row, inputs in packed:
            hidden = packed_hidden_states(model, inputs)[0]
            last[chunk] = hidden[row.last_positions.to(device)].cpu()
            if gated is not None:
                within = torch.cat([find_gating_positions(torch.tensor([sequences[i]]), gating_pattern_ids)
                                    for i in chunk])
                gated[chunk] = hidden[row.token_positions(within).to(device)].cpu()
        return last, gated
    for chunk in length_sorted_batches(sequences, batch_size, "embedding", progress):
        batch = tokenizer.pad({"input_ids": [sequences[i] for i in chunk]}, padding=True, return_tensors="pt")
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        rows = torch.arange(len(chunk), device=device)
        last[chunk] = hidden[rows, mask.sum(-1) - 1].cpu()
        if gated is not None:
            gated[chunk] = hidden[rows, find_gating_positions(input_ids, gating_pattern_ids)].cpu()
    return last, gated
