"""One scoring interface over the three kinds of checkpoint this project makes: a Bradley-Terry sequence classifier,
an exported ArmoRM model and a pairwise preference model (the kind is read from the checkpoint's config). The reward
server and dataset scoring use it; its rewards are the eval scripts' (same templating, truncation and scoring)."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
from transformers import AutoConfig

from useful_code.armo_embeddings import check_gating_sequences
from useful_code.cli import UserError, load_error
from useful_code.formats import CONVERSATION_RULES, validate_conversation
from useful_code.modeling import load_for_scoring, load_reward_model
from useful_code.openrlhf_format import openrlhf_value_head
from useful_code.pm_scoring import PairPreferenceScorer, knockout_tournaments
from useful_code.scoring import DEFAULT_SCORING_TOKENS, score_sequences, split_by_sizes
from useful_code.templates import (
    SPECIAL_TOKEN_RULES,
    TemplateRefusal,
    assistant_turn_end,
    chat_template_error,
    encode_conversations,
    special_token_pattern,
    tokenizer_adds_bos,
    truncate_all,
)

KINDS = {"bt": "Bradley-Terry reward model", "armo": "ArmoRM (multi-objective) reward model",
         "pm": "pairwise preference model"}


def checkpoint_kind(path: str, flag: str = "--reward_name_or_path") -> str:
    """'armo', 'bt' or 'pm', from the architecture the checkpoint's config names (a reward model trained by OpenRLHF
    is a BT model)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise load_error(flag, "model", path, err) from None
    architectures = config.architectures or []
    if openrlhf_value_head(config) is not None:
        return "bt"
    if any(a.startswith("ArmoRM") for a in architectures):
        return "armo"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "bt"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "pm"
    raise UserError(f"{flag}: '{path}' is a {', '.join(architectures) or 'model of no named architecture'}; a reward "
                    "model is a sequence classifier (BT, ArmoRM) or a causal LM (preference model)")


# Names of a learned table of absolute positions (BERT/RoBERTa/ELECTRA: position_embeddings, GPT-2: wpe, OPT/BioGPT:
# embed_positions, ...): a model with one cannot read past its last row. Rotary (Llama, Qwen, ModernBERT) and relative
# (T5, DeBERTa-v3) positions have no such table, and those models run past max_position_embeddings.
_POSITION_TABLES = ("position_embeddings", "position_embedding", "wpe", "embed_positions", "pos_emb", "positions_embed")


def learned_position_limit(model) -> Optional[int]:
    """The most tokens a model with a learned table of absolute positions can read (its config's
    max_position_embeddings less the rows an offset skips: RoBERTa's positions start after its padding index, OPT's
    after 2), or None when its positions are not a learned table (RoPE, relative positions) or the config names no
    max_position_embeddings."""
    if getattr(model.config, "max_position_embeddings", None) is None:
        return None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            offset = getattr(module, "offset", 0)
            if module.padding_idx is not None:
                offset = max(offset, module.padding_idx + 1)
            return module.num_embeddings - offset
    return None


def _armo_outputs(outputs) -> torch.Tensor:
    """An ArmoRM forward's score, attribute rewards and gating weights, one row per sequence."""
    return torch.cat([outputs.score[:, None], outputs.rewards, outputs.gating_output], dim=-1)


def without_leading_bos(text: str, bos: str, keep_one: bool) -> str:
    """text less the run of bos tokens it starts with; keep_one: one of them stays (a tokenizer that adds none)."""
    stripped = text
    while stripped.startswith(bos):
        stripped = stripped[len(bos):]
    return bos + stripped if keep_one and stripped != text else stripped


class RewardScorer:
    """A loaded reward model of any kind: conversations (or already templated texts) in, rewards out; a preference
    model compares responses instead."""

    def __init__(self, kind: str, model, tokenizer, max_length: int, batch_size: int,
                 preference: Optional[PairPreferenceScorer] = None, max_tokens_per_batch: int = DEFAULT_SCORING_TOKENS):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.max_length, self.batch_size, self.max_tokens_per_batch = max_length, batch_size, max_tokens_per_batch
        self.preference = preference
        self.attributes = list(getattr(model.config, "attribute_names", [])) if kind == "armo" else []
        # ArmoRM reads its gating input at the last user -> assistant turn boundary: a sequence without it fails
        # inside the model, so encoding refuses it first (check_gating).
        self.gating_pattern = (np.asarray(model.config.gating_pattern) if kind == "armo"
                               and getattr(model.config, "gating_pattern", None) else None)
        # A model with a learned position table reads at most position_limit tokens: max_length is lowered to it.
        self.position_limit = learned_position_limit(model)
        if self.position_limit is not None and self.position_limit < max_length:
            self.max_length = self.position_limit
            if preference is not None:
                preference.max_length = self.position_limit
            print(f"note: max_length {max_length} is over the {self.position_limit} positions "
                  f"{type(model).__name__} has learned: longer inputs are cut from the left to {self.position_limit} "
                  "tokens (counted)", flush=True)
        self.adds_bos = tokenizer_adds_bos(tokenizer)  # asked once: four tokenizer calls a request otherwise
        self.special_tokens = special_token_pattern(tokenizer)
        # Runs of pad and EOS tokens at either end of a text: what a left-padded batch_decode (OpenRLHF before
        # 0.8.3) leaves around a query. \Z, not $: "$" also matches before a final newline (Qwen's '<|im_end|>\n').
        edges = "|".join(re.escape(t) for t in {tokenizer.pad_token, tokenizer.eos_token} if t)
        self._leading_padding = re.compile(f"^(?:{edges})+") if edges else None
        self._trailing_padding = re.compile(f"(?:{edges})+\\Z") if edges else None
        # How a templated assistant turn ends (Qwen: '<|im_end|>\n'; Phi-3: '<|end|>\n<|endoftext|>'), that ending
        # less its trailing EOS (which the padding strip removes from a query too), and the starts of it that stop at
        # one of its special tokens (Gemma: '<end_of_turn>', where generation stops): complete_turn's material.
        self.turn_end = assistant_turn_end(tokenizer, self.adds_bos)
        self._turn_end_body = (self._trailing_padding.sub("", self.turn_end) if self._trailing_padding is not None
                               else self.turn_end)
        starts = ([m.end() for m in self.special_tokens.finditer(self._turn_end_body)]
                  if self.special_tokens.match(self._turn_end_body or " ") else [])
        self._turn_end_starts = [self._turn_end_body[:end] for end in reversed(starts)
                                 if end < len(self._turn_end_body)]

    @classmethod
    def from_pretrained(cls, path: str, flag: str = "--reward_name_or_path", max_length: int = 4096,
                        batch_size: int = 8, bf16: bool = True, attn_implementation: str = "auto",
                        trust_remote_code: bool = False, pickled_weights: bool = False, device=None, state=None,
                        max_tokens_per_batch: int = DEFAULT_SCORING_TOKENS):
        """Load a checkpoint of any kind (see checkpoint_kind) for scoring; state splits PM comparisons across
        ranks (data_parallel.process_state()); max_tokens_per_batch bounds a padding-free forward (0: padded
        batches of batch_size)."""
        kind = checkpoint_kind(path, flag)
        if kind == "pm":
            preference = PairPreferenceScorer.from_pretrained(
                path, flag, bf16, attn_implementation, trust_remote_code, pickled_weights, device=device,
                batch_size=batch_size, max_length=max_length, state=state, max_tokens_per_batch=max_tokens_per_batch)
            return cls(kind, preference.model, preference.tokenizer, max_length, batch_size, preference,
                       max_tokens_per_batch)
        model, tokenizer = load_for_scoring(load_reward_model, path, flag, bf16, attn_implementation,
                                            trust_remote_code, device=device, pickled_weights=pickled_weights)
        return cls(kind, model, tokenizer, max_length, batch_size, max_tokens_per_batch=max_tokens_per_batch)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in."""
        return next(self.model.parameters()).dtype

    def encode_conversations(self, conversations: list[list[dict]],
                             where: str = "conversation {}") -> tuple[list[list[int]], int]:
        """Token ids of conversations templated with the checkpoint's tokenizer, cut from the left to max_length
        (as in training and evaluation); and how many were cut. where names item i in an error (where.format(i))."""
        try:
            sequences = encode_conversations(self.tokenizer, conversations, adds_bos=self.adds_bos)
        except TemplateRefusal:  # name the conversation the template refuses (Gemma: a system message)
            refused = next(((i, e) for i, e in enumerate(chat_template_error(self.tokenizer, c) for c in conversations)
                            if e), None)
            if refused is None:
                raise
            index, message = refused
            raise UserError(f"{where.format(index)}: the model's chat template refuses it ({message})") from None
        return self._truncate(sequences, where)

    def _truncate(self, sequences: list[list[int]], where: str) -> tuple[list[list[int]], int]:
        cut_sequences, cut = truncate_all(self.tokenizer, sequences, self.max_length, self.adds_bos)
        self.check_gating(cut_sequences, where, [len(s) > self.max_length for s in sequences])
        return cut_sequences, cut

    def check_gating(self, sequences: list[list[int]], where: str, was_cut: Optional[list[bool]] = None) -> None:
        """ArmoRM: every sequence must hold the gating pattern, a sequence without it is a UserError naming
        where.format(i) and the rule (check_gating_sequences). Other kinds: nothing."""
        if self.gating_pattern is not None:
            check_gating_sequences(self.tokenizer, sequences, self.gating_pattern, where.format, self.max_length,
                                   was_cut)

    def check_conversation(self, messages: list[dict], where: str, ends_with_assistant: bool = True) -> None:
        """The project's rules of a conversation (CONVERSATION_RULES, as the eval scripts and score_dataset apply
        them, and no special token as text): a broken one is a UserError naming `where` and the rule. With
        ends_with_assistant False, messages is a context that a response will complete."""
        reason = validate_conversation(messages if ends_with_assistant
                                       else messages + [{"role": "assistant", "content": "response"}])
        if not reason and any(self.special_tokens.search(m["content"]) for m in messages):
            reason = "special_token_in_content"
        if reason:
            rule = {**CONVERSATION_RULES, **SPECIAL_TOKEN_RULES}[reason]
            raise UserError(f"{where}: {rule} ({reason})")

    def complete_turn(self, text: str) -> str:
        """A query (a templated prompt and response, as OpenRLHF sends it) made to end as the chat template ends an
        assistant turn, where training and evaluation read the reward. Pad and EOS tokens around it go (OpenRLHF
        before 0.8.3 sent left-padded batch_decode text with the EOS and right padding after the response). A
        response that generation stopped at the start of the turn's ending (Gemma: '<end_of_turn>', without the
        template's '\\n'), or that ended with EOS or padding (Qwen: '<|im_end|>', its EOS), gets the rest of that
        ending: read at the stop token instead, a Qwen model's rewards ranked 30 toy pairs 33% right against 93%.
        A text that ends otherwise is scored as it is."""
        if self._leading_padding is not None:
            text = self._leading_padding.sub("", text)
        body = self._trailing_padding.sub("", text) if self._trailing_padding is not None else text
        ended = body != text  # the response ended with EOS or padding: its turn is over
        # A whitespace-only ending (Llama-2's ' ' before '</s>') marks no turn end by itself: only before an EOS.
        whole = [self._turn_end_body] if self._turn_end_body.strip() or (ended and self._turn_end_body) else []
        for start in whole + self._turn_end_starts:
            if body.endswith(start):
                return body + self.turn_end[len(start):]
        return body + (self.turn_end or self.tokenizer.eos_token) if ended else body

    def encode_texts(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids of already templated texts (a prompt and its response, as OpenRLHF sends them), ending as the
        template ends a turn (complete_turn), cut from the left to max_length, tokenized as training tokenizes its
        templated text (render_conversations: a BOS the tokenizer adds itself is taken off the text first, so a text
        that starts with it gets no second one). A run of BOS tokens at the start (a templated text tokenized again
        with special tokens) counts as one. A text with nothing but special tokens is a UserError."""
        texts = [self.complete_turn(text) for text in texts]
        empty = [i for i, text in enumerate(texts) if not self.special_tokens.sub("", text).strip()]
        if empty:
            raise UserError(f"query {empty[0]}: the text has nothing to score but special tokens or spaces "
                            f"({len(empty)} such queries)")
        bos = self.tokenizer.bos_token
        if bos:
            # Not '<s>' left in the text with add_special_tokens=False: a SentencePiece tokenizer that marks only the
            # text's first word ('▁', Llama 2, Mistral) would then tokenize the text after it otherwise than training.
            texts = [without_leading_bos(text, bos, keep_one=not self.adds_bos) for text in texts]
        return self._truncate(self.tokenizer(texts, add_special_tokens=True)["input_ids"], "query {}")

    def score(self, sequences: list[list[int]]) -> dict:
        """Rewards of token sequences (BT, ArmoRM); for ArmoRM also each sequence's attribute rewards and gating
        weights."""
        if self.kind == "pm":
            raise UserError("a pairwise preference model compares responses; it gives no reward to one sequence")
        if self.kind == "bt":
            return {"rewards": score_sequences(self.model, self.tokenizer, sequences, self.batch_size,
                                               max_tokens_per_batch=self.max_tokens_per_batch)}
        rows = score_sequences(self.model, self.tokenizer, sequences, self.batch_size, read=_armo_outputs)
        k = len(self.attributes)
        return {"rewards": [r[0] for r in rows], "attribute_rewards": [r[1:1 + k] for r in rows],
                "gating_weights": [r[1 + k:] for r in rows]}

    def compare(self, contexts: list[list[dict]], candidates: list[list[str]]) -> tuple[list[dict], int]:
        """PM: for each context, P(response i preferred over response j) for every pair (both orders averaged, all
        comparisons in shared batches) and the knock-out tournament's winner, played on that matrix
        (knockout_tournaments); and how many sequences this call cut to max_length (each pair's two orders are two
        sequences). Not to be run by two threads at once (the server runs it on its one scoring thread)."""
        if self.kind != "pm":
            raise UserError(f"comparing responses needs a pairwise preference model; this is a {KINDS[self.kind]}")
        cut_before = self.preference.truncated
        matrices = [m.tolist() for m in self.preference.preference_matrices(contexts, candidates)]
        cut = self.preference.truncated - cut_before
        tournaments = knockout_tournaments([len(m) for m in matrices], lambda pairings: [
            matrices[p][i][j] for p, i, j in pairings])
        return [{"probabilities": m, "winner": t.winner} for m, t in zip(matrices, tournaments)], cut

    def response_scores(self, contexts: list[list[dict]], candidates: list[list[str]]) -> tuple[list[list[float]], int]:
        """A score for every candidate response of every context, and how many sequences were cut: BT and ArmoRM
        score each (context + response) once, in shared batches; a PM scores a response by its mean probability of
        being preferred over the other candidates (as its RewardBench 2 evaluation does)."""
        if self.kind == "pm":
            cut_before = self.preference.truncated
            scores = self.preference.response_scores(contexts, candidates, progress=False)
            return scores, self.preference.truncated - cut_before
        conversations = [context + [{"role": "assistant", "content": response}]
                         for context, responses in zip(contexts, candidates) for response in responses]
        sequences, cut = self.encode_conversations(conversations)
        return split_by_sizes(self.score(sequences)["rewards"], [len(c) for c in candidates]), cut

