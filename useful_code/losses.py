"""Reward-model losses and the batch layout they read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


@dataclass
class PairwiseCollator:
    """Batch pairs for one forward pass: the chosen sequences first, then the rejected ones, right-padded."""

    tokenizer: Any
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        batch = self.tokenizer.pad(
            {"input_ids": sequences}, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def split_pair_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rewards of a PairwiseCollator batch into (chosen, rejected)."""
    rewards = rewards.reshape(-1)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()
