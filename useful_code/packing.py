"""Padding-free packing: the sequences of a batch laid end to end in one row, with no pad token computed, attention
kept inside each sequence, and a shared context computed once for all the responses that continue it (prefix
sharing: a pair's two sides in training; in scoring, any sequences that share their leading tokens, prefix_groups).

A packed row carries a block plan: each block is a run of query positions [start, end) that attends causally to
itself and fully to one earlier run of keys, its prefix [prefix_start, prefix_end) (empty for a plain sequence).
A plain sequence is one block; a pair with a shared context C and responses A and B is three: C, then A and B, each
with C as its prefix and positions continuing from C's end, the tree-shaped mask of prefix sharing (n responses
to one context: n + 1 blocks).

On sdpa or eager models the plan runs through VARLEN_ATTENTION, registered with transformers' AttentionInterface: it
runs SDPA on each block's own keys (blocks of similar length batched together on a CPU, all of a row's blocks at
once on a GPU: GROUP_LENGTH_RATIO), so the cost is close to that of the separate sequences. transformers' own
packed-sequence path (a mask built from the position ids) computes the full row x row score matrix and masks most
of it away: for 16 sequences of 250 tokens, 16x the attention work. On flash-attention models transformers' varlen
path reads the sequence starts from the position ids (plain packing only: a tree is not expressible there).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTENTION = "rm_varlen_sdpa"
_FLASH_PREFIX = "flash_attention"


@dataclass
class AttentionPlan:
    """A packed row's block plan as VARLEN_ATTENTION runs it, built once per forward (plan_attention): blocks of
    similar length and similar prefix length batched as right-padded groups, each group as
    (queries [g, L], keys [g, P + L], mask [g, 1, L, P + L] or None when P = 0, kept [n_kept], targets [n_kept]):
    token positions in the row, where padding repeats a block's last token; kept indexes the group's g * L outputs
    that are not padding."""

    length: int
    groups: list


# A group's shortest block (and shortest prefix) is at least this fraction of its longest. On a CPU attention's
# FLOPs are what counts: groups of similar length keep the padding they compute small. On a GPU each group is several
# kernel launches per layer, which cost more than padded attention: one group per row (0) ran a 1B Llama's training
# step 2.8x faster than 0.8 and its scoring 2.3x faster (H200, bf16, HH-RLHF batches of 8 pairs; 2026-12-04).
CPU_GROUP_LENGTH_RATIO = 0.8
GPU_GROUP_LENGTH_RATIO = 0.0
GROUP_LENGTH_RATIO: Optional[float] = None  # overrides both when set (the benchmarks' --group_length_ratio)


def group_length_ratio(device) -> float:
    """The attention-group length ratio for packed rows on this device (GROUP_LENGTH_RATIO when set)."""
    if GROUP_LENGTH_RATIO is not None:
        return GROUP_LENGTH_RATIO
    return CPU_GROUP_LENGTH_RATIO if torch.device(device).type == "cpu" else GPU_GROUP_LENGTH_RATIO


# Whatever the ratio, what a group pads (members x its largest size) stays within this multiple of its real tokens:
# at ratio 0 one long sequence among hundreds of short ones would otherwise pad them all to its length (68x the
# row's tokens for 1500 among 20s).
GROUP_PADDING_LIMIT = 2.0


def _similar_runs(items: list, size, ratio: float, real=None, extra=None) -> list[list]:
    """items cut into runs of similar size(item), largest first: each run's smallest is at least `ratio` of its
    largest, and its members x largest size at most GROUP_PADDING_LIMIT times the sum of real(item) (default:
    size(item)), the tokens its members compute unpadded. With extra (a block's prefix, which its keys add), members
    x (largest size + largest extra) is bounded the same way by the sum of real + extra: the padded keys."""
    real, extra = real or size, extra or (lambda item: 0)
    runs = []
    for item in sorted(items, key=lambda b: -size(b)):
        if runs:
            members, total, keys, widest = runs[-1]
            largest, n = size(members[0]), len(members) + 1
            total, keys, widest = total + real(item), keys + real(item) + extra(item), max(widest, extra(item))
            if (size(item) >= ratio * largest and n * largest <= GROUP_PADDING_LIMIT * total
                    and n * (largest + widest) <= GROUP_PADDING_LIMIT * keys):
                members.append(item)
                runs[-1] = (members, total, keys, widest)
                continue
        runs.append(([item], real(item), real(item) + extra(item), extra(item)))
    return [members for members, *_ in runs]


def _clamped(starts: torch.Tensor, sizes: torch.Tensor, width: int) -> torch.Tensor:
    """[g, width] positions starts + t, t clamped to each size - 1 (padding repeats the last position)."""
    steps = torch.arange(width)[None, :]
    return starts[:, None] + torch.minimum(steps, (sizes - 1).clamp(min=0)[:, None])


def _on_device(tensors: list, device) -> list:
    """The tensors on device, one host-to-device copy per dtype (each tensor a view of it): a plan holds a few small
    tensors per group, and on a GPU each separate copy from pageable memory waits for the queued work."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    moved = list(tensors)
    for dtype in {t.dtype for t in tensors}:
        chosen = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in chosen])
        if device.type == "cuda":
            flat = flat.pin_memory()
        parts = flat.to(device, non_blocking=True).split([tensors[i].numel() for i in chosen])
        for i, part in zip(chosen, parts):
            moved[i] = part.view(tensors[i].shape)
    return moved


def plan_attention(blocks: list, length: int, device) -> AttentionPlan:
    """The AttentionPlan of a row of `length` tokens with these (start, end, prefix_start, prefix_end) blocks."""
    groups, ratio = [], group_length_ratio(device)
    # the keys of a group are its prefixes (padded to the longest) and its blocks: a prefix's padding weighs
    # against both
    for same_prefix in _similar_runs(blocks, lambda b: b[3] - b[2], ratio, lambda b: b[3] - b[2] + b[1] - b[0]):
        for members in _similar_runs(same_prefix, lambda b: b[1] - b[0], ratio, extra=lambda b: b[3] - b[2]):
            starts, ends, prefix_starts, prefix_ends = torch.tensor(members).T
            sizes, prefix_sizes = ends - starts, prefix_ends - prefix_starts
            width, prefix_width = int(sizes.max()), int(prefix_sizes.max())
            queries = _clamped(starts, sizes, width)
            kept = torch.arange(width)[None, :] < sizes[:, None]
            mask = None
            keys = queries
            if prefix_width:  # the prefix in full (up to its own size), then causal within the block
                keys = torch.cat([_clamped(prefix_starts, prefix_sizes, prefix_width), queries], dim=1)
                key_steps = torch.arange(prefix_width + width)[None, None, :]
                in_prefix = key_steps < prefix_sizes[:, None, None]
                causal = (key_steps >= prefix_width) & (key_steps - prefix_width <= torch.arange(width)[None, :, None])
                mask = (in_prefix | causal).unsqueeze(1)
            # Indices, not a boolean mask: indexing by a mask on a GPU waits for it (nonzero), in every layer.
            groups.append((queries, keys, mask, kept.reshape(-1).nonzero().squeeze(1), queries[kept]))
    flat = _on_device([t for group in groups for t in group if t is not None], device)
    placed = iter(flat)
    return AttentionPlan(length, [tuple(None if t is None else next(placed) for t in group) for group in groups])


# SDPA backends for packed rows on a GPU. torch prefers cuDNN's attention on Hopper (torch 2.10 and later, with cuDNN
# above 9.15), which builds a graph for each new shape: on an H200 a tiny model's scoring call took 53-58 ms the first
# time a length was seen and about 3 ms after, and packed rows bring new shapes in nearly every batch. Flash,
# memory-efficient and math attention serve any shape without a build. None: torch's own choice (the benchmarks
# compare both).
NO_CUDNN_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PACKED_SDPA_BACKENDS: Optional[list] = NO_CUDNN_SDPA


def packed_sdpa_backends(device: torch.device):
    """The context packed rows' SDPA calls run in on device: PACKED_SDPA_BACKENDS on a GPU, torch's default
    elsewhere."""
    return sdpa_kernel(PACKED_SDPA_BACKENDS) if PACKED_SDPA_BACKENDS and device.type == "cuda" else nullcontext()


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, packed_plan: Optional[AttentionPlan] = None, **kwargs):
    """Attention of a packed row by its AttentionPlan; without a plan, transformers' SDPA attention (a padded batch
    with its mask)."""
    if packed_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    with packed_sdpa_backends(query.device):
        return _packed_attention(module, query, key, value, dropout, scaling, packed_plan, **kwargs)


def _packed_attention(module, query, key, value, dropout: float, scaling: Optional[float], packed_plan: AttentionPlan,
                      **kwargs):
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        # padding_free_unsupported keeps such models padded; a model it missed must not be scored wrong silently
        raise RuntimeError(f"{type(module).__name__}: packed rows cannot apply a sliding window or soft-capping")
    (queries, _, mask, _, _), *others = packed_plan.groups
    if not others and mask is None and queries.shape == (1, packed_plan.length):  # one sequence: a plain forward
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    dropout = dropout if module.training else 0.0
    targets, outputs = [], []
    for group in packed_plan.groups:  # [1, H, T, D] -> [g, H, L, D], right-padded
        # A model split over GPUs (device_map) runs its layers on several devices; one plan serves them all.
        queries, keys, mask, kept, target = (t if t is None else t.to(query.device) for t in group)
        q = query[0][:, queries].transpose(0, 1)
        k, v = (x[0][:, keys].transpose(0, 1) for x in (key, value))
        # Without a prefix, causal attention of a right-padded row never reaches its padding from a kept query.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                             scale=scaling)
        outputs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3]).index_select(0, kept))
        targets.append(target)
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


def decoder_score_head(model) -> Optional[torch.nn.Module]:
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
    if implementation.startswith(_FLASH_PREFIX):
        return None  # transformers' varlen flash path applies sliding windows and soft-capping itself
    if implementation not in ("sdpa", "eager", VARLEN_ATTENTION):
        return f"attention implementation {implementation} has no packed-sequence path here"
    # VARLEN_ATTENTION runs plain causal SDPA: a model that cannot take SDPA (transformers refuses it by name), or
    # whose attention masks a sliding window or soft-caps its logits, would get other rewards than its own forward.
    if not getattr(inner, "_supports_sdpa", False):
        return f"{type(inner).__name__} does not support SDPA attention"
    if getattr(inner.config, "attn_logit_softcapping", None) is not None:
        return f"{type(inner).__name__} soft-caps its attention logits"
    # Qwen2 and Gemma keep a window on each attention module (None on full-attention layers); Mistral and Phi-3
    # read config.sliding_window in every layer.
    attention = [m for m in inner.modules() if type(m).__name__.endswith("Attention")]
    windows = ({m.sliding_window for m in attention if getattr(m, "sliding_window", None) is not None}
               if any(hasattr(m, "sliding_window") for m in attention)
               else {inner.config.sliding_window} - {None} if hasattr(inner.config, "sliding_window") else set())
    if windows:
        return f"{type(inner).__name__} has sliding-window attention (window {', '.join(map(str, sorted(windows)))})"
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


def prefix_sharing_pays(model, device=None) -> bool:
    """Whether sharing prefixes is the faster way to pack for this model, run on device (default: where its weights
    are): on a CPU. On a GPU a tree needs an explicit mask, which keeps SDPA off its flash kernel: plain packing
    (causal) was faster, in training (1B Llama, 212 against 259 ms a step) and in scoring (72 against 115 ms per 8
    pairs; H200, bf16, 2026-12-04)."""
    device = torch.device(device) if device is not None else next(_unwrap(model).parameters()).device
    return supports_prefix_sharing(model) and device.type == "cpu"


@dataclass
class PackedRow:
    """One packed row: token ids and position ids [1, T], the block plan [n_blocks, 4], the position of each
    sequence's last token (where its reward is read), and where each sequence's tokens lie, segments [n, 3]:
    (prefix_start, n_shared, own_start), its first n_shared tokens at prefix_start (the context it shares, laid once)
    and the rest from own_start; sequences in the order they were given."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    blocks: torch.Tensor
    last_positions: torch.Tensor
    segments: torch.Tensor

    def as_inputs(self) -> dict:
        """What a collator returns: tensors, which the Trainer moves to the device, and the block plan as tuples,
        which stay on the host, where plan_attention reads them (read back from a GPU they would wait for its queued
        work in every forward)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "packed_blocks": tuple(map(tuple, self.blocks.tolist())), "last_positions": self.last_positions}

    def token_positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """The row position of token offsets[i] of sequence i."""
        prefix_start, shared, own_start = self.segments.T
        return torch.where(offsets < shared, prefix_start + offsets, own_start + offsets - shared)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens all the sequences share at their start, leaving each at least its last token of its own (where it is
    read)."""
    n = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for seq in sequences[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return max(n, 0)


def pack_groups(groups: list[list[list[int]]]) -> PackedRow:
    """Groups of sequences end to end, positions restarting at each group. A group of several lays its common
    leading tokens once, each member continuing from them (a tree); a sequence alone is one plain block.
    last_positions and segments follow the sequences group by group."""
    ids, positions, blocks, last, segments = [], [], [], [], []
    for group in groups:
        for k, seq in enumerate(group):
            if not seq:  # its "last token" would be the previous sequence's: another input's reward
                raise ValueError(f"sequence {len(last) + k} of the packed row has no tokens")
        n = shared_prefix_length(group) if len(group) > 1 else 0
        prefix_start = len(ids)
        if n:
            ids += group[0][:n]
            positions += range(n)
            blocks.append((prefix_start, prefix_start + n, prefix_start, prefix_start))
        for seq in group:
            start = len(ids)
            ids += seq[n:]
            positions += range(n, len(seq))
            blocks.append((start, len(ids), prefix_start, prefix_start + n) if n else (start, len(ids), start, start))
            last.append(len(ids) - 1)
            segments.append((prefix_start, n, start))
    return PackedRow(torch.tensor([ids], dtype=torch.long), torch.tensor([positions], dtype=torch.long),
                     torch.tensor(blocks, dtype=torch.long).reshape(-1, 4), torch.tensor(last, dtype=torch.long),
                     torch.tensor(segments, dtype=torch.long).reshape(-1, 3))


def pack_sequences(sequences: list[list[int]]) -> PackedRow:
    """Sequences end to end, positions restarting at each, one block each."""
    return pack_groups([[seq] for seq in sequences])


def pack_pairs(chosen: list[list[int]], rejected: list[list[int]], share_prefix: bool) -> PackedRow:
    """Pairs end to end; last_positions holds the chosen sequences first, then the rejected (PairwiseCollator's
    order). With share_prefix, each pair's common leading tokens are laid once, both responses continuing from them."""
    if not share_prefix:
        return pack_sequences(list(chosen) + list(rejected))
    row = pack_groups([[a, b] for a, b in zip(chosen, rejected)])
    order = torch.arange(2 * len(chosen)).reshape(-1, 2).T.reshape(-1)  # (c0, r0, c1, r1) -> (c0, c1, r0, r1)
    row.last_positions, row.segments = row.last_positions[order], row.segments[order]
    return row


# Sequences are grouped under a shared prefix only when they share at least this many tokens: a few shared tokens
# save little and add attention groups (each group is one more SDPA call per layer).
MIN_SHARED_PREFIX = 16


def group_cost(lengths: list[int], shared: int) -> int:
    """Tokens a group of sequences takes in a packed row when their first `shared` tokens are laid once."""
    return sum(lengths) - shared * (len(lengths) - 1) if len(lengths) > 1 else lengths[0]


def prefix_groups(sequences: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Index groups of sequences that share a context (at least MIN_SHARED_PREFIX leading tokens), found among
    neighbours in sorted order: a chosen and a rejected, the n responses to one prompt, or requests with one prompt.
    A sequence joins a group only where that saves tokens, and a group is split where it would exceed max_tokens.
    Every sequence is in one group; a sequence that shares nothing is a group alone."""
    groups = []  # [members, shared tokens]
    for i in sorted(range(len(sequences)), key=sequences.__getitem__):
        seq = sequences[i]
        if groups:
            members, shared = groups[-1]
            joined = shared_prefix_length([sequences[members[-1]], seq])
            joined = min(joined, shared) if len(members) > 1 else joined
            lengths = [len(sequences[j]) for j in members] + [len(seq)]
            # against laying it alone: a shorter shared context than the group had costs its members the difference
            saves = group_cost(lengths[:-1], shared) + len(seq) - group_cost(lengths, joined)
            if joined >= MIN_SHARED_PREFIX and saves > 0 and group_cost(lengths, joined) <= max_tokens:
                members.append(i)
                groups[-1][1] = joined
                continue
        groups.append([[i], 0])
    return [members for members, _ in groups]


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


def packed_rows(sequences: list[list[int]], max_tokens: int, device, desc: str = "scoring", progress: bool = False,
                share_prefix: bool = False):
    """The sequences packed into rows of up to max_tokens tokens, longest first (with share_prefix, sequences that
    share a context laid as trees, prefix_groups): per row, the indices of its sequences, the PackedRow, and its
    inputs on device."""
    groups = prefix_groups(sequences, max_tokens) if share_prefix else [[i] for i in range(len(sequences))]
    members = [[sequences[i] for i in group] for group in groups]
    costs = [group_cost([len(s) for s in m], shared_prefix_length(m) if len(m) > 1 else 0) for m in members]
    for batch in tqdm(token_budget_batches(costs, max_tokens), desc=desc, disable=not progress):
        row = pack_groups([members[g] for g in batch])
        chunk = [i for g in batch for i in groups[g]]
        yield chunk, row, inputs_on_device(row.as_inputs(), device)


def inputs_on_device(inputs: dict, device) -> dict:
    """A packed row's inputs (PackedRow.as_inputs) with its tensors on device; the block plan stays on the host."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def pair_cost(chosen: list[int], rejected: list[int], share_prefix: bool) -> int:
    """Tokens a pair takes in a packed row."""
    return group_cost([len(chosen), len(rejected)], shared_prefix_length([chosen, rejected]) if share_prefix else 0)


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
        kwargs["packed_plan"] = plan_attention(list(inputs["packed_blocks"]), inputs["input_ids"].shape[1],
                                               inputs["input_ids"].device)
    return kwargs


def packed_rewards(model, inputs: dict) -> torch.Tensor:
    """[n_sequences, num_labels] score-head outputs at each packed sequence's last token (a sequence classifier's
    reward), in the order of inputs['last_positions']."""
    head = decoder_score_head(model)
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
