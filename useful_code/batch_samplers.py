"""Training batch orders that a resumed run reproduces: each epoch's order depends on (seed, epoch) alone, the Trainer
telling the sampler its epoch (set_epoch), as accelerate seeds its random sampler.

transformers' LengthGroupedSampler (what --group_by_length builds) draws its shuffle from the global RNG instead, which
a run resumed in a later epoch does not replay: it retrained that epoch in the first epoch's order (of 1600 toy pairs,
415 twice and 415 not at all), and it ignores --data_seed.
"""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from useful_code.packing import token_budget_batches


class EpochSeededBatches(torch.utils.data.Sampler):
    """A batch sampler (an iterable of index lists) whose order for an epoch is drawn from seed + epoch."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration draws (the Trainer calls it at each epoch)."""
        self.epoch = epoch

    @property
    def sampler(self) -> "EpochSeededBatches":
        """Itself, where accelerate looks for the object to call set_epoch on."""
        # Under several ranks accelerate wraps this in a BatchSamplerShard, which has no set_epoch, and forwards the
        # epoch to batch_sampler.batch_sampler.sampler instead.
        return self

    def generator(self) -> torch.Generator:
        """This epoch's random generator, the same however many times it is drawn."""
        return torch.Generator().manual_seed(self.seed + self.epoch)


class TokenBudgetBatches(EpochSeededBatches):
    """Batches for training on a token budget: as many pairs as fit in max_tokens packed tokens (one pair at least),
    cut once from the length-sorted pairs so that every epoch has the same number of steps; each epoch in another
    order of those batches."""

    def __init__(self, costs: list[int], max_tokens: int, seed: int):
        super().__init__(seed)
        self.batches = token_budget_batches(costs, max_tokens)

    def __iter__(self):
        for i in torch.randperm(len(self.batches), generator=self.generator()).tolist():
            yield self.batches[i]

    def __len__(self) -> int:
        return len(self.batches)


class LengthGroupedBatches(EpochSeededBatches):
    """transformers' length grouping (get_length_grouped_indices: a random order cut into megabatches of 50 groups of
    group_size, or fewer to make 4 megabatches, each sorted longest first) cut into batches of batch_size, the last
    one dropped if short and drop_last."""

    def __init__(self, lengths: list[int], batch_size: int, group_size: int, drop_last: bool, seed: int):
        super().__init__(seed)
        self.lengths, self.batch_size, self.group_size, self.drop_last = lengths, batch_size, group_size, drop_last

    def __iter__(self):
        order = get_length_grouped_indices(self.lengths, self.group_size, generator=self.generator())
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
