"""Training batch orders: length-grouped and token-budget batches, each epoch's order drawn from (seed, epoch), so
that a resumed run draws the epoch it resumes in (end to end: tests/test_bt_end_to_end.py, the resume test)."""

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from useful_code.batch_samplers import LengthGroupedBatches, TokenBudgetBatches
from useful_code.packing import pair_cost


def test_length_grouped_batches_are_transformers_grouping_drawn_from_seed_and_epoch():
    lengths = torch.randint(5, 500, (602,), generator=torch.Generator().manual_seed(0)).tolist()
    # groups of 4: megabatches of 148 pairs (transformers: 50 groups, or fewer to make 4 megabatches), each sorted
    batches = LengthGroupedBatches(lengths, batch_size=4, group_size=4, drop_last=False, seed=42)
    assert len(batches) == 151  # 150 full batches and one of 2
    orders = []
    for epoch in (0, 3):
        batches.set_epoch(epoch)
        got = list(batches)
        grouped = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(42 + epoch)))
        assert [i for batch in got for i in batch] == grouped and [len(b) for b in got] == [4] * 150 + [2]
        torch.manual_seed(epoch)  # the global RNG plays no part
        assert list(batches) == got
        orders.append(got)
    assert orders[0][:37] != orders[1][:37]  # the first megabatch holds other pairs in another epoch
    first = [i for batch in orders[0][:37] for i in batch]
    assert lengths[first[0]] == max(lengths)  # the longest pair first (transformers: an early out-of-memory)
    assert all(lengths[a] >= lengths[b] for a, b in zip(first[1:], first[2:]))  # the megabatch sorted
    assert not all(lengths[a] >= lengths[b] for a, b in zip(grouped, grouped[1:]))  # sorted within megabatches only
    dropping = LengthGroupedBatches(lengths, 4, 4, drop_last=True, seed=42)
    assert len(dropping) == 150 and list(dropping) == orders[0][:150]


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
