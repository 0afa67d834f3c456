"""Tokenizers and chat templates: a pad token that is never EOS, exactly one BOS, left truncation, and the
tokenized pairs every BT script trains and scores on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from useful_code.cli import UserError, load_error
from useful_code.formats import enforce_validity, map_rows
from useful_code.openrlhf_format import is_openrlhf_reward_model, read_as_openrlhf


class TemplateRefusal(UserError):
    """The chat template raised for a conversation (Gemma's "System role not supported"): the data's fault, said in
    one line; callers that can name the row and drop it (--skip_invalid) catch it (reject_untemplatable)."""


SPECIAL_TOKEN_RULES = {
    "special_token_in_content": "no message may contain one of the tokenizer's special tokens as text (it would "
                                "become a real control token, such as a forged turn break)",
}


# Chat templates for models that have none (a base decoder, a BERT-style encoder), by name for --chat_template.
BUILTIN_CHAT_TEMPLATES = {
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    # Plain text turns: what an encoder that never saw chat markup reads best.
    "plain": "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}",
}


def resolve_chat_template(value: str, flag: str = "--chat_template") -> str:
    """A Jinja chat template from a file path or the name of a BUILTIN_CHAT_TEMPLATES entry."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"{flag}: '{value}' is neither a file nor one of {', '.join(BUILTIN_CHAT_TEMPLATES)}")
    template = path.read_text()
    if not template.strip():
        raise UserError(f"{flag}: {path} is empty")
    return template


def load_tokenizer(name: str, flag: str, trust_remote_code: bool = False, chat_template: Optional[str] = None):
    """Load a tokenizer, pad on the right, and make sure it has a pad token distinct from EOS. chat_template (a file
    or a built-in name) replaces the model's own; it is saved with the tokenizer, so evaluation and serving format
    conversations the same way."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(flag, "tokenizer", name, err) from None
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    if not (tokenizer.chat_template or "").strip():  # none, or an empty file left by a killed save
        raise UserError(f"{flag}: tokenizer of '{name}' has no chat template; use an instruct/chat model or give one "
                        f"with --chat_template (a Jinja file, or {', '.join(BUILTIN_CHAT_TEMPLATES)})")
    if is_openrlhf_reward_model(name):
        read_as_openrlhf(tokenizer)
        print(f"note: {flag} '{name}' is a reward model trained by OpenRLHF: each conversation ends as its trainer "
              "ended one (trailing newlines removed, then ' ' + EOS unless it ends with EOS), where it reads the reward")
    # Right padding keeps position ids identical to the unpadded sequence, so a reward does not depend on
    # what it was batched with; the classifier reads the last non-pad token either way.
    tokenizer.padding_side = "right"
    # Every path here cuts sequences to its own --max_length and counts the cuts: transformers' warning about a text
    # longer than the tokenizer's model_max_length (said once, with a limit that is not the one in force) misleads.
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    ensure_pad_token(tokenizer)
    return tokenizer


# Unused special tokens that model families reserve; taking one avoids growing the embedding matrix.
_RESERVED_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]", "<|pad|>")


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token that neither is EOS nor ends a templated conversation; return True if a new
    token was added to the vocab.

    A sequence classifier reads its reward at the last non-pad token, so padding with the token that ends every
    conversation (EOS, or the template's end of turn) makes it skip that token and score the wrong one (upstream's
    identical Llama-3 rewards); a packed row reads the true last token, so the two would disagree too."""
    ending_ids = {tokenizer.eos_token_id, _last_template_token(tokenizer)} - {None}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ending_ids:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in _RESERVED_PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in ending_ids and vocab[candidate] != tokenizer.bos_token_id:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return True


def _last_template_token(tokenizer) -> Optional[int]:
    """The token id that ends a templated user-assistant exchange (None when the template cannot render one)."""
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                            tokenize=True)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return None  # no template, or one with rules of its own (a required system turn, ...): EOS alone is checked
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return ids[-1] if ids else None


def template_marker_tokens(tokenizer) -> set[str]:
    """Added tokens not flagged special that the chat template writes between turns (DeepSeek-R1's '<｜User｜>' and
    '<｜Assistant｜>'): typed as text they forge turns all the same. Read from a rendered user/assistant/user probe:
    one that does not end on an assistant turn, so reasoning tags (Qwen3's <think>) stay allowed in text."""
    plain = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    if not plain or not getattr(tokenizer, "chat_template", None):
        return set()
    probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
             {"role": "user", "content": "Thanks"}]
    try:
        text = render_conversations(tokenizer, [probe])[0]
    except UserError:  # a template that refuses the probe has no markers to learn from it
        return set()
    return {plain[i] for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in plain}


def special_token_pattern(tokenizer) -> re.Pattern:
    """A regex matching any of the tokenizer's special tokens (BOS, EOS, pad, turn markers, reserved tokens), and
    the template's turn markers that are added tokens without the special flag (template_marker_tokens)."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= template_marker_tokens(tokenizer)
    # Longest first (a token that is a prefix of another must not match first); then by text, so that the pattern,
    # and the fingerprint of every datasets.map that uses it, is the same in every process (a set's order is not):
    # otherwise the tokenized data is never reused from the cache, and every rank tokenizes again.
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=lambda t: (-len(t), t)) if t))


def reject_special_tokens(dataset, tokenizer, columns: tuple[str, ...], skip_invalid: bool, name: str,
                          num_proc: Optional[int] = None):
    """Check that no message in the given message-list columns contains a special token as text: such a row is an
    error naming it, or with skip_invalid is dropped and counted (num_proc: datasets.map's processes). Returns
    (dataset, number dropped)."""
    pattern = special_token_pattern(tokenizer)

    def reason(*conversations) -> dict:
        forged = any(pattern.search(m["content"]) for messages in conversations for m in messages)
        return {"invalid_reason": "special_token_in_content" if forged else ""}

    marked = map_rows(dataset, reason, list(columns), f"checking {name} for special tokens", num_proc)
    checked, stats = enforce_validity(marked, SPECIAL_TOKEN_RULES, skip_invalid, name)
    return checked, stats["read"] - stats["used"]


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether calling the tokenizer on text prepends a start token by itself (a decoder's BOS, an encoder's [CLS]):
    the token left truncation must keep."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(marked) > len(plain) and marked[0] in tokenizer.all_special_ids and marked[1:1 + len(plain)] == plain


TEMPLATE_REJECTS = "chat_template_rejects"


def single_token_ids(tokenizer, labels, model_kind: str) -> tuple[int, ...]:
    """Token ids of the answer labels a model's probability is read from ("A"/"B", "+"/"-"): each must be a single
    token, or one line naming the label and what it encodes to."""
    ids = []
    for label in labels:
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"the tokenizer encodes the label '{label}' as {len(encoded)} tokens {encoded}; "
                            f"{model_kind} needs {' and '.join(repr(lab) for lab in labels)} to be single tokens")
        ids.append(encoded[0])
    return tuple(ids)


def chat_template_error(tokenizer, conversation: list[dict]) -> str:
    """'' when the tokenizer's chat template renders the conversation, else the template's own message (Gemma-2's
    template raises 'System role not supported' for a system message)."""
    try:
        tokenizer.apply_chat_template(conversation, tokenize=False)
    except TemplateError as err:
        return str(err) or type(err).__name__
    return ""


def reject_untemplatable(dataset, tokenizer, columns: tuple[str, ...], skip_invalid: bool, name: str):
    """Check that the chat template renders every conversation of the given message-list columns: a row it refuses
    is an error naming the row and the template's message, or with skip_invalid is dropped and counted (where
    templating would stop the run with a jinja traceback). Returns (dataset, number dropped)."""

    def check(row) -> dict:
        error = next((e for e in (chat_template_error(tokenizer, row[c]) for c in columns) if e), "")
        return {"invalid_reason": TEMPLATE_REJECTS if error else "", "template_error": error}

    marked = dataset.map(check, desc=f"checking {name} against the chat template")
    rules = {TEMPLATE_REJECTS: template_rejects_rule(marked["template_error"])}
    checked, stats = enforce_validity(marked.remove_columns("template_error"), rules, skip_invalid, name)
    return checked, stats["read"] - stats["used"]


def template_rejects_rule(errors: list[str]) -> str:
    """The rule of TEMPLATE_REJECTS, quoting what the template raised (its first three messages of errors)."""
    said = sorted({e for e in errors if e})
    return ("the model's chat template must accept the conversation (it raised: "
            f"{'; '.join(map(repr, said[:3]))}{' ...' if len(said) > 3 else ''})")


# The date a template that writes one sees (Llama 3.2's "Today Date: ..." is today's unless given): one fixed date, so
# that training, evaluation and serving on different days template the same text and give the same rewards. It is
# Llama 3.1's own default; templates without a date ignore it.
TEMPLATE_DATE = "26 Jul 2024"


def render_conversations(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False,
                         adds_bos: Optional[bool] = None) -> list[str]:
    """Apply the chat template as upstream does: the BOS the template writes is removed when the tokenizer
    adds its own, so every sequence starts with exactly one BOS; a template that writes a date gets TEMPLATE_DATE.
    adds_bos: tokenizer_adds_bos(tokenizer), when the caller has it already (a server asks once, not per request)."""
    try:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False,
                                              add_generation_prompt=add_generation_prompt, date_string=TEMPLATE_DATE)
    except TemplateError as err:  # a template's own refusal (Gemma's "System role not supported"): the data's fault
        raise TemplateRefusal(f"the model's chat template refuses a conversation of this data ({err}); change the "
                              "data (e.g. merge a system message into the first user turn)") from None
    bos = tokenizer.bos_token
    if bos and (tokenizer_adds_bos(tokenizer) if adds_bos is None else adds_bos):
        texts = [t[len(bos):] if t.startswith(bos) else t for t in texts]
    return texts


def assistant_turn_end(tokenizer, adds_bos: Optional[bool] = None) -> str:
    """The text the chat template writes after an assistant message that ends the conversation: what every trained
    and evaluated sequence ends with, where the reward is read ('<|eot_id|>' for Llama 3, '<|im_end|>\\n' for Qwen,
    '<end_of_turn>\\n' for Gemma); '' when the template writes nothing there or changes the message's text."""
    probe = "Zq7 probe reply"
    text = render_conversations(tokenizer, [[{"role": "user", "content": "Hello"},
                                             {"role": "assistant", "content": probe}]], adds_bos=adds_bos)[0]
    return text[text.rfind(probe) + len(probe):] if probe in text else ""


def encode_conversations(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False,
                         adds_bos: Optional[bool] = None) -> list[list[int]]:
    """Token ids of each conversation, templated, untruncated (adds_bos: as in render_conversations)."""
    texts = render_conversations(tokenizer, conversations, add_generation_prompt, adds_bos)
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def truncate_left(ids: list[int], max_length: int, keep_first: bool) -> list[int]:
    """Keep the last max_length tokens (where a reward, embedding or answer is read), and with keep_first the
    first token (the BOS) too."""
    if len(ids) <= max_length:
        return ids
    return ids[:1] + ids[len(ids) - max_length + 1:] if keep_first else ids[len(ids) - max_length:]


def truncate_all(tokenizer, sequences: list[list[int]], max_length: int,
                 adds_bos: Optional[bool] = None) -> tuple[list[list[int]], int]:
    """Every sequence cut to its last max_length tokens, keeping the BOS the tokenizer adds (adds_bos: as in
    render_conversations); returns them and how many were cut."""
    keep_first = tokenizer_adds_bos(tokenizer) if adds_bos is None else adds_bos
    cut = sum(len(s) > max_length for s in sequences)
    return [truncate_left(s, max_length, keep_first) for s in sequences], cut


def reject_same_tokens(encoded, skip_invalid: bool, name: str, max_length: int):
    """Pairs whose chosen and rejected differ as text but not as templated, cut tokens: the chat template drops what
    tells them apart (reasoning before '</think>', surrounding spaces), or the left cut to max_length does (they
    differ only before their last max_length tokens). Such a pair teaches nothing and scores as a tie. An error
    naming the first and the cause, or with skip_invalid dropped and counted. Returns (dataset without the
    same_tokens column, count)."""
    same = [i for i, flag in enumerate(encoded["same_tokens"]) if flag]
    if same and not skip_invalid:
        cut = sum(encoded[i]["overlength"] for i in same)
        response = " ".join(encoded[same[0]]["chosen"][-1]["content"].split())[:60]
        raise UserError(f"{name}: {len(same)} of {len(encoded)} pairs have chosen and rejected responses that differ "
                        f"as text but not as tokens ({cut} once cut to max_length={max_length} from the left, "
                        f"{len(same) - cut} as the chat template writes them; first: chosen response {response!r}): "
                        "such a pair teaches nothing; raise --max_length where it is the cut, or pass --skip_invalid "
                        "to drop them (counted)")
    if same:
        encoded = encoded.filter(lambda flag: not flag, input_columns="same_tokens")
        print(f"[{name}] dropped {len(same)} pairs whose responses are the same tokens once templated and cut to "
              f"max_length={max_length} (--skip_invalid)")
    return encoded.remove_columns("same_tokens"), len(same)


def tokenize_pairs(dataset, tokenizer, max_length: int, overlength: str, name: str, skip_invalid: bool = False,
                   num_proc: Optional[int] = None, keep_same_tokens: bool = False):
    """Add chosen_input_ids / rejected_input_ids / length columns. A pair whose text holds a special token, that the
    chat template refuses, or whose responses template to the same tokens (reject_same_tokens), is an error, or
    dropped and counted with skip_invalid (keep_same_tokens: kept and counted, for an evaluation, which scores them
    as ties as reward-bench does). Over-long sequences are truncated from the left (upstream's rule: the response
    end, where the reward is read, is kept; so is the BOS/[CLS] the tokenizer adds, as in truncate_left) or dropped
    when overlength == 'drop'; either way the count is printed. num_proc: processes for datasets.map
    (tokenizing is most of the work before training: about 80 s per 100K pairs on one core). Returns (dataset,
    stats)."""
    if overlength not in ("truncate", "drop"):
        raise UserError(f"--overlength must be 'truncate' or 'drop', not '{overlength}'")
    dataset, forged = reject_special_tokens(dataset, tokenizer, ("chosen", "rejected"), skip_invalid, name, num_proc)
    adds_bos = tokenizer_adds_bos(tokenizer)  # asked once, not per batch

    def encode(batch):
        chosen = encode_conversations(tokenizer, batch["chosen"], adds_bos=adds_bos)
        rejected = encode_conversations(tokenizer, batch["rejected"], adds_bos=adds_bos)
        too_long = [max(len(c), len(r)) > max_length for c, r in zip(chosen, rejected)]
        # Cut as serving and every scoring path cut (truncate_left): a model trained without its BOS/[CLS] would be
        # scored with it.
        chosen = [truncate_left(ids, max_length, adds_bos) for ids in chosen]
        rejected = [truncate_left(ids, max_length, adds_bos) for ids in rejected]
        return {
            "chosen_input_ids": chosen,
            "rejected_input_ids": rejected,
            "length": [min(max(len(c), len(r)), max_length) for c, r in zip(chosen, rejected)],
            "overlength": too_long,
            # An over-long pair that --overlength drop removes is counted as over-long, not as cut to the same tokens
            "same_tokens": [c == r and not (over and overlength == "drop")
                            for c, r, over in zip(chosen, rejected, too_long)],
        }

    try:
        encoded = dataset.map(encode, batched=True, num_proc=num_proc, desc=f"tokenizing {name}")
        refused = 0
    except TemplateRefusal:  # Gemma's template and a system message: name the rows, or drop them (--skip_invalid)
        dataset, refused = reject_untemplatable(dataset, tokenizer, ("chosen", "rejected"), skip_invalid, name)
        encoded = dataset.map(encode, batched=True, num_proc=num_proc, desc=f"tokenizing {name}")
    if keep_same_tokens:
        encoded, same = encoded.remove_columns("same_tokens"), sum(encoded["same_tokens"])
    else:
        encoded, same = reject_same_tokens(encoded, skip_invalid, name, max_length)
    n_over = sum(encoded["overlength"])
    stats = {"overlength": n_over, "truncated": 0, "dropped_overlength": 0, "special_token_in_content": forged,
             "same_tokens": same, **({TEMPLATE_REJECTS: refused} if refused else {})}
    if n_over and overlength == "drop":
        encoded = encoded.filter(lambda over: not over, input_columns="overlength")
        stats["dropped_overlength"] = n_over
        print(f"[{name}] dropped {n_over} pairs longer than max_length={max_length} tokens (--overlength drop)")
    elif n_over:
        stats["truncated"] = n_over
        print(f"[{name}] truncated {n_over} pairs longer than max_length={max_length} tokens from the left")
    return encoded.remove_columns("overlength"), stats


def enforce_max_length(encoded, max_length: int, overlength: str, name: str, tokenizer):
    """For examples that cannot be cut (a PM prompt, a math solution: either end holds what is learned): an example
    whose input_ids are longer than max_length is an error naming the first one by its text, or with overlength ==
    'drop' is dropped and counted. Returns (dataset, number dropped)."""
    lengths = [len(ids) for ids in encoded["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and overlength == "error":
        # By its text, not a row number: validation drops (--skip_invalid) and held-out splits renumber the rows.
        first = too_long[0]
        text = " ".join(tokenizer.decode(encoded[first]["input_ids"][:48], skip_special_tokens=True).split())
        raise UserError(
            f"{name}: {len(too_long)} of {len(lengths)} examples are longer than max_length={max_length} tokens "
            f"(first: {lengths[first]} tokens, beginning {text[:80]!r}); raise --max_length, or pass "
            "--overlength drop to drop them with a count")
    if too_long:
        encoded = encoded.select(sorted(set(range(len(lengths))) - set(too_long)))
        print(f"[{name}] dropped {len(too_long)} examples longer than max_length={max_length} tokens "
              "(--overlength drop)")
    return encoded, len(too_long)
