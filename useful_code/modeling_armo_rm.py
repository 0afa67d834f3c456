"""ArmoRM as one Hugging Face model: backbone + per-attribute regression layer + reward transform matrix + gating
network (arXiv 2406.12845). armo-rm/export.py copies this file into the exported checkpoint, which then loads with

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)

and returns `score` (also as `logits`, shape [batch, 1]), `rewards` (one per attribute) and `gating_output`. It
imports nothing from this project, since it travels alone. The armo-rm stages use the same GatingNetwork and
gating-position search, so training and the exported model compute the same thing.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput


class GatingNetwork(nn.Module):
    """MLP from a prompt embedding to a softmax over attributes, times a learnable scale (upstream's architecture:
    n_hidden Linear+ReLU(+dropout) layers, a final Linear, softmax(x / temperature) * logit_scale). The softmax runs
    over the attributes (last dim); upstream's stage-2 took it over the chosen/rejected axis (its issue #54)."""

    def __init__(self, in_features: int, out_features: int, hidden_dim: int = 1024, n_hidden: int = 3,
                 temperature: float = 10.0, logit_scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        dims = [in_features] + [hidden_dim] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))
        self.temperature = temperature
        self.dropout = dropout
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = nn.functional.dropout(torch.relu(layer(x)), p=self.dropout, training=self.training)
        x = self.layers[-1](x)
        return torch.softmax(x / self.temperature, dim=-1) * self.logit_scale


def find_gating_positions(input_ids: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    """Per row, the index of the first token of the LAST occurrence of `pattern` (the end of the last user turn
    followed by the assistant header, e.g. Llama-3's <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n).
    A row without it is an error naming the row."""
    n = len(pattern)
    if input_ids.shape[1] < n:
        raise ValueError(f"sequences of {input_ids.shape[1]} tokens cannot hold the gating pattern ({n} tokens)")
    windows = input_ids.unfold(1, n, 1)  # [batch, L - n + 1, n]
    hits = (windows == torch.tensor(pattern, device=input_ids.device)).all(-1)
    positions = torch.arange(hits.shape[1], device=input_ids.device).expand_as(hits)
    last = torch.where(hits, positions, -1).max(dim=1).values
    if (last < 0).any():
        row = int((last < 0).nonzero()[0])
        raise ValueError(f"row {row} has no assistant turn after a user turn (gating pattern {pattern} not found)")
    return last


def armo_score(rewards: torch.Tensor, gating_output: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """The ArmoRM score: sum_k gating_output_k * (rewards @ transform)_k (transform removes verbosity)."""
    return (gating_output * (rewards @ transform.to(rewards.dtype))).sum(-1)


@dataclass
class ArmoRMOutput(ModelOutput):
    """score: [batch]; logits: score as [batch, 1]; rewards and gating_output: [batch, num_objectives]."""

    logits: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    gating_output: Optional[torch.Tensor] = None
    prompt_embedding: Optional[torch.Tensor] = None
    hidden_state: Optional[torch.Tensor] = None


class ArmoRMForSequenceClassification(PreTrainedModel):
    """score = sum_k gating_output_k * (rewards @ reward_transform_matrix)_k, with rewards = regression_layer of the
    last real token's hidden state and gating_output = gating(hidden state at the gating position)."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Attention is the backbone's: whatever it supports, this wrapper does.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.model = AutoModel.from_config(config)
        k = config.num_objectives
        self.regression_layer = nn.Linear(config.hidden_size, k, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(k), requires_grad=False)
        self.gating = GatingNetwork(config.hidden_size, k, config.gating_hidden_dim, config.gating_n_hidden,
                                    config.gating_temperature)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> ArmoRMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        # The last real token, whichever side the padding is on.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask * positions).argmax(-1)
        hidden_state = hidden[rows, last]
        rewards = self.regression_layer(hidden_state)
        prompt_embedding = hidden[rows, find_gating_positions(input_ids, self.config.gating_pattern)]
        gating_output = self.gating(prompt_embedding)
        score = armo_score(rewards, gating_output, self.reward_transform_matrix)
        return ArmoRMOutput(logits=score[:, None], score=score, rewards=rewards, gating_output=gating_output,
                            prompt_embedding=prompt_embedding, hidden_state=hidden_state)

    @torch.inference_mode()
    def explain(self, input_ids: torch.Tensor, top_k: int = 3) -> dict:
        """Which attributes drive the score of one sequence ([1, length] token ids): the score, per-attribute rewards
        and coefficients (gating_output @ T^T, so score = sum_k rewards_k * coefficient_k), and the top_k attributes by
        |coefficient| as (name, coefficient, reward) triples."""
        out = self(input_ids=input_ids)
        coefficients = (out.gating_output @ self.reward_transform_matrix.T.to(out.gating_output.dtype))[0]
        rewards = out.rewards[0]
        names = self.config.attribute_names
        top = torch.argsort(coefficients.abs(), descending=True)[:top_k].tolist()
        return {"score": float(out.score[0]), "rewards": dict(zip(names, rewards.tolist())),
                "coefficients": dict(zip(names, coefficients.tolist())),
                "top": [(names[k], float(coefficients[k]), float(rewards[k])) for k in top]}
