"""Math reward models' scoring: a solution is rendered with "+" in every assistant turn, ONE forward runs, and P(+) =
softmax over the "+"/"-" logits is read at every label position. Upstream ran one forward per step over the whole
prefix; by causality both read the same logits."""

from __future__ import annotations

import math
from typing import Callable

import torch

from useful_code.cli import ModelOutputError
from useful_code.data_parallel import map_across_ranks
from useful_code.math_data import encode_labeled, label_token_ids
from useful_code.formats import text_start
from useful_code.modeling import MATH_KINDS, load_for_scoring, load_preference_model
from useful_code.scoring import left_padded, length_sorted_batches, model_device
from useful_code.templates import tokenizer_adds_bos, truncate_left


class StepScorer:
    """P(+) at every label position of templated chats: one forward per conversation, batched by length.

    Sequences are padded on the left with position ids counted from each one's first real token (as unpadded), and
    logits are computed only at the positions read (a boolean logits_to_keep), so a batch never holds
    [batch, length, vocabulary] logits."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, state=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.state = state  # a data_parallel.process_state(): the conversations are split across its ranks
        self.plus, self.minus = label_token_ids(tokenizer)
        self.truncated = 0  # sequences cut to max_length so far (counted, reported by the caller)

    @classmethod
    def from_pretrained(cls, path: str, flag: str = "--reward_name_or_path", bf16: bool = True,
                        attn_implementation: str = "auto", trust_remote_code: bool = False,
                        pickled_weights: bool = False, device=None, device_map=None, **kwargs):
        """Load a PRM/ORM checkpoint (or hub name): a causal LM, onto device (default: the GPU if there is one)."""
        model, tokenizer = load_for_scoring(load_preference_model, path, flag, bf16, attn_implementation,
                                            trust_remote_code, device=device, device_map=device_map,
                                            pickled_weights=pickled_weights, kinds=MATH_KINDS)
        return cls(model, tokenizer, **kwargs)

    def truncate(self, encoded: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """Sequences over max_length cut from the left (BOS kept), counted in self.truncated. A label whose read
        position was cut off gets position -1 (its step scores NaN); the last label is always kept."""
        keep_first = tokenizer_adds_bos(self.tokenizer)
        out = []
        for ids, positions in encoded:
            cut = len(ids) - self.max_length
            if cut <= 0:
                out.append((ids, positions))
                continue
            self.truncated += 1
            first_kept = cut + 1 if keep_first else cut  # the first original index still there (BOS aside)
            out.append((truncate_left(ids, self.max_length, keep_first),
                        [p - cut if p - 1 >= first_kept else -1 for p in positions]))
        return out

    @torch.inference_mode()
    def label_probs(self, encoded: list[tuple[list[int], list[int]]], progress: bool = False,
                    describe: Callable[[int], str] = "sequence {} of the call (0-based)".format) -> list[list[float]]:
        """P(+) (softmax over the "+"/"-" logits) predicted for each label position of each sequence, read one
        position before it; NaN for a position of -1. NaN or infinite logits stop the call, naming the first such
        sequence by describe(its index in encoded)."""
        device = model_device(self.model)
        pad_id = self.tokenizer.pad_token_id
        out: list[list[float]] = [[] for _ in encoded]
        for chunk in length_sorted_batches([ids for ids, _ in encoded], self.batch_size, progress=progress):
            input_ids, attention_mask, position_ids = left_padded([encoded[i][0] for i in chunk], pad_id)
            width = input_ids.shape[1]
            keep = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                ids, positions = encoded[i]
                keep[row, [width - len(ids) + p - 1 for p in positions if p > 0]] = True
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=keep.to(device),
                                use_cache=False).logits
            if logits.dim() == 3:  # a model that computed every position anyway
                logits = logits[keep.to(logits.device)]
            answer_logits = logits[:, [self.plus, self.minus]].float()
            bad = ~torch.isfinite(answer_logits).all(-1)
            if bad.any():  # a NaN P(+) would pass for a step cut off and be left out
                # logits_to_keep returns the kept positions row by row: the first bad one's row is its sequence's
                first_row = int(keep.nonzero()[int(bad.nonzero()[0]), 0])
                raise ModelOutputError(f"the math reward model gave NaN or infinite '+'/'-' logits at "
                                       f"{int(bad.sum())} of {len(answer_logits)} label positions of a batch (first: "
                                       f"{describe(chunk[first_row])}); its weights may hold NaN, or it overflows in "
                                       "this dtype")
            probs = torch.softmax(answer_logits, dim=-1)[:, 0].cpu().tolist()
            # The kept positions come row by row, each row's in order: hand them back in that order.
            start = 0
            for i in chunk:
                positions = encoded[i][1]
                n = sum(p > 0 for p in positions)
                row_probs = iter(probs[start:start + n])
                out[i] = [next(row_probs) if p > 0 else math.nan for p in positions]
                start += n
        return out

    def score_conversations(self, conversations: list[list[dict]], progress: bool = True, name: str = "data",
                            chunk_size: int = 4096) -> list[list[float]]:
        """P(+) at each assistant turn of each conversation, the conversations split across the ranks of state.
        Each rank encodes and scores its slice chunk by chunk, so token ids are never held for all solutions at once
        (best-of-1024 on MATH500 is half a million solutions); self.truncated counts the cuts on every rank."""

        def score(part: list) -> list[tuple[list[float], bool]]:
            results = []
            for start in range(0, len(part), chunk_size):
                encoded = encode_labeled(self.tokenizer, part[start:start + chunk_size], name)
                cut = [len(ids) > self.max_length for ids, _ in encoded]
                results += zip(self.label_probs(self.truncate(encoded), progress,
                                                lambda i: describe_solution(part[start + i], start + i)), cut)
            return results

        before = self.truncated
        scored = map_across_ranks(self.state, score, conversations)
        self.truncated = before + sum(cut for _, cut in scored)
        return [probs for probs, _ in scored]


def describe_solution(conversation: list[dict], index: int) -> str:
    """A solution named for an error: its index among those scored, and the start of its first user message, which
    says which problem it is whichever script and rank scored it."""
    text = next((m["content"] for m in conversation if m["role"] == "user"), "")
    return f"solution {index} (0-based), problem {text_start(text)}"
