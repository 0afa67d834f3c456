"""Padding-free packing and prefix sharing: layouts by hand, and packed rewards, gradients and training losses equal
to padded ones for the same weights."""

import copy

import pytest
import torch

from helpers import sharpened
from useful_code import packing
from useful_code.defaults import DEFAULT_MODEL
from useful_code.losses import PairwiseCollator, bradley_terry_loss, split_pair_rewards
from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model
from useful_code.packing import (
    VARLEN_ATTENTION,
    enable_padding_free,
    group_length_ratio,
    pack_groups,
    pack_pairs,
    pack_sequences,
    packed_rewards,
    packed_rows,
    packed_sdpa_backends,
    padding_free_unsupported,
    pair_cost,
    plan_attention,
    prefix_groups,
    prefix_sharing_pays,
    shared_prefix_length,
    supports_prefix_sharing,
    token_budget_batches,
)
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "--model")


@pytest.fixture(scope="module")
def model(tok):
    """The tiny model (4 query heads, 2 key/value heads) with sharpened weights: a position or attention-span
    mix-up moves rewards by units."""
    base = load_reward_model(DEFAULT_MODEL, "--m", tok, torch.float32, new_weights=REWARD_HEAD_WEIGHTS)
    return sharpened(base, std=0.3, seed=3)


def conversation(system: bool, turns: int, answer: str, seed: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a careful assistant."}] if system else []
    for t in range(turns - 1):
        messages += [{"role": "user", "content": f"question {seed} part {t} about tea"},
                     {"role": "assistant", "content": f"earlier answer {t} " * (seed % 3 + 1)}]
    return messages + [{"role": "user", "content": f"final question {seed}?"},
                       {"role": "assistant", "content": answer}]


def pair_ids(tok, n: int = 6):
    """Multi-turn pairs with and without a system message, chosen and rejected of different lengths."""
    chosen, rejected = [], []
    for i in range(n):
        system, turns = i % 2 == 0, 1 + i % 3
        chosen.append(conversation(system, turns, "a kind and complete answer " * (i + 1), i))
        rejected.append(conversation(system, turns, "no " * (2 * i + 1), i))
    return encode_conversations(tok, chosen), encode_conversations(tok, rejected)


def padded_rewards(model, tok, sequences):
    batch = tok.pad({"input_ids": sequences}, padding=True, return_tensors="pt")
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def test_pack_pairs_layout_by_hand():
    row = pack_pairs([[1, 2, 3, 4]], [[1, 2, 5]], share_prefix=True)
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the rejected response continues from the context
    assert row.blocks.tolist() == [[0, 2, 0, 0], [2, 4, 0, 2], [4, 5, 0, 2]]
    assert row.last_positions.tolist() == [3, 4]
    plain = pack_pairs([[1, 2, 3, 4], [7, 8]], [[1, 2, 5], [9]], share_prefix=False)
    assert plain.input_ids.tolist() == [[1, 2, 3, 4, 7, 8, 1, 2, 5, 9]]  # chosen first, then rejected
    assert plain.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0]]
    assert plain.last_positions.tolist() == [3, 5, 8, 9]
    assert pack_sequences([[5], [6, 7]]).blocks.tolist() == [[0, 1, 0, 0], [1, 3, 1, 1]]
    with pytest.raises(ValueError, match="sequence 1 of the packed row has no tokens"):
        pack_sequences([[5], []])  # its reward would be read at sequence 0's last token


def test_shared_prefix_leaves_each_side_its_last_token():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3, 4]]) == 1
    assert shared_prefix_length([[9, 2], [1, 2]]) == 0
    row = pack_pairs([[1, 2, 3]], [[1, 2, 3]], share_prefix=True)  # identical sides still get a reward each
    assert row.last_positions.tolist() == [2, 3]


def test_pack_groups_layout_by_hand():
    row = pack_groups([[[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]], [[8, 9]]])
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 3, 5, 6, 7, 8, 9]]  # the shared [1, 2] once, then each rest
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 2, 0, 1]]
    assert row.blocks.tolist() == [[0, 2, 0, 0], [2, 4, 0, 2], [4, 7, 0, 2], [7, 8, 0, 2], [8, 10, 8, 8]]
    assert row.last_positions.tolist() == [3, 6, 7, 9]
    assert row.segments.tolist() == [[0, 2, 2], [0, 2, 4], [0, 2, 7], [8, 0, 8]]
    # token 1 of each sequence (in the shared prefix for the tree, its own for the last), token 2 of the first
    assert row.token_positions(torch.tensor([1, 1, 2, 1])).tolist() == [1, 1, 7, 9]
    with pytest.raises(ValueError, match="sequence 3 of the packed row has no tokens"):
        pack_groups([[[1, 2]], [[1, 2, 3], [1, 2, 4], []]])  # named by its place in the row, not its group's


def test_prefix_groups_by_hand():
    context, other = list(range(100, 120)), list(range(200, 220))  # 20 tokens each, over MIN_SHARED_PREFIX
    sequences = [context + [1], other + [5], context + [2, 2], [7] * 30, context + [3], context[:10] + [9]]
    # in sorted order: 3, 5 (shares only 10 tokens with the context), 0, 2, 4, 1
    assert prefix_groups(sequences, max_tokens=1000) == [[3], [5], [0, 2, 4], [1]]
    # a group that would exceed the budget is cut: 20 shared + 1 + 2 = 23 fits in 23, the third response does not
    assert prefix_groups(sequences, max_tokens=23) == [[3], [5], [0, 2], [4], [1]]
    # a late joiner that shortens the shared context of 3 from 24 to 16 tokens: its own 16 shared tokens saved, 8
    # more laid by each of the 3 branches but one (the context is laid once): 27 + 17 - 44 = 0 saved, left out
    wide = [context + [1] * 5, context + [1] * 4 + [2], context + [1] * 4 + [3], context[:16] + [500]]
    assert prefix_groups(wide, 1000) == [[0, 1, 2], [3]]
    wide[3] = context[:17] + [500]  # from 24 to 17: saves 17, costs 2 x 7
    assert prefix_groups(wide, 1000) == [[0, 1, 2, 3]]
    # the same for a group of 2: 16 saved, 8 more laid once
    assert prefix_groups(wide[:2] + [context[:16] + [500]], 1000) == [[0, 1, 2]]
    assert prefix_groups([], 10) == []


def test_packed_rows_share_contexts_and_cover_every_sequence():
    context = list(range(100, 140))
    sequences = [context + [i] * (i + 1) for i in range(6)] + [[7] * 9, list(range(300, 350))]
    seen, tokens = [], 0
    for chunk, row, inputs in packed_rows(sequences, max_tokens=90, device="cpu", share_prefix=True):
        seen += chunk
        tokens += row.input_ids.shape[1]
        assert row.input_ids.shape[1] <= 90 or len(chunk) == 1
        for k, i in enumerate(chunk):  # each sequence's tokens, read back from the row, are its own
            positions = [row.token_positions(torch.full((len(chunk),), offset))[k]
                         for offset in range(len(sequences[i]))]
            assert row.input_ids[0, positions].tolist() == sequences[i]
            assert row.position_ids[0, positions].tolist() == list(range(len(sequences[i])))
    assert sorted(seen) == list(range(8))
    assert tokens < sum(map(len, sequences)) - 3 * 40  # the context computed twice instead of six times, at most


def test_token_budget_batches_by_hand():
    assert token_budget_batches([3, 9, 4, 2], 7) == [[1], [2, 0], [3]]  # 9 alone although over the budget
    assert token_budget_batches([1, 1, 1], 100) == [[0, 1, 2]]
    assert token_budget_batches([], 5) == []


def test_attention_plan_groups_blocks_of_similar_length():
    plan = plan_attention([(0, 10, 0, 0), (10, 19, 10, 10), (19, 22, 19, 19), (22, 25, 19, 22)], 25, "cpu")
    assert plan.length == 25
    tree, (long_q, long_k, long_mask, long_kept, long_targets), (short_q, _, _, _, short_targets) = plan.groups
    assert long_q.tolist() == [list(range(10)), list(range(10, 19)) + [18]]  # 9 >= 0.8 * 10: one group
    assert long_k is long_q and long_mask is None  # plain blocks: causal on their own keys
    assert long_kept.tolist() == list(range(19)) and long_targets.tolist() == list(range(19))  # not the padding
    assert short_q.tolist() == [[19, 20, 21]] and short_targets.tolist() == [19, 20, 21]
    tree_q, tree_k, tree_mask, _, _ = tree  # the block with a prefix: its prefix in full, then causal
    assert tree_q.tolist() == [[22, 23, 24]] and tree_k.tolist() == [[19, 20, 21, 22, 23, 24]]
    assert tree_mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def test_group_length_ratio_by_device(monkeypatch):
    assert (group_length_ratio("cpu"), group_length_ratio("cuda"), group_length_ratio("cuda:1")) == (0.8, 0.0, 0.0)
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", 0.5)
    assert (group_length_ratio("cpu"), group_length_ratio("cuda")) == (0.5, 0.5)


def test_attention_plan_on_a_gpu_is_one_group(monkeypatch):
    # a GPU's ratio, 0: every block of the row in one attention call, the plain ones masked causally like the tree
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", packing.GPU_GROUP_LENGTH_RATIO)
    plan = plan_attention([(0, 10, 0, 0), (10, 19, 10, 10), (19, 22, 19, 19), (22, 25, 19, 22)], 25, "cpu")
    (queries, keys, mask, kept, targets), = plan.groups
    assert queries.tolist() == [list(range(10)), list(range(10, 19)) + [18], [22, 23, 24] + [24] * 7,
                                [19, 20, 21] + [21] * 7]  # longest first, padded to the longest block
    assert keys[2, :3].tolist() == [19, 20, 21] and mask.shape == (4, 1, 10, 3 + 10)  # the longest prefix, then L
    assert mask[0, 0, 2].int().tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # a plain block: causal, no prefix
    assert mask[2, 0, 1].int().tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # the tree: prefix, then causal
    assert kept.tolist() == list(range(19)) + [20, 21, 22, 30, 31, 32]  # the 4 x 10 outputs less the padding
    assert sorted(targets.tolist()) == list(range(25))  # every token once


def test_packed_rows_keep_off_cudnn_attention_on_a_gpu_only(monkeypatch):
    # cuDNN's attention builds a graph for each new shape, and packed rows bring new shapes in nearly every batch
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with packed_sdpa_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after
    with packed_sdpa_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU's SDPA is left as torch has it
    monkeypatch.setattr(packing, "PACKED_SDPA_BACKENDS", None)  # torch's own choice, for the benchmarks
    with packed_sdpa_backends(torch.device("cuda")):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def assert_groups_pad_at_most_twice(plan, blocks):
    """Every group's padded queries within 2x its members' tokens, and its padded keys within 2x their prefixes and
    tokens."""
    by_start = {b[0]: b for b in blocks}
    for queries, keys, _, kept, _ in plan.groups:
        members = [by_start[start] for start in queries[:, 0].tolist()]
        assert queries.numel() <= 2 * len(kept) == 2 * sum(end - start for start, end, *_ in members)
        assert keys.numel() <= 2 * sum(end - start + prefix_end - prefix_start
                                       for start, end, prefix_start, prefix_end in members)
    assert sorted(t for *_, targets in plan.groups for t in targets.tolist()) == list(range(blocks[-1][1]))


@pytest.mark.parametrize("tree", [False, True])
def test_attention_groups_pad_at_most_twice_their_tokens_at_any_ratio(monkeypatch, tree):
    # one long sequence (or a long shared context) among 200 short ones, at a GPU's ratio 0: without the padding
    # limit every short block would be padded to 1500 tokens (queries) or attend to 1500 padded keys
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", 0.0)
    blocks = [(0, 1500, 0, 0), (1500, 1520, 0, 1500)] if tree else [(0, 1500, 0, 0)]
    start = blocks[-1][1]
    blocks += [(start + 20 * i, start + 20 * (i + 1), start + 20 * i, start + 20 * i) for i in range(200)]
    assert_groups_pad_at_most_twice(plan_attention(blocks, blocks[-1][1], "cpu"), blocks)


@pytest.mark.parametrize("ratio", [0.0, 0.8])
def test_tree_branches_with_short_blocks_pad_their_keys_at_most_twice(monkeypatch, ratio):
    # short branches of a 300-token context beside short plain sequences: grouped together, each plain one would
    # attend to 300 padded keys (6.9x the keys' tokens on the first case, up to 12x on random rows)
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", ratio)
    rows = [[[list(range(10, 2010))], [[7] * 300 + [1, 2, 3, 4], [7] * 300 + [5, 6, 7, 8]]]
            + [[[9, 9, 9, i]] for i in range(13)]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        groups = []
        for _ in range(int(torch.randint(2, 12, (1,), generator=generator))):
            context = torch.randint(10, 1000, (int(torch.randint(0, 400, (1,), generator=generator)),),
                                    generator=generator).tolist()
            groups.append([context + torch.randint(10, 1000, (int(torch.randint(1, 60, (1,), generator=generator)),),
                                                   generator=generator).tolist()
                           for _ in range(int(torch.randint(1, 4, (1,), generator=generator)) if context else 1)])
        rows.append(groups)
    for groups in rows:
        row = pack_groups(groups)
        blocks = [tuple(b) for b in row.blocks.tolist()]
        assert_groups_pad_at_most_twice(plan_attention(blocks, row.input_ids.shape[1], "cpu"), blocks)


def test_attention_plan_batches_trees_and_masks_prefix_padding():
    # two trees, prefixes of 5 and 4 tokens (4 >= 0.8 * 5), branches of 2 and 2 tokens: one group
    plan = plan_attention([(5, 7, 0, 5), (11, 13, 7, 11)], 13, "cpu")
    (queries, keys, mask, kept, targets), = plan.groups
    assert queries.tolist() == [[5, 6], [11, 12]]
    assert keys.tolist() == [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 10, 11, 12]]  # the shorter prefix padded
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1, 1]]  # its padding masked


def test_attention_plan_moves_to_the_device_whole(monkeypatch):
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", 0.8)  # the same groups on both (by default each device's own)
    blocks = [(0, 10, 0, 0), (10, 19, 10, 10), (19, 22, 19, 19), (22, 25, 19, 22)]
    on_cpu, elsewhere = plan_attention(blocks, 25, "cpu"), plan_attention(blocks, 25, "meta")
    for cpu_group, moved_group in zip(on_cpu.groups, elsewhere.groups, strict=True):
        for cpu_tensor, moved in zip(cpu_group, moved_group, strict=True):
            assert (moved is None) == (cpu_tensor is None)
            if moved is not None:
                assert moved.device.type == "meta" and (moved.shape, moved.dtype) == (cpu_tensor.shape,
                                                                                      cpu_tensor.dtype)


def test_packed_forward_makes_no_host_syncs_per_layer(model, tok):
    # On a GPU, nonzero (boolean indexing) and .item() wait for the device; in each layer's attention that is tens
    # of stalls per forward. Counted on the CPU, leaving out plan_attention, which works on host tensors by design:
    # none may come from the layers (the model has two).
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
               torch.ops.aten.masked_select.default}

    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            by_mask = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])  # a boolean index runs nonzero within
            if (func in syncing or by_mask) and not any(f.name == "plan_attention" for f in traceback.extract_stack()):
                CountSyncs.count += 1
            return func(*args, **(kwargs or {}))

    chosen, rejected = pair_ids(tok)
    packed_model = copy.deepcopy(model)
    assert enable_padding_free(packed_model)
    inputs = pack_pairs(chosen, rejected, share_prefix=True).as_inputs()
    with torch.no_grad(), CountSyncs():
        packed_rewards(packed_model, inputs)
    assert CountSyncs.count <= 1, CountSyncs.count  # transformers' packed-row check, not one per layer and group


@pytest.mark.parametrize("ratio", [None, packing.GPU_GROUP_LENGTH_RATIO], ids=["cpu-groups", "gpu-groups"])
def test_packed_rewards_equal_padded_for_multi_turn_pairs(model, tok, ratio, monkeypatch):
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", ratio)  # a GPU's grouping, run here on the CPU
    chosen, rejected = pair_ids(tok)
    assert any(shared_prefix_length([a, b]) > 10 for a, b in zip(chosen, rejected))
    with torch.no_grad():
        reference = padded_rewards(model, tok, chosen + rejected)
        assert reference.std() > 1  # sharp enough for a mix-up to show
        packed_model = copy.deepcopy(model)
        assert enable_padding_free(packed_model)
        for share in (False, True):
            rewards = packed_rewards(packed_model, pack_pairs(chosen, rejected, share).as_inputs())[:, 0]
            torch.testing.assert_close(rewards, reference, atol=1e-4, rtol=1e-4)
        # the model still scores padded batches (with their mask) after the switch
        torch.testing.assert_close(padded_rewards(packed_model, tok, chosen + rejected), reference, atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("budget", [1, 60, 250, 100000])
def test_token_budget_scoring_equals_padded_batches(model, tok, budget):
    """With prefix sharing: three responses to each conversation, and one conversation's responses twice."""
    chosen, rejected = pair_ids(tok)
    third = encode_conversations(tok, [conversation(i % 2 == 0, 1 + i % 3, "maybe " * (i + 2), i) for i in range(6)])
    sequences = chosen + rejected + third + chosen[:1] + third[:1]
    if budget == 100000:
        assert sorted(map(len, prefix_groups(sequences, budget))) == [3, 3, 3, 3, 3, 5]  # shared contexts found
    padded = score_sequences(model, tok, sequences, batch_size=4)  # sdpa model: padded batches
    packed_model = copy.deepcopy(model)
    enable_padding_free(packed_model)
    packed = score_sequences(packed_model, tok, sequences, batch_size=4, max_tokens_per_batch=budget)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio", [None, packing.GPU_GROUP_LENGTH_RATIO], ids=["cpu-groups", "gpu-groups"])
def test_gradients_equal_padded(model, tok, ratio, monkeypatch):
    """Also under activation checkpointing, whose backward reruns the layers with the same block plan."""
    monkeypatch.setattr(packing, "GROUP_LENGTH_RATIO", ratio)
    chosen, rejected = pair_ids(tok, 4)
    padded_model = copy.deepcopy(model).train()
    bradley_terry_loss(*split_pair_rewards(padded_rewards(padded_model, tok, chosen + rejected))).backward()
    for checkpointing in (False, True):
        packed_model = copy.deepcopy(model).train()
        enable_padding_free(packed_model)
        if checkpointing:
            packed_model.activation_checkpointing_enable()
        packed = packed_rewards(packed_model, pack_pairs(chosen, rejected, share_prefix=True).as_inputs())
        bradley_terry_loss(*split_pair_rewards(packed)).backward()
        for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_training_steps_give_padded_losses(model, tok):
    """Five AdamW steps from the same weights on the same batches: padded, padding-free and prefix-sharing losses
    agree step by step."""
    chosen, rejected = pair_ids(tok, 8)
    features = [{"chosen_input_ids": c, "rejected_input_ids": r} for c, r in zip(chosen, rejected)]
    losses = {}
    for mode in ("padded", "packed", "prefix"):
        trained = copy.deepcopy(model).train()
        if mode != "padded":
            enable_padding_free(trained)
        collate = PairwiseCollator(tok, padding_free=mode != "padded", share_prefix=mode == "prefix")
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
        losses[mode] = []
        for step in range(5):
            batch = collate(features[(step % 2) * 4:(step % 2) * 4 + 4])
            if mode == "padded":
                rewards = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                rewards = packed_rewards(trained, batch)
            loss = bradley_terry_loss(*split_pair_rewards(rewards))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[mode].append(loss.item())
    assert len(set(losses["padded"])) == 5  # the weights moved
    for mode in ("packed", "prefix"):
        torch.testing.assert_close(torch.tensor(losses[mode]), torch.tensor(losses["padded"]), atol=1e-4, rtol=1e-4)


def test_collator_counts_real_tokens(tok):
    features = [{"chosen_input_ids": [1, 2, 3, 4], "rejected_input_ids": [1, 2, 5]}]
    for padding_free, share in ((False, False), (True, False), (True, True)):
        batch = PairwiseCollator(tok, padding_free=padding_free, share_prefix=share)(features)
        assert int(batch["real_tokens"]) == 7
    assert PairwiseCollator(tok, padding_free=True, share_prefix=True)(features)["input_ids"].numel() == 5
    assert PairwiseCollator(tok)(features)["input_ids"].numel() == 8  # both sides padded to 4


def test_which_models_pack(model, tok, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    encoder = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))
    assert "not a causal decoder" in padding_free_unsupported(encoder)
    assert not enable_padding_free(encoder)
    decoder = copy.deepcopy(model)
    assert padding_free_unsupported(decoder) is None and enable_padding_free(decoder)
    assert supports_prefix_sharing(decoder) and decoder.config._attn_implementation == VARLEN_ATTENTION
    # prefix sharing is the default where it is faster: on a CPU, not on a GPU (its tree mask keeps SDPA off flash)
    assert prefix_sharing_pays(decoder) and not prefix_sharing_pays(decoder, "cuda")
    assert not prefix_sharing_pays(encoder, "cpu")
    # a checkpoint saved from a packed model names a stock implementation (it loads without this module)
    decoder.save_pretrained(tmp_path)
    assert VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()


TINY_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=1200, pad_token_id=2, num_labels=1)


@pytest.mark.parametrize("family", ["Mistral", "Phi3", "Gemma3Text"])
def test_sliding_window_models_stay_padded_and_score_as_their_own_forward(tok, family):
    """The packed attention is plain causal SDPA: a model whose attention slides a window (Mistral and Phi-3 read it
    from the config, Gemma 3 keeps it on its layers) must not pack, and scores as its own forward does."""
    import transformers

    config = getattr(transformers, f"{family}Config")(**TINY_DECODER, sliding_window=8,
                                                      **({"head_dim": 16} if family == "Gemma3Text" else {}))
    torch.manual_seed(0)
    base = getattr(transformers, f"{family}ForSequenceClassification")(config).eval()
    assert "sliding-window attention (window 8)" in padding_free_unsupported(base)
    scorer = copy.deepcopy(base)
    assert not enable_padding_free(scorer)
    sequences = [list(range(10, 10 + n)) for n in (5, 30, 41)]  # two longer than the window
    with torch.no_grad():
        alone = [base(input_ids=torch.tensor([s])).logits[0, 0].item() for s in sequences]
    assert score_sequences(scorer, tok, sequences, 4, max_tokens_per_batch=2048) == pytest.approx(alone, abs=1e-5)


def test_flash_attention_chosen_only_for_half_precision(monkeypatch):
    import sys
    import types

    from useful_code.hardware import resolve_attn_implementation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # installed, as on a GPU box
    assert resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float32) is None  # flash-attn has no fp32 kernels
    assert resolve_attn_implementation("sdpa", torch.bfloat16) == "sdpa"  # what the user asked for stands


def test_models_without_sdpa_or_with_soft_capping_stay_padded():
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    from useful_code.hardware import resolve_attn_implementation
    from useful_code.packing import varlen_attention_forward

    gemma2 = Gemma2ForSequenceClassification(Gemma2Config(**TINY_DECODER, head_dim=16))
    assert "does not support SDPA attention" in padding_free_unsupported(gemma2)
    type(gemma2)._supports_sdpa = True  # were it to take SDPA, its soft-capped logits would still keep it padded
    try:
        assert "soft-caps its attention logits" in padding_free_unsupported(gemma2)
    finally:
        type(gemma2)._supports_sdpa = False
    # "auto" leaves the choice to transformers (SDPA where supported, eager for Gemma 2) unless flash-attn is there
    assert resolve_attn_implementation("auto") is None and resolve_attn_implementation("eager") == "eager"
    # a model the checks missed fails loudly rather than scoring with the window dropped
    plan = plan_attention([(0, 3, 0, 0), (3, 5, 0, 0)], 5, "cpu")
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(RuntimeError, match="cannot apply a sliding window or soft-capping"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, packed_plan=plan, sliding_window=2)


def test_preference_model_logits_equal_padded(tok):
    from useful_code.modeling import load_preference_model
    from useful_code.pm_data import build_pm_prompt, encode_pm_prompts
    from useful_code.pm_scoring import PairPreferenceScorer

    pm = sharpened(load_preference_model(DEFAULT_MODEL, "--m", tok, torch.float32), std=0.3, seed=4)
    context = [{"role": "user", "content": "Which tea is best?"}]
    sequences = encode_pm_prompts(tok, [build_pm_prompt(context, "green " * i, "black " * (5 - i)) for i in range(5)])
    padded = PairPreferenceScorer(copy.deepcopy(pm), tok, batch_size=2, max_tokens_per_batch=0).label_logits(sequences)
    assert enable_padding_free(pm)
    for budget in (1, 100000):
        packed = PairPreferenceScorer(pm, tok, max_tokens_per_batch=budget).label_logits(sequences)
        torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), atol=1e-4, rtol=1e-4)
    assert abs(padded[:, 0] - padded[:, 1]).max() > 0.5  # sharp enough for a mix-up to show


def test_armo_embeddings_equal_padded(tok):
    from transformers import AutoModel

    from useful_code.armo_embeddings import embed, gating_pattern

    backbone = sharpened(AutoModel.from_pretrained(DEFAULT_MODEL), std=0.3, seed=5)
    chosen, rejected = pair_ids(tok)
    sequences, pattern = chosen + rejected, gating_pattern(tok)
    last, gated = embed(copy.deepcopy(backbone), tok, sequences, 4, pattern, progress=False)
    assert enable_padding_free(backbone)
    # three pairs are scored as trees, their gating positions inside the shared context
    assert sum(len(g) > 1 for g in prefix_groups(sequences, 90)) == 3
    packed_last, packed_gated = embed(backbone, tok, sequences, 4, pattern, progress=False, max_tokens_per_batch=90)
    torch.testing.assert_close(packed_last, last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed_gated, gated, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(last, gated)  # two different positions were read
