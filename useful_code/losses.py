"""Reward-model losses and the batch layout they read.

References: TRL's RewardTrainer (trl/trainer/reward_trainer.py: `margin` column, `center_rewards_coefficient`),
HelpSteer2-Preference / INF-ORM "scaled BT" (per-pair weights), ODIN (Chen et al., ICML 2024, arXiv:2402.07319;
upstream RLHFlow odin/gemma_two_head.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from useful_code.packing import pack_pairs

# Optional per-pair float columns the collator passes through: TRL's margin, the scaled-BT weight, ODIN's lengths.
PAIR_COLUMNS = ("margin", "weight", "chosen_length", "rejected_length")

LOSS_VARIANTS = {
    "bt": "Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected)",
    "margin": "Bradley-Terry with TRL's per-pair margin: -log sigmoid(r_chosen - r_rejected - margin)",
    "scaled": "scaled Bradley-Terry (HelpSteer2-Preference, INF-ORM): per-pair loss times the pair's weight",
    "odin": "ODIN: BT on quality + length heads, length-correlation and head-orthogonality terms",
}


def required_columns(loss_type: str) -> tuple[str, ...]:
    """The per-pair columns a loss variant needs in the data."""
    if loss_type not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {', '.join(LOSS_VARIANTS)}")
    return {"margin": ("margin",), "scaled": ("weight",)}.get(loss_type, ())


@dataclass
class PairwiseCollator:
    """Batch pairs for one forward pass: the chosen sequences first, then the rejected ones, right-padded; or with
    padding_free, packed end to end in one row (packing.pack_pairs; share_prefix lays each pair's common context
    once). real_tokens counts the tokens of the sequences themselves. The PAIR_COLUMNS present in the features come
    back as float32 tensors of shape [n_pairs]."""

    tokenizer: Any
    pad_to_multiple_of: Optional[int] = None
    padding_free: bool = False
    share_prefix: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        chosen, rejected = [f["chosen_input_ids"] for f in features], [f["rejected_input_ids"] for f in features]
        if self.padding_free:
            out = pack_pairs(chosen, rejected, self.share_prefix).as_inputs()
        else:
            batch = self.tokenizer.pad({"input_ids": chosen + rejected}, padding=True,
                                       pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
            out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out["real_tokens"] = torch.tensor(sum(len(s) for s in chosen + rejected))
        for name in PAIR_COLUMNS:
            values = [f.get(name) for f in features]
            if all(v is None for v in values):
                continue  # absent (not zeros): the plain loss path sees the same batch as before
            if any(v is None for v in values):
                raise ValueError(f"column {name!r} is missing (None) in some pairs of the batch and set in others")
            column = torch.tensor([float(v) for v in values], dtype=torch.float32)
            if not torch.isfinite(column).all():  # a NaN margin or weight would silently turn the loss into NaN
                raise ValueError(f"column {name!r} has a non-finite value: {column.tolist()}")
            out[name] = column
        return out


def split_pair_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rewards of a PairwiseCollator batch into (chosen, rejected)."""
    rewards = rewards.reshape(-1)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def _per_pair(name: str, values: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """A per-pair column as float32 [n]; a shape mismatch would otherwise broadcast to [n, n] without an error."""
    if values is None:
        return None
    if values.numel() != n:
        raise ValueError(f"{name} has {values.numel()} values for {n} pairs")
    return values.reshape(-1).float()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                  weight: Optional[torch.Tensor] = None, center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Pairwise reward loss, in float32 whatever the input dtype.

    l_i = -log sigmoid(r_c - r_r - margin) (TRL RewardTrainer.compute_loss: margin is subtracted inside);
    loss = sum_i(w_i * l_i) / n: the scaled-BT weight multiplies each pair's loss and the mean stays over the n
    pairs, not sum(w) (HelpSteer2-Preference's scaled BT is an expectation of -m * log sigmoid(diff); INF-ORM uses
    the same scaled BT), so a batch of larger-magnitude preferences weighs more;
    plus center_rewards_coefficient * mean((r_c + r_r)^2) (TRL's center_rewards_coefficient, Eisenstein et al.
    2023), which keeps rewards near zero mean.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen rewards {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    chosen, rejected = chosen.reshape(-1).float(), rejected.reshape(-1).float()
    n = chosen.shape[0]
    margin, weight = _per_pair("margin", margin, n), _per_pair("weight", weight, n)
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(diff)
    loss = losses.mean() if weight is None else (weight * losses).sum() / n
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected): pairwise_loss without options."""
    return pairwise_loss(chosen_rewards, rejected_rewards)


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable Pearson correlation of two flat tensors (as float32); 0, not NaN, when either is constant.
    Computed in float64: the squared deviations of rewards near 1e19 overflow float32, and the correlation came out
    as finite / inf = 0, silently."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    dx, dy = x - x.mean(), y - y.mean()
    var_x, var_y = (dx * dx).sum(), (dy * dy).sum()
    # A constant input keeps rounding noise (about eps * |x|) after centring: count that as zero variance.
    eps = torch.finfo(torch.float32).eps
    flat = ((var_x <= x.numel() * (4 * eps * x.detach().abs().max()) ** 2)
            | (var_y <= y.numel() * (4 * eps * y.detach().abs().max()) ** 2))
    # sqrt of 1 where flat: sqrt'(0) is infinite and would turn the masked gradient into NaN.
    denom = torch.sqrt(torch.where(flat, torch.ones_like(var_x), var_x * var_y))
    return torch.where(flat, torch.zeros_like(var_x), (dx * dy).sum() / denom).float()


def head_orthogonality(head_weights: torch.Tensor) -> torch.Tensor:
    """Sum over head pairs of |cos| between the heads' weight rows, each centred (upstream's
    proj_with_normalized_weight): unit norm, so the term cannot be lowered by shrinking the heads."""
    if head_weights.dim() != 2 or head_weights.shape[0] < 2 or head_weights.shape[1] == 0:
        # e.g. a ZeRO-3 partitioned score.weight (shape [0]): gather it first, or pass None
        raise ValueError(f"head_weights must be [n_heads >= 2, hidden], got {tuple(head_weights.shape)}")
    w = head_weights.float()
    w = w - w.mean(dim=-1, keepdim=True)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return torch.triu(w @ w.T, diagonal=1).abs().sum()


ODIN_PARTS = ("bt", "length", "ortho", "rho_quality", "rho_length", "loss")  # the terms odin_loss reports


def odin_loss(quality_c: torch.Tensor, quality_r: torch.Tensor, length_c: torch.Tensor, length_r: torch.Tensor,
              chosen_len: torch.Tensor, rejected_len: torch.Tensor, head_weights: Optional[torch.Tensor] = None,
              length_coefficient: float = 1.0, ortho_coefficient: float = 1.0) -> tuple[torch.Tensor, dict]:
    """ODIN loss (Chen et al., ICML 2024, arXiv:2402.07319, Sec. 4; RLHFlow odin/gemma_two_head.py), in float32:

        loss = L_BT(r_q + r_l) + length_coefficient * (|rho(r_q, L)| + 1 - rho(r_l, L))
               + ortho_coefficient * |cos(w_q, w_l)|

    L_BT is the mean over pairs of -log sigmoid((q_c + l_c) - (q_r + l_r)) (the paper's r = r_Q + r_L; upstream
    sums the whole batch inside one logsigmoid, which we do not copy). rho is the Pearson correlation over the
    chosen and rejected responses pooled, against their lengths L; the "1 -" is upstream's (the paper writes
    -rho: same gradient) and keeps the term >= 0. The orthogonality term is the paper's |W_Q^T W_L| on
    centred, unit-norm head rows (upstream's commented-out version; see head_orthogonality); head_weights is the
    [2, hidden] score weight (row order does not matter), None skips it. Under data parallelism rho is over the
    rows given: upstream all-gathers rewards and lengths across ranks first.

    Returns (loss, parts): parts = {name: value} of ODIN_PARTS (bt, length, ortho unweighted, rho_quality,
    rho_length, loss), detached float32 0-d tensors on the loss's device (read when logged, not each step).
    """
    quality = torch.cat([quality_c.reshape(-1), quality_r.reshape(-1)]).float()
    length_head = torch.cat([length_c.reshape(-1), length_r.reshape(-1)]).float()
    lengths = torch.cat([chosen_len.reshape(-1), rejected_len.reshape(-1)]).float()
    bt = pairwise_loss(quality_c.float() + length_c.float(), quality_r.float() + length_r.float())
    rho_q, rho_l = pearson_correlation(quality, lengths), pearson_correlation(length_head, lengths)
    length_term = rho_q.abs() + 1 - rho_l
    loss = bt + length_coefficient * length_term
    ortho = torch.zeros((), device=bt.device)
    if head_weights is not None:
        ortho = head_orthogonality(head_weights)
        loss = loss + ortho_coefficient * ortho
    parts = (bt, length_term, ortho, rho_q, rho_l, loss)
    return loss, {name: value.detach().float() for name, value in zip(ODIN_PARTS, parts)}
