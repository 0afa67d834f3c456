"""Batched scoring without autograd: every scoring forward in the project (BT rewards, PM answer logits, ArmoRM
embeddings, reload and export checks, benchmarks) runs through these helpers or under torch.inference_mode."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from tqdm import tqdm

from useful_code.data_parallel import map_across_ranks


def length_sorted_batches(sequences: list[list[int]], batch_size: int, desc: str = "scoring", progress: bool = False):
    """Index lists of up to batch_size sequences, longest first, so each batch wastes little padding."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        yield order[start : start + batch_size]


def model_device(model) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device


def reward_logit(outputs) -> torch.Tensor:
    """The reward of a sequence classifier's outputs: logit 0, one per sequence."""
    return outputs.logits[:, 0]


@torch.inference_mode()
def score_sequences(model, tokenizer, sequences: list[list[int]], batch_size: int, progress: bool = False,
                    read: Callable = reward_logit) -> list:
    """read(outputs) of each token sequence (default: its scalar reward, logit 0; an ArmoRM's attribute rewards
    with another read), batched by length (longest first) to waste little padding."""
    device = model_device(model)
    results = [None] * len(sequences)
    for chunk in length_sorted_batches(sequences, batch_size, progress=progress):
        batch = tokenizer.pad({"input_ids": [sequences[i] for i in chunk]}, padding=True, return_tensors="pt")
        outputs = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        for i, value in zip(chunk, read(outputs).float().cpu().tolist()):
            results[i] = value
    return results


def score_pairs(model, tokenizer, pairs, batch_size: int, progress: bool = True,
                state=None) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and rejected sequences of a tokenize_pairs() dataset, both sides batched together (split
    across the ranks of state, a data_parallel.process_state(), when given)."""
    chosen, rejected = list(pairs["chosen_input_ids"]), list(pairs["rejected_input_ids"])
    score = partial(score_sequences, model, tokenizer, batch_size=batch_size, progress=progress)
    rewards = map_across_ranks(state, score, chosen + rejected)
    return rewards[: len(chosen)], rewards[len(chosen):]


def split_by_sizes(flat: list, sizes: list[int]) -> list[list]:
    """flat cut into consecutive groups of the given sizes (the completions of each prompt)."""
    groups, start = [], 0
    for size in sizes:
        groups.append(flat[start : start + size])
        start += size
    return groups
