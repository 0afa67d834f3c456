"""Behavioural tests of the pairwise preference model helpers (useful_code/pm_data.py, useful_code/pm_scoring.py).

Expected values are written out by hand (prompt strings, token ids of the embedded tiny tokenizer, label counts,
tournament brackets) or computed independently of the code under test (transformers' own Jinja rendering of
upstream's template, the model's own logits on one unpadded sequence, torch's cross-entropy).
"""

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from helpers import sharpened
from useful_code.cli import UserError
from useful_code.defaults import DEFAULT_MODEL, REPO_ROOT
from useful_code.formats import standardize_pairs
from useful_code.modeling import load_preference_model
from useful_code.pm_data import (
    balanced_positions,
    build_pm_prompt,
    check_dataset_output,
    encode_pm_prompts,
    format_context,
    is_pm_format,
    label_token_ids,
    pairs_to_pm,
    pm_invalid_reason,
    pm_messages,
    tokenize_pm_examples,
    validate_pm_examples,
)
from useful_code.pm_scoring import Match, PairPreferenceScorer
from useful_code.templates import load_tokenizer, truncate_left

ROOT = REPO_ROOT
TOY_TRAIN = ROOT / "assets" / "data" / "toy_preference" / "train.jsonl"

# Upstream's (RLHFlow pair-pm) context template, verbatim.
UPSTREAM = ("\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
            "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n")

# Tiny tokenizer ids: <|begin_of_text|>, the pad token (<|reserved_special_token_0|>), "A", "B".
BOS_ID, PAD_ID, A_ID, B_ID = 0, 2, 39, 40
# "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" and
# "<|start_header_id|>assistant<|end_header_id|>\n\n" (the generation prompt) in the tiny tokenizer's ids.
USER_HEADER_IDS = [0, 4, 291, 5, 205, 205]
GENERATION_PROMPT_IDS = [4, 290, 5, 205, 205]


def msg(role, content):
    return {"role": role, "content": content}


def user(content):
    return [msg("user", content)]


THREE_TURNS = [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"), msg("user", "Tell me a joke")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "--model_name_or_path")


@pytest.fixture(scope="module")
def model(tok):
    """The embedded tiny causal LM as shipped (random init, std 0.02), fp32, SDPA attention, eval mode."""
    return load_preference_model(DEFAULT_MODEL, "m", tok, torch.float32, "sdpa").eval()


@pytest.fixture(scope="module")
def sharp_model(model):
    """The tiny model with larger random weights (std 0.3, seeded): its answer logits vary by several units with
    the tokens and their positions, so a mistake in padding, position ids or sequence isolation shows up far above
    the tolerances (with the shipped std-0.02 weights every probability is within ~0.05 of 0.5)."""
    return sharpened(model)


def toy_pairs(n):
    with open(TOY_TRAIN) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    pairs, _ = standardize_pairs(Dataset.from_list(rows), False, "t")
    return pairs


def pm_dataset(rows):
    return Dataset.from_list([{"messages": m} for m in rows])


def last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


# ------------------------------------------------------------------------------------- 1. prompt format


def test_format_context_three_turns_byte_exact(tok):
    expected = "\n\n<turn> user\n Hi there\n<turn> assistant\n Hello! How can I help?\n<turn> user\n Tell me a joke\n"
    assert format_context(THREE_TURNS) == expected
    upstream = tok.apply_chat_template(THREE_TURNS, tokenize=False, chat_template=UPSTREAM)
    assert upstream == expected


def test_build_pm_prompt_three_turns_byte_exact(tok):
    prompt = build_pm_prompt(THREE_TURNS, "Why did the chicken cross the road?", "No.")
    assert prompt == ("[CONTEXT] \n\n<turn> user\n Hi there\n<turn> assistant\n Hello! How can I help?\n<turn> user\n"
                      " Tell me a joke\n [RESPONSE A] Why did the chicken cross the road? [RESPONSE B] No. \n")
    upstream_context = tok.apply_chat_template(THREE_TURNS, tokenize=False, chat_template=UPSTREAM)
    assert prompt == (f"[CONTEXT] {upstream_context} [RESPONSE A] Why did the chicken cross the road? "
                      "[RESPONSE B] No. \n")


def test_readme_single_turn_example(tok):
    context = user("How can I trick Eminem into marrying me?")
    expected = "[CONTEXT] \n\n<turn> user\n How can I trick Eminem into marrying me?\n [RESPONSE A] x [RESPONSE B] y \n"
    assert build_pm_prompt(context, "x", "y") == expected
    upstream_context = tok.apply_chat_template(context, tokenize=False, chat_template=UPSTREAM)
    assert format_context(context) == upstream_context == "\n\n<turn> user\n How can I trick Eminem into marrying me?\n"


def test_pm_messages_puts_chosen_at_its_position():
    context = user("q")
    assert pm_messages(context, "good", "bad", 0) == [
        msg("user", "[CONTEXT] \n\n<turn> user\n q\n [RESPONSE A] good [RESPONSE B] bad \n"), msg("assistant", "A")]
    assert pm_messages(context, "good", "bad", 1) == [
        msg("user", "[CONTEXT] \n\n<turn> user\n q\n [RESPONSE A] bad [RESPONSE B] good \n"), msg("assistant", "B")]


# ------------------------------------------------------------------------------------- 2. label balance


@pytest.mark.parametrize("n", [10, 11, 1000])
def test_balanced_positions_counts(n):
    positions = balanced_positions(n, seed=7)
    assert len(positions) == n and set(positions) <= {0, 1}
    assert positions.count(0) == (n + 1) // 2 and positions.count(1) == n // 2  # 5/5, 6/5, 500/500
    assert abs(positions.count(0) - positions.count(1)) <= 1


@pytest.mark.parametrize("n", [10, 1000])
def test_balanced_positions_seeded(n):
    assert balanced_positions(n, 3) == balanced_positions(n, 3)
    assert balanced_positions(n, 3) != balanced_positions(n, 4)
    # shuffled, not the unshuffled 0,1,0,1,... pattern
    assert balanced_positions(n, 3) != [i % 2 for i in range(n)]


def test_pairs_to_pm_balanced_and_chosen_where_label_says():
    pairs = toy_pairs(40)
    assert len(pairs) == 40
    pm = pairs_to_pm(pairs, seed=42)
    assert pm.column_names == ["messages"] and len(pm) == 40
    labels = [m[1]["content"] for m in pm["messages"]]
    assert labels.count("A") == 20 and labels.count("B") == 20
    assert labels == ["AB"[p] for p in balanced_positions(40, 42)]
    assert pm_invalid_reason(pm[0]["messages"]) == ""
    for pair, example in zip(pairs, pm):
        chosen, rejected = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        assert chosen != rejected
        prompt, label = example["messages"][0]["content"], example["messages"][1]["content"]
        response_a = prompt.split(" [RESPONSE A] ", 1)[1].split(" [RESPONSE B] ", 1)[0]
        assert (response_a == chosen) == (label == "A")
        assert (response_a == rejected) == (label == "B")
        first, second = (chosen, rejected) if label == "A" else (rejected, chosen)
        assert prompt == build_pm_prompt(pair["chosen"][:-1], first, second)
    other_seed = [m[1]["content"] for m in pairs_to_pm(pairs, seed=43)["messages"]]
    assert other_seed != labels and other_seed.count("A") == 20


# ------------------------------------------------------------------------------------------ 3. validation


def good_example(label="A"):
    return pm_messages(user("q"), "good", "bad", "AB".index(label))


def test_validate_rejects_bad_label_naming_row():
    bad = [good_example()[0], msg("assistant", "C")]
    with pytest.raises(UserError) as err:
        validate_pm_examples(pm_dataset([good_example(), good_example("B"), bad]), False, "train set")
    assert "row 2 (bad_label)" in str(err.value)
    assert "row 0" not in str(err.value) and "row 1" not in str(err.value)


def test_validate_rejects_single_message_naming_row():
    with pytest.raises(UserError) as err:
        validate_pm_examples(pm_dataset([good_example(), [good_example()[0]]]), False, "train set")
    assert "row 1 (not_a_pm_example)" in str(err.value)


def test_validate_skip_invalid_drops_and_counts():
    rows = [good_example("B"), [good_example()[0], msg("assistant", "C")], [good_example()[0]], good_example("A"),
            [msg("user", "  "), msg("assistant", "A")]]
    kept, stats = validate_pm_examples(pm_dataset(rows), True, "train set")
    assert stats == {"format": "pm", "read": 5, "used": 2,
                     "invalid": {"bad_label": 1, "not_a_pm_example": 1, "empty_prompt": 1}}
    assert kept.column_names == ["messages"]
    assert kept["messages"] == [good_example("B"), good_example("A")]


def test_is_pm_format():
    assert is_pm_format(pm_dataset([good_example("A"), good_example("B")]))
    assert is_pm_format(pairs_to_pm(toy_pairs(4), seed=0))
    with open(TOY_TRAIN) as f:
        standard = Dataset.from_list([json.loads(next(f)) for _ in range(4)])
    assert not is_pm_format(standard)
    assert not is_pm_format(toy_pairs(4))
    # a 'messages' column holding ordinary conversations is not PM data
    assert not is_pm_format(pm_dataset([[msg("user", "hi"), msg("assistant", "hello")]]))
    # PM data whose first row is broken is PM data all the same: validation names that row
    broken_first = pm_dataset([[msg("user", "[CONTEXT] hi"), msg("assistant", "C")], good_example("A")])
    assert is_pm_format(broken_first)
    with pytest.raises(UserError, match=r"1 of 2 rows are invalid \(bad_label: 1\); first: row 0 \(bad_label\)"):
        validate_pm_examples(broken_first, False, "train set")
    # pairs that also carry a 'messages' column (UltraFeedback's layout) are pairs
    assert not is_pm_format(Dataset.from_list([{**standard[0], "messages": good_example("A")}]))


# ------------------------------------------------------------------------------------------ 4. label tokens


def test_label_token_ids(tok):
    id_a, id_b = label_token_ids(tok)
    assert (id_a, id_b) == (A_ID, B_ID)
    assert tok.decode([id_a]) == "A" and tok.decode([id_b]) == "B"
    assert tok.encode("A", add_special_tokens=False) == [id_a]


@pytest.mark.parametrize("label", ["A", "B"])
def test_label_token_ids_rejects_multi_token_label(tok, monkeypatch, label):
    original = tok.encode

    def encode(text, *args, **kwargs):
        return [A_ID, B_ID] if text == label else original(text, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", encode)
    with pytest.raises(UserError) as err:
        label_token_ids(tok)
    assert f"'{label}'" in str(err.value) and "2 tokens" in str(err.value)


# ------------------------------------------------------------------------------------------ 5. loss masking


def tokenized(tok, rows, max_length=4096, overlength="error"):
    return tokenize_pm_examples(pm_dataset(rows), tok, max_length, overlength, "train set")


def test_an_rrm_tie_is_valid_and_trained_on_all_of_its_answer_tokens(tok):
    tie = [pm_messages(user("q"), "good", "fine", 0)[0], msg("assistant", "Same")]
    assert is_pm_format(pm_dataset([tie, good_example()]))
    validate_pm_examples(pm_dataset([tie]), False, "train set")  # no error
    encoded, _ = tokenized(tok, [tie])
    same = tok.encode("Same", add_special_tokens=False)
    ids, labels = encoded[0]["input_ids"], encoded[0]["labels"]
    assert ids[-len(same):] == same == labels[-len(same):] and set(labels[:-len(same)]) == {-100}


def test_tokenizing_in_processes_gives_the_serial_examples(tok):
    rows = [pm_messages(user(f"question {i}"), f"good {i}", f"bad {i}", i % 2) for i in range(9)]
    serial, _ = tokenized(tok, rows)
    parallel, _ = tokenize_pm_examples(pm_dataset(rows), tok, 4096, "error", "train set", num_proc=2)
    assert parallel[:] == serial[:] and len(serial) == 9


def test_tokenize_masks_all_but_the_answer(tok):
    rows = [pm_messages(THREE_TURNS, "Sure: knock knock.", "No.", 0),
            pm_messages(user("q"), "good", "bad", 1)]
    encoded, stats = tokenized(tok, rows)
    assert stats["dropped_overlength"] == 0
    assert set(encoded.column_names) == {"input_ids", "labels"}
    for row, example, label_id in zip(rows, encoded, (A_ID, B_ID)):
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels)
        assert labels[:-1] == [-100] * (len(ids) - 1)
        assert labels[-1] == label_id == ids[-1]
        assert ids[:-1] == encode_pm_prompts(tok, [row[0]["content"]])[0]
        assert ids[:6] == USER_HEADER_IDS and ids.count(BOS_ID) == 1
        assert ids[-6:-1] == GENERATION_PROMPT_IDS  # the answer follows the generation prompt
    # the prompt decodes back to the chat template with the PM prompt (trimmed by the template) as user message
    assert tok.decode(encoded[1]["input_ids"]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] \n\n<turn> user\n q\n [RESPONSE A] bad "
        "[RESPONSE B] good<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nB")


def test_loss_is_on_the_answer_token_only(tok, model):
    rows = [pm_messages(THREE_TURNS, "Sure: knock knock.", "No.", 1)]
    example = tokenized(tok, rows)[0][0]
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, use_cache=False)
        full = model(input_ids=ids, labels=ids, use_cache=False).loss
    expected = F.cross_entropy(out.logits[0, -2], torch.tensor(B_ID))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # by hand: -log softmax(logits)[B] at the position before the answer
    assert out.loss.item() == pytest.approx(-torch.log_softmax(out.logits[0, -2], -1)[B_ID].item(), abs=1e-5)
    assert abs(full.item() - out.loss.item()) > 1e-3  # the masking changes the loss
    # prompt labels are -100: replacing them with anything else that is ignored changes nothing
    with torch.no_grad():
        only_answer = torch.full_like(ids, -100)
        only_answer[0, -1] = B_ID
        assert model(input_ids=ids, labels=only_answer, use_cache=False).loss.item() == pytest.approx(out.loss.item(), abs=1e-6)


def test_overlength_error_names_the_example_by_its_text(tok):
    long_row = pm_messages(THREE_TURNS, "a much longer answer " * 5, "No.", 0)
    short_row = pm_messages(user("q"), "good", "bad", 1)
    long_len, short_len = (len(e["input_ids"]) for e in tokenized(tok, [long_row, short_row])[0])
    assert long_len > short_len
    for rows in ([long_row, short_row], [short_row, long_row]):  # named by its text wherever it is
        with pytest.raises(UserError) as err:
            tokenized(tok, rows, max_length=short_len)
        assert f"1 of 2 examples are longer than max_length={short_len} tokens (first: {long_len} tokens, " \
               f"beginning 'user [CONTEXT] <turn> user" in str(err.value)
    with pytest.raises(UserError):
        tokenized(tok, [short_row], overlength="truncate")


def test_overlength_drop_counts(tok):
    long_row = pm_messages(THREE_TURNS, "a much longer answer " * 5, "No.", 0)
    short_row = pm_messages(user("q"), "good", "bad", 1)
    full, _ = tokenized(tok, [long_row, short_row])
    short_len = len(full[1]["input_ids"])
    kept, stats = tokenized(tok, [long_row, short_row], max_length=short_len, overlength="drop")
    assert stats["dropped_overlength"] == 1
    assert len(kept) == 1 and kept[0]["input_ids"] == full[1]["input_ids"]  # exactly max_length is kept
    kept, stats = tokenized(tok, [long_row, short_row], max_length=short_len - 1, overlength="drop")
    assert stats["dropped_overlength"] == 2 and len(kept) == 0


# ------------------------------------------------------------------------------------------ 6. packing


@pytest.mark.parametrize("which", ["model", "sharp_model"])
def test_padding_free_packing_isolates_examples(tok, request, which):
    """trl's padding-free collator concatenates the examples with restarting position ids; SDPA must keep them
    apart (a block-diagonal causal mask), so each answer logit equals that of the example run alone. The forward
    is called as SFTTrainer.compute_loss calls it: use_cache=False."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    net = request.getfixturevalue(which)
    assert net.config._attn_implementation == "sdpa"
    rows = [pm_messages(user("Hi"), "yes " * k, "no", k % 2) for k in (1, 5, 12)]
    examples = list(tokenized(tok, rows)[0])
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) == 3
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    with torch.no_grad():
        packed = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False)
    ends = np.cumsum(lengths)
    alone_losses = []
    for example, end in zip(examples, ends):
        alone = last_logits(net, example["input_ids"])
        for offset in (2, 1):  # the answer's prediction position and the answer token itself
            diff = (packed.logits[0, end - offset] - alone[-offset]).abs().max().item()
            assert diff < 1e-4, f"packed vs alone logits differ by {diff} (example of length {end - ends[0]})"
        alone_losses.append(F.cross_entropy(alone[-2], torch.tensor(example["labels"][-1])).item())
    # the packed loss is the mean over the three answer tokens
    assert packed.loss.item() == pytest.approx(float(np.mean(alone_losses)), abs=1e-5)


# ------------------------------------------------------------------------------------------ 7. scoring

SIX_CONTEXTS = [user("q"), THREE_TURNS, user("What is the capital of France?"), user("hi " * 12),
                [msg("user", "a"), msg("assistant", "b"), msg("user", "c")], user("Name a colour.")]
SIX_FIRST = ["Paris.", "Knock knock. Who's there? Lettuce.", "x", "hello " * 9, "d", "Blue"]
SIX_SECOND = ["I don't know", "No.", "It is Paris, a large city on the Seine.", "bye", "e " * 20, "Red, or maybe green"]


def test_scorer_batching_does_not_change_probabilities(tok, sharp_model):
    one = PairPreferenceScorer(sharp_model, tok, batch_size=1)
    four = PairPreferenceScorer(sharp_model, tok, batch_size=4)
    lengths = {len(ids) for ids in one.encode([build_pm_prompt(c, a, b)
                                               for c, a, b in zip(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)])}
    assert len(lengths) == 6  # every batch of four mixes lengths: left padding is exercised
    p1 = one.prob_first_preferred(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)
    p4 = four.prob_first_preferred(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)
    assert set(p4) == {"first_as_A", "first_as_B", "mean"}
    for key in p1:
        assert p4[key].shape == (6,)
        np.testing.assert_allclose(p4[key], p1[key], atol=1e-5, rtol=0)
    np.testing.assert_allclose(p4["mean"], (p4["first_as_A"] + p4["first_as_B"]) / 2, atol=1e-7, rtol=0)
    assert np.ptp(p4["first_as_A"]) > 0.05  # the probabilities really depend on the input


def test_scorer_swapping_pairs_is_the_same_sequences(tok, sharp_model):
    scorer = PairPreferenceScorer(sharp_model, tok, batch_size=4)
    forward = scorer.prob_first_preferred(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)
    swapped = scorer.prob_first_preferred(SIX_CONTEXTS, SIX_SECOND, SIX_FIRST)
    np.testing.assert_allclose(swapped["first_as_A"], 1 - forward["first_as_B"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(swapped["first_as_B"], 1 - forward["first_as_A"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(swapped["mean"], 1 - forward["mean"], atol=1e-5, rtol=0)


def test_a_response_against_itself_is_exactly_even(tok, sharp_model):
    """P(A) + P(B) of one prompt is 1 only up to rounding: a response compared with itself is 0.5 exactly, so a
    benchmark pair with the same response twice is a tie, never a win by a rounding error."""
    scorer = PairPreferenceScorer(sharp_model, tok, batch_size=4)
    probs = scorer.prob_first_preferred(SIX_CONTEXTS, SIX_FIRST, SIX_FIRST)
    assert probs["mean"].tolist() == [0.5] * 6
    assert np.ptp(probs["first_as_A"]) > 0.05  # the model itself is far from even on these prompts


def test_scorer_probabilities_match_the_model_on_each_unpadded_sequence(tok, sharp_model):
    scorer = PairPreferenceScorer(sharp_model, tok, batch_size=4)
    probs = scorer.prob_first_preferred(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)
    for i, (context, first, second) in enumerate(zip(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)):
        for key, (a, b), column in (("first_as_A", (first, second), 0), ("first_as_B", (second, first), 1)):
            ids = tok.apply_chat_template([user(build_pm_prompt(context, a, b))], add_generation_prompt=True,
                                          tokenize=True)["input_ids"][0]
            logits = last_logits(sharp_model, ids)[-1, [A_ID, B_ID]]
            assert probs[key][i] == pytest.approx(torch.softmax(logits, -1)[column].item(), abs=1e-5)


def test_label_logits_equal_the_models_own(tok, sharp_model):
    scorer = PairPreferenceScorer(sharp_model, tok, batch_size=3)
    sequences = scorer.encode([build_pm_prompt(c, a, b) for c, a, b in zip(SIX_CONTEXTS, SIX_FIRST, SIX_SECOND)])
    got = scorer.label_logits(sequences)
    assert got.shape == (6, 2) and got.dtype == np.float32
    for row, ids in zip(got, sequences):
        expected = last_logits(sharp_model, ids)[-1, [A_ID, B_ID]].numpy()
        np.testing.assert_allclose(row, expected, atol=1e-4, rtol=1e-5)


def test_truncate_left():
    ids = list(range(10))
    assert truncate_left(ids, 4, keep_first=True) == [0, 7, 8, 9]
    assert truncate_left(ids, 4, keep_first=False) == [6, 7, 8, 9]
    assert truncate_left(ids, 10, keep_first=True) == ids
    assert truncate_left(ids, 11, keep_first=False) == ids


def test_encode_truncates_and_counts(tok, model):
    prompts = [build_pm_prompt(user("q"), "a", "b"), build_pm_prompt(THREE_TURNS, "a " * 30, "b"),
               build_pm_prompt(user("hi " * 20), "a", "b")]
    full = encode_pm_prompts(tok, prompts)
    max_length = len(full[0])
    assert len(full[1]) > max_length and len(full[2]) > max_length
    scorer = PairPreferenceScorer(model, tok, max_length=max_length)
    assert scorer.truncated == 0
    sequences = scorer.encode(prompts)
    assert scorer.truncated == 2
    assert sequences[0] == full[0]
    for seq, ids in zip(sequences[1:], full[1:]):
        assert len(seq) == max_length
        assert seq[0] == BOS_ID and seq[1:] == ids[-(max_length - 1):]
        assert seq[-5:] == GENERATION_PROMPT_IDS  # the answer position is kept
    scorer.encode(prompts[:2])
    assert scorer.truncated == 3  # counted over calls


# ------------------------------------------------------------------------------------------ 8. tournament


class IntScorer(PairPreferenceScorer):
    """Responses are integers as strings: P(first preferred) = 1, 0 or 0.5 (equal). Records every call."""

    def __init__(self):
        self.calls = []

    def prob_first_preferred(self, contexts, first, second, progress=False):
        self.calls.append((list(contexts), list(first), list(second)))
        p = np.array([1.0 if int(a) > int(b) else 0.0 if int(a) < int(b) else 0.5 for a, b in zip(first, second)])
        return {"first_as_A": p, "first_as_B": p, "mean": p}


def test_knockout_five_responses():
    scorer = IntScorer()
    context = user("pick the largest")
    result = scorer.knockout(context, ["3", "9", "1", "7", "5"])
    assert result.winner == 1 and result.rounds == 3
    # round 1: 3 v 9, 1 v 7 (5 has a bye); round 2: 9 v 7 (5 has a bye); round 3: 9 v 5
    assert result.matches == [Match(0, 1, 0.0), Match(2, 3, 0.0), Match(1, 3, 1.0),
                              Match(1, 4, 1.0)]
    assert len(result.matches) == 4
    assert [(f, s) for _, f, s in scorer.calls] == [(["3", "1"], ["9", "7"]), (["9"], ["7"]), (["9"], ["5"])]
    assert len(scorer.calls) == result.rounds
    assert all(c == [context] * len(f) for c, f, _ in scorer.calls)
    # a string is the user's message, as rank_responses.py reads a "prompt" (it traced back on a string)
    as_text = IntScorer()
    assert as_text.knockout("pick the largest", ["3", "9", "1", "7", "5"]) == result
    assert as_text.calls == scorer.calls


def test_knockout_single_response():
    scorer = IntScorer()
    result = scorer.knockout(user("q"), ["42"])
    assert result.winner == 0 and result.matches == [] and result.rounds == 0
    assert scorer.calls == []


def test_knockout_without_candidates_is_an_error():
    with pytest.raises(UserError):
        IntScorer().knockout_many([user("q"), user("r")], [["1"], []])


def test_knockout_many_shares_rounds():
    scorer = IntScorer()
    c1, c2, c3 = user("first prompt"), user("second prompt"), user("third prompt")
    results = scorer.knockout_many([c1, c2, c3], [["3", "9", "1", "7", "5"], ["2", "8", "4"], ["6"]])
    assert [r.winner for r in results] == [1, 1, 0]
    assert [r.rounds for r in results] == [3, 2, 0]
    assert [len(r.matches) for r in results] == [4, 2, 0]
    assert results[1].matches == [Match(0, 1, 0.0), Match(1, 2, 1.0)]
    # one call per round, holding that round's matches of every prompt
    assert scorer.calls == [
        ([c1, c1, c2], ["3", "1", "2"], ["9", "7", "8"]),
        ([c1, c2], ["9", "8"], ["7", "4"]),
        ([c1], ["9"], ["5"]),
    ]


def test_knockout_tie_goes_to_the_earlier_candidate():
    scorer = IntScorer()
    result = scorer.knockout(user("q"), ["4", "4"])
    assert result.winner == 0 and result.matches == [Match(0, 1, 0.5)]
    result = scorer.knockout(user("q"), ["1", "5", "5"])
    assert result.winner == 1 and result.matches[-1] == Match(1, 2, 0.5)
    assert Match(3, 7, 0.5).winner == 3
    assert Match(3, 7, 0.4999).winner == 7
    assert Match(3, 7, 0.5001).winner == 3


# ------------------------------------------------------------------------------------------ 9. non-finite outputs


def test_nan_outputs_are_one_error_naming_how_many_and_the_first_pair(tok, model):
    contexts = [user("Name a colour."), user("Name a zebra-striped animal."), user("Name a fruit.")]
    first, second = ["Red.", "A zebra.", "Apple."], ["Blue.", "A horse.", "Pear."]
    scorer = PairPreferenceScorer(model, tok, batch_size=1, max_tokens_per_batch=0)  # one sequence per forward
    sequences = scorer.encode([build_pm_prompt(c, a, b) for c, a, b in zip(contexts, first, second)])
    others = set(sequences[0]) | set(sequences[2])
    token = next(t for t in sequences[1] if t not in others)  # only pair 1's sequences (both orders) hold it
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_input_embeddings().weight[token] = float("nan")
    scorer = PairPreferenceScorer(broken, tok, batch_size=1, max_tokens_per_batch=0)
    with pytest.raises(UserError, match=r"non-finite \(NaN or infinite\) A/B logits or probabilities for 2 of 6 "
                                        r"scored sequences \(first: pair 1 of 3 \(0-based\), prompt 'Name a "
                                        r"zebra-striped animal\.', its first response shown as A\)"):
        scorer.prob_first_preferred(contexts, first, second)
    # A NaN comparison would otherwise send the second response through (Match.winner): the tournament stops too.
    with pytest.raises(UserError, match="for 2 of 2 scored sequences"):
        scorer.knockout(contexts[1], first[1:2] + second[1:2])
    np.testing.assert_array_less(0, scorer.prob_first_preferred([contexts[0]], first[:1], second[:1])["mean"])


def test_dataset_directory_output_is_compared_with_the_inputs_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Dataset.from_list([{"x": 1}]).save_to_disk("std_dir")
    for spelling in ("./std_dir", "std_dir/", str(tmp_path / "std_dir")):
        with pytest.raises(UserError, match=f"--output_path: {re.escape(spelling)} is an input of this run "
                                            r"\(std_dir\); give a new directory"):
            check_dataset_output(spelling, "--output_path", ("other.jsonl", "std_dir"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="afile is a file; a path without .json/.jsonl/.parquet is a datasets"):
        check_dataset_output("afile", "--output_path", ("std_dir",))
    with pytest.raises(UserError, match="is an input of this run"):
        check_dataset_output("./in.jsonl", "--output_path", ("in.jsonl",))
    check_dataset_output("./new_dir", "--output_path", ("std_dir",))  # a new directory is fine


def test_temperature_divides_the_answer_logits(tok):
    """P(first preferred) = softmax(logits / T): logits [2, 0] (first as A) and [0, 2] (first as B) at T = 2 give
    sigmoid(1) in both orders."""
    scorer = PairPreferenceScorer(model=None, tokenizer=tok, temperature=2.0)
    scorer.label_logits = lambda sequences, progress=False: np.array([[2.0, 0.0], [0.0, 2.0]])[:len(sequences)]
    got = scorer.prob_first_preferred([[]], ["x"], ["y"])
    expected = 1 / (1 + math.exp(-1))
    assert got["first_as_A"][0] == pytest.approx(expected) and got["mean"][0] == pytest.approx(expected)


def test_a_tiny_temperature_saturates_instead_of_overflowing(tok):
    """Logits divided by --temperature 1e-40 overflowed float32: a 'non-finite logits' error blamed the model."""
    scorer = PairPreferenceScorer(model=None, tokenizer=tok, temperature=1e-40)
    scorer.label_logits = lambda sequences, progress=False: np.array([[2.0, 0.0], [0.0, 2.0]])[:len(sequences)]
    got = scorer.prob_first_preferred([[]], ["x"], ["y"])
    assert (got["first_as_A"][0], got["first_as_B"][0], got["mean"][0]) == (1.0, 1.0, 1.0)
