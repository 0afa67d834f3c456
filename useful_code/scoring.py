"""Batched scoring without autograd: every scoring forward in the project (BT rewards, PM answer logits, ArmoRM
embeddings, reload and export checks, benchmarks) runs through these helpers or under torch.inference_mode."""

from __future__ import annotations

import torch
from tqdm import tqdm


def length_sorted_batches(sequences: list[list[int]], batch_size: int, desc: str = "scoring", progress: bool = False):
    """Index lists of up to batch_size sequences, longest first, so each batch wastes little padding."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        yield order[start : start + batch_size]


def model_device(model) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device


@torch.inference_mode()
def score_sequences(model, tokenizer, sequences: list[list[int]], batch_size: int,
                    progress: bool = False) -> list[float]:
    """Scalar reward of each token sequence (logit 0), batched by length (longest first) to waste little padding."""
    device = model_device(model)
    rewards = [0.0] * len(sequences)
    for chunk in length_sorted_batches(sequences, batch_size, progress=progress):
        batch = tokenizer.pad({"input_ids": [sequences[i] for i in chunk]}, padding=True, return_tensors="pt")
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        for i, reward in zip(chunk, logits[:, 0].float().cpu().tolist()):
            rewards[i] = reward
    return rewards


def score_pairs(model, tokenizer, pairs, batch_size: int, progress: bool = True) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and rejected sequences of a tokenize_pairs() dataset, both sides batched together."""
    chosen, rejected = list(pairs["chosen_input_ids"]), list(pairs["rejected_input_ids"])
    rewards = score_sequences(model, tokenizer, chosen + rejected, batch_size, progress=progress)
    return rewards[: len(chosen)], rewards[len(chosen):]
