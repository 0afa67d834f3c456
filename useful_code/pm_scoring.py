"""Scoring with a pairwise preference model: P(first response preferred) in both orders, batched, and the
knock-out tournament that picks the best of n responses (pair-pm/rank_responses.py, eval_reward_bench_pm.py).

P(A preferred) is the softmax of the "A" and "B" logits at the answer position, read where training put the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from useful_code.cli import ModelOutputError, UserError
from useful_code.data_parallel import map_across_ranks
from useful_code.formats import text_start
from useful_code.modeling import PM_KINDS, load_for_scoring, load_preference_model
from useful_code.packing import packed_lm_logits, packed_rows, padding_free_ready, prefix_sharing_pays
from useful_code.pm_data import build_pm_prompt, encode_pm_prompts, label_token_ids
from useful_code.scoring import (
    DEFAULT_SCORING_TOKENS,
    left_padded,
    length_sorted_batches,
    model_device,
    once_each,
)
from useful_code.templates import truncate_all


@dataclass
class Match:
    """One knock-out comparison: indices into the candidate list and P(first beats second), both orders averaged."""

    first: int
    second: int
    prob_first: float

    @property
    def winner(self) -> int:
        """The index that goes through; an exact tie goes to the earlier candidate."""
        return self.first if self.prob_first >= 0.5 else self.second


@dataclass
class TournamentResult:
    """Outcome of a knock-out tournament over n candidates (n - 1 matches)."""

    winner: int
    matches: list[Match] = field(default_factory=list)
    rounds: int = 0


def knockout_tournaments(sizes: list[int], play) -> list[TournamentResult]:
    """Knock-out tournaments over sizes[p] candidates each: neighbours meet in order, an odd one out passes the
    round unplayed (a bye). play(pairings) gives P(first preferred) for each (p, i, j) of a round, all prompts'
    matches at once: the model's answers (PairPreferenceScorer.knockout_many) or a preference matrix already
    computed (the reward server's /compare)."""
    alive = [list(range(n)) for n in sizes]
    results = [TournamentResult(winner=-1) for _ in sizes]
    while any(len(a) > 1 for a in alive):
        pairings = [(p, alive[p][k], alive[p][k + 1]) for p in range(len(alive))
                    for k in range(0, len(alive[p]) - 1, 2)]
        survivors = [[] for _ in alive]
        for (p, i, j), prob in zip(pairings, play(pairings)):
            match = Match(i, j, float(prob))
            results[p].matches.append(match)
            survivors[p].append(match.winner)
        for p, a in enumerate(alive):
            if len(a) > 1:
                results[p].rounds += 1
            if len(a) % 2:
                survivors[p].append(a[-1])  # the bye
        alive = survivors
    for result, a in zip(results, alive):
        result.winner = a[0]
    return results


def check_finite(logits: np.ndarray, probs: np.ndarray, contexts: list[list[dict]]) -> None:
    """Stop on NaN or infinite answer logits or probabilities (rows: every pair with its first response as A, then
    every pair as B), naming how many and the first pair: its index in the call and the start of its last message,
    which says which prompt it is whichever script called. A NaN compares false, so it would silently send the second
    response through a tournament, count as wrong in an accuracy, and be written into JSON."""
    bad = np.flatnonzero(~(np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1)))
    if len(bad):
        n_pairs = len(contexts)
        pair, order = bad[0] % n_pairs, "A" if bad[0] < n_pairs else "B"
        text = contexts[pair][-1]["content"] if contexts[pair] else ""
        raise ModelOutputError(
            f"the preference model gave non-finite (NaN or infinite) A/B logits or probabilities for {len(bad)} of "
            f"{len(logits)} scored sequences (first: pair {pair} of {n_pairs} (0-based), prompt {text_start(text)}, "
            f"its first response shown as {order}); its weights may hold NaN, or the model overflows in this dtype")


class PairPreferenceScorer:
    """Scores pairs with a preference model: P(first response preferred), each pair in both orders, batched.

    All sequences of a call (both orders of every pair) share forward passes, packed without padding up to
    max_tokens_per_batch tokens where the model allows (else length-sorted and padded on the left, batch_size per
    forward), and only the last position's logits are computed."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, temperature: float = 1.0,
                 state=None, max_tokens_per_batch: int = DEFAULT_SCORING_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch  # padding-free forwards where the model allows (0: padded)
        self.max_length = max_length
        self.temperature = temperature
        self.token_a, self.token_b = label_token_ids(tokenizer)
        self.truncated = 0  # sequences cut to max_length so far (counted, reported by the caller)
        self.state = state  # a data_parallel.process_state(): the sequences of each call are split across its ranks

    @classmethod
    def from_pretrained(cls, path: str, flag: str = "--reward_name_or_path", bf16: bool = True,
                        attn_implementation: str = "auto", trust_remote_code: bool = False,
                        pickled_weights: bool = False, device=None, device_map=None, **kwargs):
        """Load a PM checkpoint (or hub name) onto device (default: the GPU if there is one), or spread over the
        GPUs with device_map='auto'."""
        model, tokenizer = load_for_scoring(load_preference_model, path, flag, bf16, attn_implementation,
                                            trust_remote_code, device=device, device_map=device_map,
                                            pickled_weights=pickled_weights, kinds=PM_KINDS)
        return cls(model, tokenizer, **kwargs)

    @torch.inference_mode()
    def label_logits(self, sequences: list[list[int]], progress: bool = False) -> np.ndarray:
        """[n, 2] float32 logits of "A" and "B" at the last position of each token sequence."""
        device = model_device(self.model)
        pad_id = self.tokenizer.pad_token_id
        out = np.zeros((len(sequences), 2), dtype=np.float32)
        if self.max_tokens_per_batch and padding_free_ready(self.model):
            for chunk, _, inputs in packed_rows(sequences, self.max_tokens_per_batch, device, progress=progress,
                                                share_prefix=prefix_sharing_pays(self.model)):
                logits = packed_lm_logits(self.model, inputs)
                out[chunk] = logits[:, [self.token_a, self.token_b]].float().cpu().numpy()
            return out
        for chunk in length_sorted_batches(sequences, self.batch_size, progress=progress):
            input_ids, attention_mask, position_ids = left_padded([sequences[i] for i in chunk], pad_id)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=1, use_cache=False).logits[:, -1]
            out[chunk] = logits[:, [self.token_a, self.token_b]].float().cpu().numpy()
        return out

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of PM prompts, cut from the left to max_length (counted in self.truncated)."""
        sequences, cut = truncate_all(self.tokenizer, encode_pm_prompts(self.tokenizer, prompts), self.max_length)
        self.truncated += cut
        return sequences

    def prob_first_preferred(self, contexts: list[list[dict]], first: list[str], second: list[str],
                             progress: bool = False) -> dict[str, np.ndarray]:
        """P(first preferred over second) for each pair: as response A, as response B, and their mean. NaN or
        infinite outputs are a ModelOutputError naming the first such pair (check_finite)."""
        n = len(contexts)
        if n == 0:  # a call with nothing to compare (every prompt of a rank's slice has one response)
            return {key: np.zeros(0, dtype=np.float32) for key in ("first_as_A", "first_as_B", "mean")}
        prompts = [build_pm_prompt(c, a, b) for c, a, b in zip(contexts, first, second)]
        prompts += [build_pm_prompt(c, b, a) for c, a, b in zip(contexts, first, second)]
        # A repeated comparison (two identical candidates) gets one result: its ties cannot depend on batching.
        logits = once_each(partial(map_across_ranks, self.state,
                                   lambda part: self.label_logits(part, progress).tolist()), self.encode(prompts))
        logits = np.asarray(logits, dtype=np.float32).reshape(-1, 2)
        # float64: a tiny --temperature took finite logits past float32's range (1e-40), an error blaming the model
        probs = torch.softmax(torch.from_numpy(logits.astype(np.float64) / self.temperature), dim=-1).float().numpy()
        check_finite(logits, probs, contexts)
        as_a = probs[:n, 0]  # first shown as A: P(answer A)
        as_b = probs[n:, 1]  # first shown as B: P(answer B)
        mean = (as_a + as_b) / 2
        # A response against itself: both orders are one prompt, whose P(A) + P(B) is 1 only up to rounding, so the
        # mean would land a hair off 0.5 and a benchmark would score the tie as a win or a loss.
        mean[[a == b for a, b in zip(first, second)]] = 0.5
        return {"first_as_A": as_a, "first_as_B": as_b, "mean": mean}

    def score_pairs(self, pairs, progress: bool = True) -> dict[str, np.ndarray]:
        """prob_first_preferred for standard-format pairs (chosen/rejected message lists): P(chosen preferred)."""
        return self.prob_first_preferred([c[:-1] for c in pairs["chosen"]], [c[-1]["content"] for c in pairs["chosen"]],
                                         [r[-1]["content"] for r in pairs["rejected"]], progress)

    def preference_matrices(self, contexts: list[list[dict]], responses: list[list[str]],
                            progress: bool = False) -> list[np.ndarray]:
        """For each prompt, P[i, j] = P(response i preferred over response j), both orders averaged (diagonal 0.5):
        every unordered pair of distinct responses is played once in both orders, all prompts' pairs in shared
        batches. A response repeated in the list shares its rows and columns, and 0.5 against its copy, so the copies'
        win rates are exactly equal (RewardBench 2 credits an exact tie)."""
        distinct = [list(dict.fromkeys(rs)) for rs in responses]
        pairings = [(p, i, j) for p, rs in enumerate(distinct) for i in range(len(rs)) for j in range(i + 1, len(rs))]
        probs = self.prob_first_preferred([contexts[p] for p, _, _ in pairings],
                                          [distinct[p][i] for p, i, _ in pairings],
                                          [distinct[p][j] for p, _, j in pairings], progress)["mean"]
        matrices = [np.full((len(rs), len(rs)), 0.5) for rs in distinct]
        for (p, i, j), prob in zip(pairings, probs):
            matrices[p][i, j], matrices[p][j, i] = prob, 1.0 - prob
        positions = [[rs.index(r) for r in responses[p]] for p, rs in enumerate(distinct)]
        return [m[np.ix_(at, at)] for m, at in zip(matrices, positions)]

    def response_scores(self, contexts: list[list[dict]], responses: list[list[str]],
                        progress: bool = True) -> list[list[float]]:
        """Each response's mean probability of being preferred over each other response to its prompt. A PM only
        compares, so this win rate is its score of a response (with two responses, P(first preferred) and its
        complement)."""
        return [((m.sum(axis=1) - 0.5) / max(len(m) - 1, 1)).tolist()
                for m in self.preference_matrices(contexts, responses, progress)]

    def knockout(self, context, responses: list[str]) -> TournamentResult:
        """Best of n responses by a knock-out tournament: n - 1 comparisons (each in both orders), one batch
        per round. With an odd number left, the last candidate passes the round unplayed. context: the messages
        before the responses, or a string, the user's message (as rank_responses.py reads a "prompt")."""
        if isinstance(context, str):
            context = [{"role": "user", "content": context}]
        return self.knockout_many([context], [responses])[0]

    def knockout_many(self, contexts: list[list[dict]], candidates: list[list[str]]) -> list[TournamentResult]:
        """Run one tournament per prompt; the matches of a round across all prompts share forward passes."""
        if any(len(c) == 0 for c in candidates):
            raise UserError("a tournament needs at least one candidate response per prompt")
        return knockout_tournaments([len(c) for c in candidates], lambda pairings: self.prob_first_preferred(
            [contexts[p] for p, _, _ in pairings], [candidates[p][i] for p, i, _ in pairings],
            [candidates[p][j] for p, _, j in pairings])["mean"])
