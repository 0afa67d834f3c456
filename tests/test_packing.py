"""Padding-free packing and prefix sharing: layouts by hand, and packed rewards, gradients and training losses equal
to padded ones for the same weights."""

import copy

import pytest
import torch

from helpers import sharpened
from useful_code.defaults import DEFAULT_MODEL
from useful_code.losses import PairwiseCollator, bradley_terry_loss, split_pair_rewards
from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model
from useful_code.packing import (
    VARLEN_ATTENTION,
    TokenBudgetBatches,
    enable_padding_free,
    pack_pairs,
    pack_sequences,
    packed_rewards,
    padding_free_unsupported,
    pair_cost,
    plan_attention,
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
    assert shared_prefix_length([1, 2, 3], [1, 2, 3]) == 2
    assert shared_prefix_length([1, 2], [1, 2, 3, 4]) == 1
    assert shared_prefix_length([9, 2], [1, 2]) == 0
    row = pack_pairs([[1, 2, 3]], [[1, 2, 3]], share_prefix=True)  # identical sides still get a reward each
    assert row.last_positions.tolist() == [2, 3]


def test_token_budget_batches_by_hand():
    assert token_budget_batches([3, 9, 4, 2], 7) == [[1], [2, 0], [3]]  # 9 alone although over the budget
    assert token_budget_batches([1, 1, 1], 100) == [[0, 1, 2]]
    assert token_budget_batches([], 5) == []


def test_attention_plan_groups_plain_blocks_of_similar_length():
    plan = plan_attention([(0, 10, 0, 0), (10, 19, 10, 10), (19, 22, 19, 19), (22, 25, 19, 22)], 25, "cpu")
    assert plan.length == 25 and plan.trees == [(22, 25, 19, 22)]  # the block with a prefix runs alone
    (long_positions, long_kept, long_targets), (short_positions, _, short_targets) = plan.groups
    assert long_positions.tolist() == [list(range(10)), list(range(10, 19)) + [18]]  # 9 >= 0.8 * 10: one group
    assert long_kept.tolist() == [True] * 19 + [False] and long_targets.tolist() == list(range(19))
    assert short_positions.tolist() == [[19, 20, 21]] and short_targets.tolist() == [19, 20, 21]


def test_token_budget_training_batches():
    costs = [pair_cost([1] * n, [1] * n + [2], share_prefix=True) for n in (3, 8, 1, 5, 2, 9, 4)]
    assert costs[:3] == [5, 10, 3]  # n + (n + 1) - n shared (the rejected keeps its own last token)
    sampler = TokenBudgetBatches(costs, max_tokens=12, seed=0)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(7)) and len(sampler) == len(first)
    assert all(sum(costs[i] for i in batch) <= 12 or len(batch) == 1 for batch in first)
    assert list(TokenBudgetBatches(costs, 12, seed=0)) == first  # seeded
    orders = []
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(map(tuple, orders[-1])) == sorted(map(tuple, first))  # the same batches each epoch
    assert any(order != first for order in orders)  # in another order
    # Sharded across two ranks by accelerate, as the Trainer prepares it: the epoch still reaches the sampler.
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    shard = DataLoaderShard(list(range(7)), batch_sampler=BatchSamplerShard(sampler, num_processes=2, process_index=0))
    shard.set_epoch(9)
    assert sampler.epoch == 9


def test_packed_rewards_equal_padded_for_multi_turn_pairs(model, tok):
    chosen, rejected = pair_ids(tok)
    assert any(shared_prefix_length(a, b) > 10 for a, b in zip(chosen, rejected))
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
    chosen, rejected = pair_ids(tok)
    sequences = chosen + rejected
    padded = score_sequences(model, tok, sequences, batch_size=4)  # sdpa model: padded batches
    packed_model = copy.deepcopy(model)
    enable_padding_free(packed_model)
    packed = score_sequences(packed_model, tok, sequences, batch_size=4, max_tokens_per_batch=budget)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), atol=1e-4, rtol=1e-4)


def test_gradients_equal_padded(model, tok):
    """Also under activation checkpointing, whose backward reruns the layers with the same block plan."""
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
    # a checkpoint saved from a packed model names a stock implementation (it loads without this module)
    decoder.save_pretrained(tmp_path)
    assert VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()


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
    packed_last, packed_gated = embed(backbone, tok, sequences, 4, pattern, progress=False, max_tokens_per_batch=90)
    torch.testing.assert_close(packed_last, last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed_gated, gated, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(last, gated)  # two different positions were read
