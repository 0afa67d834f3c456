"""Padding-free packing: the sequences of a batch laid end to end in one row, with no pad token computed, attention
kept inside each sequence, and a pair's shared context computed once for both of its responses (prefix sharing).

A packed row carries a block plan: each block is a run of query positions [start, end) that attends causally to
itself and fully to one earlier run of keys, its prefix [prefix_start, prefix_end) (empty for a plain sequence).
A plain sequence is one block; a pair with a shared context C and responses A and B is three: C, then A and B, each
with C as its prefix and positions continuing from C's end, the tree-shaped mask of prefix sharing.

On sdpa or eager models the plan runs through VARLEN_ATTENTION, registered with transformers' AttentionInterface: it
runs SDPA on each block's own keys (plain blocks of similar length batched together), so the cost is close to that of
the separate sequences. transformers' own packed-sequence path (a mask built from the position ids) computes the
full row x row score matrix and masks most of it away: for 16 sequences of 250 tokens, 16x the attention work. On
flash-attention models transformers' varlen path reads the sequence starts from the position ids (plain packing
only: a tree is not expressible there).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTENTION = "rm_varlen_sdpa"
_FLASH_PREFIX = "flash_attention"


@dataclass
class AttentionPlan:
    """A packed row's block plan as VARLEN_ATTENTION runs it, built once per forward (plan_attention): plain blocks
    of similar length batched as right-padded groups ([g, L] token positions, where padding repeats a block's last
    token and is discarded after), and tree blocks (those with a prefix) one by one."""

    length: int
    groups: list  # (positions [g, L], kept [g * L] bool, targets [n_kept]) per group
    trees: list  # (start, end, prefix_start, prefix_end) per block with a prefix


# A group's shortest block is at least this fraction of its longest: the padding its attention computes stays small.
GROUP_LENGTH_RATIO = 0.8


def plan_attention(blocks: list, length: int, device) -> AttentionPlan:
    """The AttentionPlan of a row of `length` tokens with these (start, end, prefix_start, prefix_end) blocks."""
    plain = sorted((b for b in blocks if b[2] == b[3]), key=lambda b: b[0] - b[1])  # longest first
    groups = []
    while plain:
        longest = plain[0][1] - plain[0][0]
        shorter = (i for i, b in enumerate(plain) if i and b[1] - b[0] < GROUP_LENGTH_RATIO * longest)
        size = next(shorter, len(plain))
        members, plain = plain[:size], plain[size:]
        steps = torch.arange(longest)
        starts = torch.tensor([b[0] for b in members])[:, None]
        sizes = torch.tensor([b[1] - b[0] for b in members])[:, None]
        kept = steps[None, :] < sizes
        positions = starts + torch.minimum(steps[None, :], sizes - 1)
        groups.append((positions.to(device), kept.reshape(-1).to(device), positions[kept].to(device)))
    return AttentionPlan(length, groups, [b for b in blocks if b[2] != b[3]])


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, packed_plan: Optional[AttentionPlan] = None, **kwargs):
    """Attention of a packed row by its AttentionPlan; without a plan, transformers' SDPA attention (a padded batch
    with its mask)."""
    if packed_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    dropout = dropout if module.training else 0.0
    targets, outputs = [], []
    for positions, kept, target in packed_plan.groups:  # [1, H, T, D] -> [g, H, L, D], right-padded
        q, k, v = (x[0][:, positions].transpose(0, 1) for x in (query, key, value))
        # Causal attention of a right-padded row never reaches its padding from a kept query.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        outputs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])[kept])
        targets.append(target)
    for start, end, prefix_start, prefix_end in packed_plan.trees:
        # the prefix in full, then causal within the block: a lower-right-aligned causal mask
        q = query[:, :, start:end]
        k = torch.cat([key[:, :, prefix_start:prefix_end], key[:, :, start:end]], dim=2)
        v = torch.cat([value[:, :, prefix_start:prefix_end], value[:, :, start:end]], dim=2)
        n_prefix, n = prefix_end - prefix_start, end - start
        rows = torch.arange(n, device=query.device)[:, None]
        mask = torch.arange(n_prefix + n, device=query.device)[None, :] <= rows + n_prefix
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        outputs.append(out[0].transpose(0, 1))
        targets.append(torch.arange(start, end, device=query.device))
    values = torch.cat(outputs)  # [T, H, D] in the plan's order, put back in row order
    row = values.new_empty(packed_plan.length, *values.shape[1:]).index_copy(0, torch.cat(targets), values)
    return row.unsqueeze(0), None


def _mask_for_padded_batches(*args, attention_mask=None, **kwargs):
    # A packed row has no 2D mask and needs none (its plan is the mask); a padded batch gets SDPA's usual one.
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN_ATTENTION, _mask_for_padded_batches)


def _unwrap(model):
    """The transformers model inside a DeepSpeed engine, DDP or a peft wrapper."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def reward_head(model) -> Optional[torch.nn.Module]:
    """A decoder sequence classifier's score layer (read at each sequence's last token), or None."""
    return getattr(_unwrap(model), "score", None)


def padding_free_unsupported(model) -> Optional[str]:
    """Why this model cannot run packed rows (None when it can): packing needs a causal decoder whose attention
    goes through transformers' attention interface and whose output is read at each sequence's last token."""
    inner = _unwrap(model)
    # Attention modules say whether they are causal: a BERT-style encoder's are not, and reads its [CLS] token.
    causal = [m.is_causal for m in inner.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not causal or not all(causal):
        return f"{type(inner).__name__} is not a causal decoder"
    if not getattr(inner, "_supports_attention_backend", False):
        return f"{type(inner).__name__} does not take transformers' attention backends"
    implementation = inner.config._attn_implementation
    if implementation not in ("sdpa", "eager", VARLEN_ATTENTION) and not implementation.startswith(_FLASH_PREFIX):
        return f"attention implementation {implementation} has no packed-sequence path here"
    return None


def enable_padding_free(model) -> bool:
    """Switch an sdpa/eager model to VARLEN_ATTENTION (which keeps serving padded batches as SDPA does); flash
    attention keeps its own varlen path. Returns whether the model can now run packed rows."""
    if padding_free_unsupported(model):
        return False
    inner = _unwrap(model)
    if inner.config._attn_implementation in ("sdpa", "eager"):
        inner.set_attn_implementation(VARLEN_ATTENTION)
    return True


def padding_free_ready(model) -> bool:
    """Whether the model runs packed rows now (enable_padding_free was applied, or it uses flash attention)."""
    implementation = _unwrap(model).config._attn_implementation
    return (implementation == VARLEN_ATTENTION or implementation.startswith(_FLASH_PREFIX)) and \
        not padding_free_unsupported(model)


def supports_prefix_sharing(model) -> bool:
    """Whether the model's attention takes a block plan (a tree); flash attention's varlen path cannot."""
    return _unwrap(model).config._attn_implementation == VARLEN_ATTENTION


@dataclass
class PackedRow:
    """One packed row: token ids and position ids [1, T], the block plan [n_blocks, 4], and the position of each
    sequence's last token (where its reward is read), in the order the sequences were given."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    blocks: torch.Tensor
    last_positions: torch.Tensor

    def as_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors a collator returns (the Trainer moves them to the device)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "packed_blocks": self.blocks,
                "last_positions": self.last_positions}


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens a and b share at their start, leaving each at least its last token of its own (where it is read)."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def pack_sequences(sequences: list[list[int]]) -> PackedRow:
    """Sequences end to end, positions restarting at each, one block each."""
    ids, positions, blocks, last = [], [], [], []
    for i, seq in enumerate(sequences):
        if not seq:  # its "last token" would be the previous sequence's: another input's reward
            raise ValueError(f"sequence {i} of the packed row has no tokens")
        start = len(ids)
        ids += seq
        positions += range(len(seq))
        blocks.append((start, len(ids), start, start))
        last.append(len(ids) - 1)
    return _row(ids, positions, blocks, last)


def pack_pairs(chosen: list[list[int]], rejected: list[list[int]], share_prefix: bool) -> PackedRow:
    """Pairs end to end; last_positions holds the chosen sequences first, then the rejected (PairwiseCollator's
    order). With share_prefix, each pair's common leading tokens are laid once, both responses continuing from them."""
    if not share_prefix:
        return pack_sequences(list(chosen) + list(rejected))
    ids, positions, blocks, last_chosen, last_rejected = [], [], [], [], []
    for a, b in zip(chosen, rejected):
        n = shared_prefix_length(a, b)
        start = len(ids)
        if n:
            ids += a[:n]
            positions += range(n)
            blocks.append((start, start + n, start, start))
        for seq, last in ((a, last_chosen), (b, last_rejected)):
            block_start = len(ids)
            ids += seq[n:]
            positions += range(n, len(seq))
            blocks.append((block_start, len(ids), start, start + n))
            last.append(len(ids) - 1)
    return _row(ids, positions, blocks, last_chosen + last_rejected)


def _row(ids, positions, blocks, last) -> PackedRow:
    return PackedRow(torch.tensor([ids], dtype=torch.long), torch.tensor([positions], dtype=torch.long),
                     torch.tensor(blocks, dtype=torch.long).reshape(-1, 4), torch.tensor(last, dtype=torch.long))


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Index lists, longest first, each holding as many sequences as fit in max_tokens (one at least, however long)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def packed_rows(sequences: list[list[int]], max_tokens: int, device, desc: str = "scoring", progress: bool = False):
    """The sequences packed into rows of up to max_tokens tokens, longest first: per row, the indices of its
    sequences, the PackedRow, and its inputs on device."""
    for chunk in tqdm(token_budget_batches([len(s) for s in sequences], max_tokens), desc=desc, disable=not progress):
        row = pack_sequences([sequences[i] for i in chunk])
        yield chunk, row, {k: v.to(device) for k, v in row.as_inputs().items()}


def pair_cost(chosen: list[int], rejected: list[int], share_prefix: bool) -> int:
    """Tokens a pair takes in a packed row."""
    return len(chosen) + len(rejected) - (shared_prefix_length(chosen, rejected) if share_prefix else 0)


class TokenBudgetBatches(torch.utils.data.Sampler):
    """A batch sampler for training on a token budget: batches of as many pairs as fit in max_tokens packed tokens
    (one pair at least), cut once from the length-sorted pairs so that every epoch has the same number of steps; the
    order of the batches is shuffled (seeded, reshuffled for each epoch when the Trainer calls set_epoch)."""

    def __init__(self, costs: list[int], max_tokens: int, seed: int):
        self.batches = token_budget_batches(costs, max_tokens)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> "TokenBudgetBatches":
        # Under several ranks accelerate wraps this in a BatchSamplerShard, which has no set_epoch, and forwards the
        # epoch to batch_sampler.batch_sampler.sampler instead.
        return self

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for i in torch.randperm(len(self.batches), generator=generator).tolist():
            yield self.batches[i]

    def __len__(self) -> int:
        return len(self.batches)


@contextmanager
def _captured_output(module: torch.nn.Module):
    """The output of module during the block (a forward hook, removed after)."""
    captured = {}
    handle = module.register_forward_hook(lambda _m, _i, output: captured.__setitem__("output", output))
    try:
        yield captured
    finally:
        handle.remove()


def packed_model_kwargs(model, inputs: dict) -> dict:
    """The forward's keyword arguments for a packed row: no attention mask; the block plan for VARLEN_ATTENTION (the
    flash path reads the sequence starts from the position ids, which restart at 0 at each)."""
    kwargs = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    if supports_prefix_sharing(model):
        blocks = [tuple(b) for b in inputs["packed_blocks"].tolist()]
        kwargs["packed_plan"] = plan_attention(blocks, inputs["input_ids"].shape[1], inputs["input_ids"].device)
    return kwargs


def packed_rewards(model, inputs: dict) -> torch.Tensor:
    """[n_sequences, num_labels] score-head outputs at each packed sequence's last token (a sequence classifier's
    reward), in the order of inputs['last_positions']."""
    head = reward_head(model)
    with _captured_output(head) as captured:
        model(**packed_model_kwargs(model, inputs), use_cache=False)
    return captured["output"][0, inputs["last_positions"].to(captured["output"].device)]


def packed_hidden_states(model, inputs: dict) -> torch.Tensor:
    """[1, T, hidden] last hidden states of a packed row through a backbone (AutoModel)."""
    return model(**packed_model_kwargs(model, inputs), use_cache=False).last_hidden_state


def packed_lm_logits(model, inputs: dict) -> torch.Tensor:
    """[n_sequences, vocab] a causal LM's next-token logits at each packed sequence's last token (only those
    positions go through the LM head)."""
    positions = inputs["last_positions"].to(inputs["input_ids"].device)
    return model(**packed_model_kwargs(model, inputs), logits_to_keep=positions, use_cache=False).logits[0]
