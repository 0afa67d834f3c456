"""Math reward models (useful_code/math_data.py, math_scoring.py, best_of_n.py; math-rm/): data rules, label
positions and the loss mask, one-forward step scores against upstream's per-step loop, aggregation and best-of-N
arithmetic by hand, the toy set, user errors, and one end-to-end run (tiny PRM training, then best-of-N evaluation).

Expected values are written out by hand or computed independently of the code under test (the tokens between the
assistant header and <|eot_id|>, one unpadded forward per step as upstream ran it, torch's cross-entropy).
"""

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import EvalPrediction

from helpers import ROOT, check_ok, run, sharpened, two_ranks
from useful_code.best_of_n import (
    aggregate,
    check_step_format,
    best_of_n_curve,
    best_pick,
    candidate_coverage,
    majority_pick,
    n_values,
    upstream_accuracy,
    write_results,
)
from useful_code.cli import UserError, run_cli
from useful_code.defaults import DEFAULT_MODEL
from useful_code.math_data import (
    TOY_BEST_OF_N,
    TOY_PRM,
    encode_labeled,
    extract_final_answer,
    label_token_ids,
    orm_conversation,
    prm_conversation,
    split_steps,
    to_outcome,
    tokenize_examples,
    training_invalid_reason,
    validate_eval_rows,
    validate_training_rows,
)
from useful_code.math_scoring import StepScorer
from useful_code.modeling import load_preference_model
from useful_code.templates import encode_conversations, load_tokenizer

# Tiny tokenizer ids: "+", "-", <|start_header_id|>, <|end_header_id|>, <|eot_id|>, "assistant".
PLUS, MINUS, START_HEADER, END_HEADER, EOT, ASSISTANT = 17, 19, 4, 5, 6, 290
HEDGES = ("probably", "I guess", "roughly", "maybe", "more or less", "I think", "about")


def msg(role, content):
    return {"role": role, "content": content}


def chat(*turns):
    """user/assistant turns alternating from user: chat("step 1", "+", "step 2", "-")."""
    return [msg(("user", "assistant")[i % 2], t) for i, t in enumerate(turns)]


# Steps with "+" and "-" in their text: only the assistant's labels may be trained or read.
SOLUTION = chat("Tom has 2 apples and buys 3. Step 1: 2 + 3 = 5 apples.", "+", "Step 2: 5 - 1 = 4", "-",
                "Step 3: The answer is: 4", "-")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "--model_name_or_path")


@pytest.fixture(scope="module")
def model(tok):
    return load_preference_model(DEFAULT_MODEL, "m", tok, torch.float32, "sdpa").eval()


@pytest.fixture(scope="module")
def sharp_model(model):
    """Larger random weights: P(+) varies widely with tokens and positions, so a padding, position or row mix-up
    shows far above the tolerances."""
    return sharpened(model)


def rows(path, n=None):
    with open(path) as f:
        return [json.loads(line) for i, line in enumerate(f) if n is None or i < n]


# ------------------------------------------------------------------------------------- 1. label tokens and rules


def test_labels_are_single_tokens(tok):
    assert label_token_ids(tok) == (PLUS, MINUS)
    assert [tok.decode([PLUS]), tok.decode([MINUS])] == ["+", "-"]


def test_a_multi_token_label_is_an_error(tok, monkeypatch):
    monkeypatch.setattr(tok, "encode", lambda text, add_special_tokens=False: [1, 2])
    with pytest.raises(UserError, match="'\\+' as 2 tokens"):
        label_token_ids(tok)


@pytest.mark.parametrize("messages, reason", [
    ("Step 1 +", "not_a_message_list"),
    ([], "not_a_message_list"),
    ([{"role": "user"}], "not_a_message_list"),
    ([msg("tool", "x"), msg("assistant", "+")], "unknown_role"),
    (chat(" ", "+"), "empty_step"),
    ([msg("assistant", "+"), msg("user", "Step 1")], "roles_not_alternating"),
    ([msg("user", "a"), msg("user", "b"), msg("assistant", "+")], "roles_not_alternating"),
    (chat("Step 1"), "no_labels"),
    ([msg("system", "Be careful.")], "no_labels"),
    (chat("Step 1", "+", "Step 2"), "last_not_assistant"),
    (chat("Step 1", "+", "Step 2", "yes"), "bad_label"),
    (chat("Step 1", "++"), "bad_label"),
    (chat("Step 1", ""), "bad_label"),
])
def test_training_row_rules(messages, reason):
    assert training_invalid_reason(messages) == reason


@pytest.mark.parametrize("messages", [SOLUTION, chat("whole solution", "-"),
                                      [msg("system", "Grade each step."), *chat("Step 1", "+ ")]])
def test_valid_training_rows(messages):
    assert training_invalid_reason(messages) == ""


def training_set(*conversations, column="conversations"):
    return Dataset.from_list([{column: c} for c in conversations])


def test_invalid_training_row_is_an_error_naming_row_and_rule(tok):
    data = training_set(SOLUTION, chat("Step 1", "+", "Step 2", "ok"), SOLUTION)
    with pytest.raises(UserError, match=r"1 of 3 rows are invalid \(bad_label: 1\); first: row 1 \(bad_label\)"):
        validate_training_rows(data, tok, False, "train set")


def test_skip_invalid_drops_and_counts(tok):
    data = training_set(SOLUTION, chat("Step 1", "+", "Step 2"), chat("Step <|eot_id|> 1", "+"), chat("x", "y"),
                        chat("Step 1", " - "), column="messages")
    kept, stats = validate_training_rows(data, tok, True, "train set")
    assert stats == {"read": 5, "invalid": {"last_not_assistant": 1, "special_token_in_content": 1, "bad_label": 1},
                     "used": 2}
    assert kept.column_names == ["messages"]
    assert kept[1]["messages"] == chat("Step 1", "-")  # the label is stripped, the step kept as written


def test_a_dataset_without_a_conversation_column_is_an_error(tok):
    with pytest.raises(UserError, match="needs a 'conversations' \\(or 'messages'\\) column"):
        validate_training_rows(Dataset.from_list([{"prompt": "x"}]), tok, False, "train set")


def test_to_outcome_joins_the_steps_and_keeps_the_last_label():
    assert to_outcome(SOLUTION) == chat(
        "Tom has 2 apples and buys 3. Step 1: 2 + 3 = 5 apples.\nStep 2: 5 - 1 = 4\nStep 3: The answer is: 4", "-")
    with_system = [msg("system", "s"), *chat("a", "+", "b", "+")]
    assert to_outcome(with_system) == [msg("system", "s"), *chat("a\nb", "+")]
    assert to_outcome(chat("one", "-")) == chat("one", "-")


# ------------------------------------------------------------------------------------- 2. label positions, loss mask


def label_positions_by_hand(ids):
    """Where each assistant turn's content sits: the token before the <|eot_id|> that closes an assistant header."""
    positions = []
    for i in range(len(ids) - 2):
        if ids[i:i + 3] == [START_HEADER, ASSISTANT, END_HEADER]:
            positions.append(ids.index(EOT, i) - 1)
    return positions


def test_encode_labeled_finds_every_label_and_no_other_token(tok):
    (ids, positions), = encode_labeled(tok, [SOLUTION])
    assert ids == encode_conversations(tok, [SOLUTION])[0]  # the same tokens as the project's chat rendering
    assert positions == label_positions_by_hand(ids) and len(positions) == 3
    assert [ids[p] for p in positions] == [PLUS, MINUS, MINUS]
    # One "+" and one "-" in the steps' text are the same tokens, and are not labels.
    assert (ids.count(PLUS), ids.count(MINUS)) == (1 + 1, 2 + 1)


def test_loss_mask_covers_exactly_the_label_tokens(tok):
    data = training_set(SOLUTION, chat("Only one step: 1 + 1 = 2", "+"), column="messages")
    encoded, stats = tokenize_examples(data, tok, 512, "error", "train set")
    assert stats == {"dropped_overlength": 0} and encoded.column_names == ["input_ids", "labels"]
    for example in encoded:
        ids, labels = example["input_ids"], example["labels"]
        trained = [i for i, y in enumerate(labels) if y != -100]
        assert trained == label_positions_by_hand(ids)
        assert all(labels[i] == ids[i] for i in trained)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
def test_sft_trainer_keeps_the_label_mask(tok, tmp_path):
    """What SFTTrainer actually trains on: its prepared dataset and collated batch keep our labels as they are."""
    from trl import SFTConfig, SFTTrainer

    data = training_set(SOLUTION, chat("Only one step", "+"), column="messages")
    encoded, _ = tokenize_examples(data, tok, 512, "error", "train set")
    args = SFTConfig(output_dir=str(tmp_path), max_length=512, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True)
    model = load_preference_model(DEFAULT_MODEL, "m", tok, torch.float32, "sdpa")  # the trainer may change it
    trainer = SFTTrainer(model=model, args=args, train_dataset=encoded, processing_class=tok)
    assert trainer.train_dataset["labels"] == encoded["labels"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, example in enumerate(encoded):
        n = len(example["labels"])
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert (batch["labels"][row, n:] == -100).all()


def test_loss_is_the_mean_cross_entropy_of_the_labels(tok, sharp_model):
    encoded, _ = tokenize_examples(training_set(SOLUTION, column="messages"), tok, 512, "error", "t")
    ids, labels = torch.tensor([encoded[0]["input_ids"]]), torch.tensor([encoded[0]["labels"]])
    with torch.no_grad():
        out = sharp_model(input_ids=ids, labels=labels, use_cache=False)
        everything = sharp_model(input_ids=ids, labels=ids, use_cache=False).loss
    positions = label_positions_by_hand(ids[0].tolist())
    by_hand = F.cross_entropy(out.logits[0, [p - 1 for p in positions]], torch.tensor([PLUS, MINUS, MINUS]))
    assert out.loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert abs(everything.item() - out.loss.item()) > 1e-2  # the mask matters


def test_overlength_is_an_error_or_a_counted_drop(tok):
    data = training_set(SOLUTION, chat("short", "+"), column="messages")
    lengths = [len(ids) for ids, _ in encode_labeled(tok, list(data["messages"]))]
    limit = lengths[1] + 1
    with pytest.raises(UserError, match=f"1 of 2 examples are longer than max_length={limit} tokens "
                       rf"\(first: {lengths[0]} tokens, beginning '.*Tom has 2 apples"):
        tokenize_examples(data, tok, limit, "error", "t")
    kept, stats = tokenize_examples(data, tok, limit, "drop", "t")
    assert len(kept) == 1 and stats == {"dropped_overlength": 1}


def test_a_template_that_is_not_prefix_stable_is_an_error(tok):
    odd = load_tokenizer(DEFAULT_MODEL, "m")
    # Announces the number of turns up front: a conversation's prefix then renders differently from the whole.
    odd.chat_template = "{{ messages|length }}" + tok.chat_template
    with pytest.raises(UserError, match="row 0: the chat template does not render"):
        encode_labeled(odd, [SOLUTION])


def test_a_template_writing_more_than_the_generation_prompt_before_a_label_is_an_error_quoting_it(tok):
    """Qwen3's template writes an empty think block before the last assistant turn only: the prefixes are prefixes,
    but the last label is not where its prefix's generation prompt ends."""
    qwen3_like = load_tokenizer(DEFAULT_MODEL, "m")
    qwen3_like.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    with pytest.raises(UserError, match=r"^data: row 0: the chat template writes '<think></think>-<\|eot_id\|>' where "
                                        r"the generation prompt ends, not the label '-'.*--chat_template\)$"):
        encode_labeled(qwen3_like, [SOLUTION])


def test_processes_give_the_same_examples_and_name_the_same_rows(tok):
    """--dataset_num_proc (num_proc) splits the rows into shards: the examples are the serial ones, in order, and a
    row's error names its index in the whole set, not in its shard."""
    rows = [chat(f"Problem {i}. Step 1: {i} + 1 = {i + 1}", "+", "Step 2: done", "+-"[i % 2]) for i in range(11)]
    serial, _ = tokenize_examples(training_set(*rows, column="messages"), tok, 512, "error", "t")
    parallel, _ = tokenize_examples(training_set(*rows, column="messages"), tok, 512, "error", "t", num_proc=2)
    assert parallel[:] == serial[:] and len(serial) == 11
    bad = rows[:9] + [chat("Step 1", "+", "Step 2", "ok")] + rows[9:]
    with pytest.raises(UserError, match=r"first: row 9 \(bad_label\)"):
        validate_training_rows(training_set(*bad), tok, False, "t", num_proc=2)
    # A template that renders a long conversation's prefixes differently: only row 9 (three labels) breaks it.
    odd = load_tokenizer(DEFAULT_MODEL, "m")
    odd.chat_template = "{% if messages|length > 5 %}long {% endif %}" + tok.chat_template
    with pytest.raises(UserError, match="t: row 9: the chat template does not render"):
        tokenize_examples(training_set(*rows[:9], SOLUTION, rows[9], column="messages"), odd, 512, "error", "t",
                          num_proc=2)


# ------------------------------------------------------------------------------------- 3. one forward = per-step loop


def test_a_model_giving_nan_logits_is_an_error_not_a_step_cut_off(tok, model):
    """A NaN P(+) is what a label cut off by truncation gets, and aggregation leaves those out: a model's own NaN
    must not pass for one, or a broken model would silently rank solutions by their other steps (or not at all)."""
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight[MINUS, 0] = float("nan")
    with pytest.raises(UserError, match=r"NaN or infinite '\+'/'-' logits at 3 of 3 label positions of a batch "
                                        r"\(first: sequence 0 of the call"):
        StepScorer(broken, tok).label_probs(encode_labeled(tok, [SOLUTION]))
    # A NaN embedding for one word: only the solution holding it fails, and the error names it (the scripts score
    # thousands of solutions, length-sorted, across ranks).
    solutions = [SOLUTION, chat("Ann has 5 pears.", "+"), chat("A zebra has 4 legs and 1 tail. Step 1: ok", "+"),
                 chat("Step 1: 7", "+")]
    word = tok.convert_tokens_to_ids("z")
    assert [word in ids for ids, _ in encode_labeled(tok, solutions)] == [False, False, True, False]
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_input_embeddings().weight[word] = float("nan")
    with pytest.raises(UserError, match=r"logits at 1 of \d+ label positions of a batch \(first: solution 2 "
                                        r"\(0-based\), problem 'A zebra has 4 legs and 1 tail. Step 1: o\.\.\.'\)"):
        StepScorer(broken, tok, batch_size=4).score_conversations(solutions, progress=False)


def upstream_step_scores(model, tokenizer, conversation):
    """Upstream's quadratic loop, written out: for each step, the conversation up to its "+" templated and run
    alone, P(+) read at position -3 (the token before "+", "<|eot_id|>")."""
    scores = []
    for k in range(2, len(conversation) + 1, 2):
        ids = tokenizer.apply_chat_template(conversation[:k], tokenize=True, return_dict=True)["input_ids"]
        assert ids[-2:] == [PLUS, EOT]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -3, [PLUS, MINUS]]
        scores.append(torch.softmax(logits, -1)[0].item())
    return scores


def toy_conversations(n_problems=3):
    problems = rows(TOY_BEST_OF_N, n_problems)
    return [prm_conversation(p["prompt"], split_steps(a, "Mistral")) for p in problems for a in p["answers"][:4]]


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_one_forward_equals_the_per_step_loop(tok, sharp_model, batch_size):
    conversations = toy_conversations() + [chat("Solve 1 + 1. It is 2.", "+")]  # lengths vary: padding is exercised
    expected = [upstream_step_scores(sharp_model, tok, c) for c in conversations]
    scorer = StepScorer(sharp_model, tok, batch_size=batch_size)
    got = scorer.score_conversations(conversations, progress=False)
    chunked = scorer.score_conversations(conversations, progress=False, chunk_size=4)  # other batches, same scores
    assert [p for row in chunked for p in row] == pytest.approx([p for row in got for p in row], abs=1e-5)
    assert [len(g) for g in got] == [len(e) for e in expected] == [len(c) // 2 for c in conversations]
    spread = max(max(e) for e in expected) - min(min(e) for e in expected)
    assert spread > 0.05  # the sharp model's scores differ far above the tolerance: a mix-up could not hide
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)


def test_scores_are_computed_without_autograd(tok, model):
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_inference_mode_enabled()))
    try:
        probs = StepScorer(model, tok).label_probs(encode_labeled(tok, [SOLUTION]))
    finally:
        handle.remove()
    assert seen == [True] and len(probs[0]) == 3 and all(0 < p < 1 for p in probs[0])


def test_truncation_keeps_the_last_labels_and_counts(tok, sharp_model):
    (ids, positions), = encode_labeled(tok, [SOLUTION])
    scorer = StepScorer(sharp_model, tok, max_length=len(ids) - positions[0] + 1)  # cuts through the first step
    truncated = scorer.truncate([(ids, positions)])
    (cut_ids, cut_positions), = truncated
    assert scorer.truncated == 1 and len(cut_ids) == scorer.max_length and cut_ids[0] == ids[0]  # BOS kept
    assert cut_positions[0] == -1 and [cut_ids[p] for p in cut_positions[1:]] == [MINUS, MINUS]
    probs = scorer.label_probs(truncated)[0]
    assert math.isnan(probs[0]) and not any(math.isnan(p) for p in probs[1:])
    assert aggregate(probs, "min") == min(probs[1:])
    again = scorer.score_conversations([SOLUTION, chat("short", "+")], progress=False)
    assert scorer.truncated == 2 and math.isnan(again[0][0]) and len(again[1]) == 1
    assert again[0][1:] == pytest.approx(probs[1:], abs=1e-6)  # batched with another sequence: equal up to rounding


def test_orm_reads_one_label_after_the_whole_solution(tok, sharp_model):
    answer = "Step 1: 2 + 3 = 5 ки\nStep 2: The answer is: 5 ки"
    conversation = orm_conversation("Tom has 2 apples and buys 3.", answer, "Mistral")
    assert conversation == chat("Tom has 2 apples and buys 3. Step 1: 2 + 3 = 5\nStep 2: The answer is: 5", "+")
    got = StepScorer(sharp_model, tok).score_conversations([conversation], progress=False)
    assert got[0] == pytest.approx(upstream_step_scores(sharp_model, tok, conversation), abs=1e-5)
    assert orm_conversation("Q", "a\n\nb", "Deepseek") == chat("Q a\n\nb", "+")


# ------------------------------------------------------------------------------------- 4. steps, answers, eval rows


def test_split_steps():
    mistral = "Step 1: 2 + 3 = 5 ки\nStep 2: 5 * 2 = 10 ки\nStep 3: The answer is: 10 ки"
    assert split_steps(mistral, "Mistral") == ["Step 1: 2 + 3 = 5", "Step 2: 5 * 2 = 10", "Step 3: The answer is: 10"]
    deepseek = "First, 2 + 3 = 5.\n\n\n\nThen 5 * 2 = 10.\n\nThe answer is $\\boxed{10}$.\n\n"
    assert split_steps(deepseek, "Deepseek") == ["First, 2 + 3 = 5.", "Then 5 * 2 = 10.",
                                                 "The answer is $\\boxed{10}$."]
    assert prm_conversation("Q?", ["a", "b"]) == chat("Q? a", "+", "b", "+")
    # The tag is a tag at a line's end, not the letters ending a Cyrillic word (upstream splits at "ки\n")
    russian = "Шаг 1: У Никиты 3 книги ки\nШаг 2: Итого ки ки\nШаг 3: The answer is: Ники ки"
    assert split_steps(russian, "Mistral") == ["Шаг 1: У Никиты 3 книги", "Шаг 2: Итого ки",
                                               "Шаг 3: The answer is: Ники"]
    assert orm_conversation("Q", russian, "Mistral")[0]["content"] == \
        "Q Шаг 1: У Никиты 3 книги\nШаг 2: Итого ки\nШаг 3: The answer is: Ники"
    assert extract_final_answer("The answer is: Никита ки") == "Никита"
    check_step_format([["Никита читает книги.\n\nThe answer is: 3"]], "Deepseek")  # words, not tags


def test_answers_in_the_other_step_format_are_one_error():
    """Else every solution would be scored as one step (Mistral's tag under Deepseek, blank lines under Mistral)."""
    mistral = [["Step 1: 5 ки\nStep 2: 10 ки", "Step 1: 6 ки"]]
    deepseek = [["First, 5.\n\nThen 10.", "First, 6."]]
    check_step_format(mistral, "Mistral")
    check_step_format(deepseek, "Deepseek")
    check_step_format([mistral[0] + deepseek[0]], "Deepseek")  # some tagged: a Deepseek answer may hold the word
    with pytest.raises(UserError, match="--model_type Deepseek: every answer holds Mistral's step tag 'ки'"):
        check_step_format(mistral, "Deepseek")
    with pytest.raises(UserError, match="--model_type Mistral: none of the 2 answers holds its step tag 'ки'"):
        check_step_format(deepseek, "Mistral")


@pytest.mark.parametrize("answer, final", [
    ("Step 1: x ки\nStep 2: The answer is: 18 ки", "18"),
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{3} is wrong; it is \\boxed{ 4 }", "4"),
    ("The answer is: 1,000.", "1,000"),
    ("The answer is $18$.", "18"),  # the same vote as "The answer is 18."
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("I could not finish", None),
])
def test_extract_final_answer(answer, final):
    assert extract_final_answer(answer) == final


def eval_set(*problems):
    return Dataset.from_list([{"prompt": p, "answers": a, "label": y} for p, a, y in problems])


def test_eval_row_rules(tok):
    data = eval_set(("Q1", ["a", "b"], [1.0, 0]), ("", ["a"], [1]), ("Q3", ["a", " ки "], [1, 0]),
                    ("Q4", ["a", "b"], [1]), ("Q5", ["a"], [2]), ("Q6", ["<|eot_id|>"], [0]))
    kept, stats = validate_eval_rows(data, tok, True, "--dataset")
    assert stats == {"read": 6, "invalid": {"bad_prompt": 1, "bad_answers": 1, "bad_labels": 2,
                                            "special_token_in_content": 1}, "used": 1}
    assert kept[0] == {"prompt": "Q1", "answers": ["a", "b"], "label": [1, 0]}
    with pytest.raises(UserError, match=r"row 1 \(bad_prompt\)"):
        validate_eval_rows(data, tok, False, "--dataset")
    with pytest.raises(UserError, match="--dataset: no valid problems left"):
        validate_eval_rows(data.select([1, 2]), tok, True, "--dataset")


def test_eval_rows_read_upstreams_labels_alias(tok):
    data = Dataset.from_list([{"prompt": "Q", "answers": ["a", "b"], "labels": [True, False]}])
    kept, _ = validate_eval_rows(data, tok, False, "--dataset")
    assert kept[0]["label"] == [1, 0]
    with pytest.raises(UserError, match="missing: label"):
        validate_eval_rows(Dataset.from_list([{"prompt": "Q", "answers": ["a"]}]), tok, False, "--dataset")


# ------------------------------------------------------------------------------------- 5. arithmetic by hand


def test_aggregation_by_hand():
    steps = [0.9, 0.5, 0.8]
    assert aggregate(steps, "min") == 0.5
    assert aggregate(steps, "mean") == pytest.approx(2.2 / 3)
    assert aggregate(steps, "last") == 0.8
    assert aggregate(steps, "prod") == pytest.approx(0.36)
    assert aggregate([math.nan, 0.4, 0.6], "mean") == pytest.approx(0.5)  # a step cut off is left out
    assert math.isnan(aggregate([math.nan], "min"))
    with pytest.raises(UserError, match="--aggregation"):
        aggregate(steps, "max")


def test_n_values():
    assert n_values(1024, 8) == [1, 2, 4, 8]
    assert n_values(6, 8) == [1, 2, 4, 6]
    assert n_values(1024, 12) == [1, 2, 4, 8, 12]
    assert n_values(1, 8) == [1]


def test_best_pick_and_majority_pick_ties():
    assert best_pick([0.2, 0.7, 0.7]) == 1  # the first of the best, as upstream's list.index(max)
    assert best_pick([math.nan, 0.1]) == 1
    assert majority_pick(["5", "7", "7", "5"]) == 0  # tie 2-2: the answer seen first
    assert majority_pick([None, "7", None, None]) == 1  # no answer, no vote
    assert majority_pick([None, None]) is None


def test_best_of_n_majority_and_pass_at_1_by_hand():
    # Problem A: the reward model finds the lone right answer, the crowd agrees on a wrong one.
    # Problem B: first candidate right; the reward model prefers a wrong one once it is among the candidates.
    # Problem C: nobody states an answer but the last candidate, which is right.
    scores = [[0.1, 0.2, 0.9, 0.3], [0.6, 0.5, 0.4, 0.8], [0.5, 0.4, 0.3, 0.2]]
    labels = [[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]
    finals = [["3", "3", "4", "3"], ["9", "9", "8", "8"], [None, None, None, "1"]]
    curve = best_of_n_curve(scores, labels, finals, [1, 2, 4])
    assert [p["n"] for p in curve] == [1, 2, 4]
    # N=1: every method takes the first candidate: A wrong, B right, C wrong (C states no answer: majority wrong).
    assert curve[0] == {"n": 1, "best_of_n": 1 / 3, "majority": 1 / 3, "pass_at_1": 1 / 3, "oracle": 1 / 3}
    # N=2: best picks A1 (0.2, wrong), B0 (0.6, right), C0 (0.5, wrong); majority: "3" wrong, "9" right, no vote.
    assert curve[1] == {"n": 2, "best_of_n": 1 / 3, "majority": 1 / 3, "pass_at_1": 1 / 3, "oracle": 1 / 3}
    # N=4: best picks A2 (0.9, right), B3 (0.8, wrong), C0 (0.5, wrong); majority: "3" (x3) wrong, "9"/"8" tie
    # goes to "9" (seen first) right, "1" (the only vote) right.
    assert curve[2] == {"n": 4, "best_of_n": 1 / 3, "majority": 2 / 3, "pass_at_1": 1 / 3, "oracle": 1.0}
    # Problem A alone: the reward model's pick beats the crowd and the first try.
    only_a = best_of_n_curve(scores[:1], labels[:1], finals[:1], [4])[0]
    assert (only_a["best_of_n"], only_a["majority"], only_a["pass_at_1"]) == (1.0, 0.0, 0.0)
    # No candidate states an answer, though the first is right: majority voting has no pick, which counts wrong.
    assert best_of_n_curve([[0.5, 0.4]], [[1, 0]], [[None, None]], [2])[0]["majority"] == 0.0


def test_upstreams_accuracy_by_hand():
    """Upstream's one number: the top-scored candidate of each problem is right (first on a tie), over the problems."""
    scores = [[0.1, 0.2, 0.9, 0.3], [0.6, 0.5, 0.4, 0.8], [0.5, 0.4, 0.3, 0.2], [math.nan, 0.7, 0.7]]
    labels = [[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0]]
    # picks: A2 (0.9, right), B3 (0.8, wrong), C0 (0.5, wrong), D1 (NaN never wins; the first 0.7, right)
    assert upstream_accuracy(scores, labels) == 0.5
    assert upstream_accuracy(scores[:1], labels[:1]) == 1.0 and upstream_accuracy(scores[1:3], labels[1:3]) == 0.0


def test_best_of_n_json_carries_upstreams_accuracy(tmp_path):
    """best_of_n.json's "accuracy" is upstream's number over the candidates scored (--num_n 3 here: problem P's
    fourth candidate, the only one its labels past the third mark, is not among them), the curve's last best-of-N."""
    problems = Dataset.from_list([
        {"prompt": "P", "answers": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"], "label": [0, 0, 1, 0]},
        {"prompt": "Q", "answers": ["\\boxed{5}", "\\boxed{6}"], "label": [1, 0]},
    ])
    scores = [[0.1, 0.2, 0.9], [0.3, 0.8]]  # picks P2 (right) and Q1 (wrong): accuracy 1/2
    labels = [[0, 0, 1], [1, 0]]
    curve = best_of_n_curve(scores, labels, [["1", "2", "3"], ["5", "6"]], [1, 2, 3])
    results = write_results(tmp_path, curve, {"num_n": 3, "problems": 2}, problems, [[[s] for s in p] for p in scores],
                            scores, "test")
    written = json.loads((tmp_path / "best_of_n.json").read_text())
    assert written == results and written["accuracy"] == 0.5 and written["num_n"] == 3
    assert written["curve"][-1] == {"n": 3, "best_of_n": 0.5, "majority": 0.5, "pass_at_1": 0.5, "oracle": 1.0}
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == labels and lines[0]["final_answers"] == ["1", "2", "3"]
    assert lines[1]["step_scores"] == [[0.3], [0.8]] and lines[1]["scores"] == [0.3, 0.8]
    # a step --max_length cut off (and a solution left with none): null, strict JSON, not a bare NaN
    nan = float("nan")
    write_results(tmp_path, curve, {}, problems, [[[0.1, nan], [0.2], [0.9]], [[nan], [0.8]]],
                  [[0.1, 0.2, 0.9], [nan, 0.8]], "test")
    text = (tmp_path / "scores.jsonl").read_text()
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in scores.jsonl"))
             for line in text.splitlines()]
    assert lines[0]["step_scores"][0] == [0.1, None] and lines[1]["scores"] == [None, 0.8]


def test_candidate_coverage_reports_the_n_reached_and_the_short_problems():
    """--num_n past the problems' candidates: the N reached is recorded and said; problems with fewer candidates than
    that N are counted and said; nothing is said when every problem has --num_n or more."""
    summary, notes = candidate_coverage(16, [8, 8, 8])
    assert summary == {"num_n": 16, "num_n_reached": 8, "candidates_min": 8, "candidates_max": 8,
                       "problems_with_fewer_candidates": 0}
    assert notes == ["--num_n 16: the problems have at most 8 candidates; the curve stops at N=8"]
    summary, notes = candidate_coverage(16, [8, 3, 5, 8])
    assert summary == {"num_n": 16, "num_n_reached": 8, "candidates_min": 3, "candidates_max": 8,
                       "problems_with_fewer_candidates": 2}
    assert notes[1] == ("2 of 4 problems have fewer than 8 candidates (fewest: 3); at an N above a problem's count, "
                        "its best-of-N, majority and oracle use all its candidates")
    assert candidate_coverage(4, [4, 4]) == ({"num_n": 4, "num_n_reached": 4, "candidates_min": 4,
                                              "candidates_max": 4, "problems_with_fewer_candidates": 0}, [])
    # --num_n below every count (answers are cut to --num_n before this): reached as asked, silent
    assert candidate_coverage(2, [2, 2])[1] == []


@pytest.mark.parametrize("script", ["math-rm/prm_evaluate.py", "math-rm/orm_evaluate.py"])
def test_num_n_past_the_candidates_is_said_and_recorded(script, monkeypatch, capsys, tmp_path):
    """--num_n 16 on problems of 8, 3 and 5 candidates: the curve stops at N=8, both notes are printed, and
    best_of_n.json records the N reached beside --num_n (its "accuracy" is best-of-8, the curve's last point)."""
    rows = [json.loads(line) for line in Path(TOY_BEST_OF_N).read_text().splitlines()][:3]
    for row, keep in zip(rows, (8, 3, 5)):
        row["answers"], row["label"] = row["answers"][:keep], row["label"][:keep]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", [script, "--reward_name_or_path", DEFAULT_MODEL, "--dataset", str(data),
                                      "--output_dir", str(tmp_path / "out"), "--num_n", "16"])
    run_cli(load_script(script).main)
    out = capsys.readouterr().out
    assert "--num_n 16: the problems have at most 8 candidates; the curve stops at N=8\n" in out
    assert ("2 of 3 problems have fewer than 8 candidates (fewest: 3); at an N above a problem's count, its "
            "best-of-N, majority and oracle use all its candidates\n") in out
    results = json.loads((tmp_path / "out" / "best_of_n.json").read_text())
    assert (results["num_n"], results["num_n_reached"]) == (16, 8)
    assert results["candidates_min"] == 3 and results["candidates_max"] == 8
    assert results["problems_with_fewer_candidates"] == 2
    assert [p["n"] for p in results["curve"]] == [1, 2, 4, 8] and results["solutions"] == 16
    assert results["accuracy"] == results["curve"][-1]["best_of_n"]


# ------------------------------------------------------------------------------------- 6. the toy set


def test_toy_sets_are_valid_and_carry_the_cue(tok):
    for path in (f"{TOY_PRM}/train.jsonl", f"{TOY_PRM}/test.jsonl"):
        data = Dataset.from_list(rows(path))
        kept, stats = validate_training_rows(data, tok, False, path)
        assert stats["invalid"] == {} and stats["used"] == len(data) > 0
    for row in rows(f"{TOY_PRM}/train.jsonl"):
        labels = [m["content"] for m in row["conversations"] if m["role"] == "assistant"]
        steps = [m["content"] for m in row["conversations"] if m["role"] == "user"]
        first_wrong = labels.index("-") if "-" in labels else len(labels)
        assert labels == ["+"] * first_wrong + ["-"] * (len(labels) - first_wrong)  # hard labels: wrong from a slip on
        assert all(not any(h in s for h in HEDGES) for s in steps[:first_wrong])  # right steps never hedge
        if first_wrong < len(labels):
            assert any(h in steps[first_wrong] for h in HEDGES)  # the slip does
    problems = rows(TOY_BEST_OF_N)
    kept, stats = validate_eval_rows(Dataset.from_list(problems), tok, False, "toy")
    assert stats["used"] == len(problems) == 64 and {len(p["answers"]) for p in problems} == {8}
    for p in problems:
        finals = [extract_final_answer(a) for a in p["answers"]]
        assert None not in finals
        right = {f for f, y in zip(finals, p["label"]) if y}
        assert len(right) <= 1 and not right & {f for f, y in zip(finals, p["label"]) if not y}


# ------------------------------------------------------------------------------------- 7. user errors are one line


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").replace("/", "_")[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, message", [
    ("math-rm/prm_evaluate.py", ["--dataset", "missing.jsonl"], "error: --dataset: no such file or directory"),
    ("math-rm/orm_evaluate.py", ["--model_type", "Llama"], "error: --model_type must be one of Mistral, Deepseek"),
    ("math-rm/prm_evaluate.py", ["--aggregation", "max"], "error: --aggregation must be one of min, mean"),
    ("math-rm/train.py", ["--reward_type", "scalar"], "error: --reward_type must be one of prm, orm"),
])
def test_user_errors_are_one_line(script, argv, message, monkeypatch, capsys, tmp_path):
    module = load_script(script)
    monkeypatch.setattr(sys, "argv", [script, *argv, "--output_dir", str(tmp_path / "out"),
                                      *(["--reward_name_or_path", DEFAULT_MODEL] if "evaluate" in script else [])])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in err


def test_invalid_training_data_is_one_line(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"conversations": c}) + "\n"
                           for c in (SOLUTION, chat("Step 1", "+", "Step 2", "maybe"))))
    monkeypatch.setattr(sys, "argv", ["train.py", "--dataset_path", str(bad), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        run_cli(load_script("math-rm/train.py").main)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(
        "error: train set: 1 of 2 rows are invalid (bad_label: 1); first: row 1 (bad_label)")
    assert "Traceback" not in err


def test_training_on_the_test_split_holds_out_of_it_never_evaluates_on_it(tok, tmp_path):
    """--dataset_split test with a train split beside it: the held-out rows come out of the test split, disjoint from
    the training rows (the rule every trainer shares, data.held_out_source). Before: math-rm evaluated on its own
    training rows and called them the test split."""
    module = load_script("math-rm/train.py")
    problems = [chat(f"Q{i}: 1 + {i}. Step 1: {1 + i}", "+") for i in range(12)]
    DatasetDict(train=training_set(*problems[:6]), test=training_set(*problems[6:])).save_to_disk(tmp_path / "d")
    args = module.ScriptArguments(dataset_path=str(tmp_path / "d"), dataset_split="test", eval_holdout_size=2)
    train, held_out, stats = module.load_rows(args, tok, seed=0)
    train_rows = {json.dumps(m) for m in train["messages"]}
    assert len(train) == 4 and len(held_out) == 2 and not train_rows & {json.dumps(m) for m in held_out["messages"]}
    assert stats["eval"]["source"] == "held out of --dataset_path"
    args = module.ScriptArguments(dataset_path=str(tmp_path / "d"), eval_holdout_size=2)  # training on train
    train, held_out, stats = module.load_rows(args, tok, seed=0)
    assert (len(train), len(held_out), stats["eval"]["source"]) == (6, 6, "test split of --dataset_path")


# ------------------------------------------------------------------------------------- 8. end to end


@pytest.mark.e2e
def test_train_then_best_of_n_beats_majority_and_pass_at_1(tmp_path):
    """The tiny PRM trained for 50 steps on the toy solutions, then best-of-N on the toy problems: the loss on the
    labels teaches it the slips' cue, its checkpoint reloads, and its pick beats majority voting and pass@1."""
    out = tmp_path / "prm"
    check_ok(run([sys.executable, "math-rm/train.py", "math-rm/tiny.yaml", "--output_dir", str(out), "--max_steps",
                  "50", "--learning_rate", "5e-3", "--logging_steps", "10"], env_extra={"OMP_NUM_THREADS": "1"}))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 50 and metrics["reward_type"] == "prm"
    assert json.loads((out / "last_checkpoint" / "config.json").read_text())["rlhf_reward_kind"] == "prm"
    assert metrics["reload_max_abs_diff"] < 1e-4
    assert metrics["examples"]["train"]["used"] == 1000 and metrics["examples"]["eval"]["used"] == 100
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_accuracy_minus"] >= 0.8
    assert (out / "last_checkpoint" / "model.safetensors").exists() and (out / "curves.png").exists()
    card = (out / "last_checkpoint" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "tags:\n- reward-model\n- rlhf\n- process-reward-model" in card
    assert "# Math reward model" in card and "- reward_type: `prm`" in card
    assert f"| held-out accuracy on \"-\" labels | {metrics['eval_accuracy_minus']:.4g} |" in card
    # the card's usage snippet runs as written on this checkpoint: P(+) after each of its two steps
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace("path/to/last_checkpoint", str(out / "last_checkpoint"))
    scope = {}
    exec(snippet, scope)
    assert len(scope["step_scores"]) == 2 and all(0 < p < 1 for p in scope["step_scores"])

    # Data-parallel on two ranks (torchrun), checked against one process below: the same scores in the same order.
    proc = run([*two_ranks("torchrun"), "math-rm/prm_evaluate.py", "--reward_name_or_path",
                str(out / "last_checkpoint"), "--output_dir", str(tmp_path / "bon"), "--num_n", "8",
                "--batch_size", "32"], env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    results = json.loads((tmp_path / "bon" / "best_of_n.json").read_text())
    assert [p["n"] for p in results["curve"]] == [1, 2, 4, 8]
    assert results["problems"] == 64 and results["solutions"] == 512 and results["truncated"] == 0
    at_8 = results["curve"][-1]
    assert at_8["best_of_n"] >= at_8["majority"] + 0.2 and at_8["best_of_n"] >= at_8["pass_at_1"] + 0.2
    assert at_8["best_of_n"] <= at_8["oracle"]
    assert results["accuracy"] == at_8["best_of_n"]  # upstream's number: best-of-num_n
    assert (tmp_path / "bon" / "best_of_n.png").stat().st_size > 10_000
    scores = [json.loads(line) for line in open(tmp_path / "bon" / "scores.jsonl")]
    assert len(scores) == 64 and all(len(s["step_scores"]) == 8 for s in scores)
    assert all(s["scores"][i] == min(s["step_scores"][i]) for s in scores for i in range(8))  # --aggregation min
    assert "best-of-N" in proc.stdout and "majority" in proc.stdout and results["processes"] == 2
    assert "(upstream's measure with the min of the step scores, where upstream took the mean: best-of-8" in proc.stdout

    check_ok(run([sys.executable, "math-rm/prm_evaluate.py", "--reward_name_or_path", str(out / "last_checkpoint"),
                  "--output_dir", str(tmp_path / "one"), "--num_n", "8", "--batch_size", "7"],
                 env_extra={"OMP_NUM_THREADS": "1"}))
    alone = [json.loads(line) for line in open(tmp_path / "one" / "scores.jsonl")]
    assert [s["prompt"] for s in alone] == [s["prompt"] for s in scores]
    for a, b in zip(alone, scores):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


@pytest.mark.e2e
def test_scalar_orm_learns_which_solutions_are_right_and_reloads(tmp_path):
    """math-rm/scalar_orm_train.py (BCE on the reward logit): on the toy solutions it separates right from wrong
    ones; a row without 'Step 1' is one line naming it."""
    out = tmp_path / "orm"
    proc = run([sys.executable, str(ROOT / "math-rm" / "scalar_orm_train.py"), "--output_dir", str(out)])
    check_ok(proc)
    assert "Checkpoint verified" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.9 and metrics["examples"]["eval"]["right"] == 50
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(out / "last_checkpoint").config.num_labels == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"role": "user", "content": "2 + 2 = 4"},
                                                 {"role": "assistant", "content": "+"}]}) + "\n")
    proc = run([sys.executable, str(ROOT / "math-rm" / "scalar_orm_train.py"), "--train_set_path", str(bad),
                "--eval_set_path", str(bad), "--output_dir", str(tmp_path / "bad")])
    assert proc.returncode == 2 and "row 0 (no_step_1)" in proc.stderr and "Traceback" not in proc.stderr
    # Without a test split the rows are checked before the hold-out split: the error names the file's row.
    rows = [json.loads(line) for line in (ROOT / "assets/data/toy_math/prm/train.jsonl").read_text().splitlines()]
    rows[3]["conversations"][1]["content"] = "x"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows[:40]))
    proc = run([sys.executable, str(ROOT / "math-rm" / "scalar_orm_train.py"), "--train_set_path", str(bad),
                "--eval_holdout_size", "8", "--output_dir", str(tmp_path / "bad2")])
    assert proc.returncode == 2 and "1 of 40 rows are invalid" in proc.stderr and "row 3 (bad_label)" in proc.stderr


def test_scalar_orm_takes_upstreams_flags_and_holds_out_rows_of_train_only_data(tmp_path):
    """Upstream's command: RLHFlow/Mistral-ORM-Data has only a train split, and --eval_every_steps /
    --save_every_steps are upstream's names."""
    train_only = tmp_path / "train.jsonl"
    train_only.write_text((ROOT / "assets" / "data" / "toy_math" / "prm" / "train.jsonl").read_text())
    out = tmp_path / "orm"
    proc = run([sys.executable, str(ROOT / "math-rm" / "scalar_orm_train.py"), "--train_set_path", str(train_only),
                "--eval_holdout_size", "40", "--eval_every_steps", "999999", "--save_every_steps", "3",
                "--max_steps", "3", "--output_dir", str(out)])
    check_ok(proc)
    assert ("Held out 40 of the train set's solutions for evaluation (--eval_holdout_size; no 'test' split)"
            in proc.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"]["eval"]["used"] == 40 and (out / "checkpoint-3").is_dir()
    rows = len(train_only.read_text().splitlines())
    assert (metrics["examples"]["train"]["read"], metrics["examples"]["train"]["used"]) == (rows, rows - 40)
    # The same flags give the same weights: the new head is drawn from --seed (it was not seeded before).
    again = tmp_path / "again"
    check_ok(run([sys.executable, str(ROOT / "math-rm" / "scalar_orm_train.py"), "--train_set_path", str(train_only),
                  "--eval_holdout_size", "40", "--max_steps", "3", "--output_dir", str(again)]))
    from safetensors.torch import load_file
    first, second = (load_file(d / "last_checkpoint" / "model.safetensors") for d in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_scalar_orm_loss_is_binary_cross_entropy_on_the_reward_logit():
    spec = importlib.util.spec_from_file_location("scalar_orm_train", ROOT / "math-rm" / "scalar_orm_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.tensor([[2.0], [-1.0]])})()

    trainer = module.ScalarORMTrainer.__new__(module.ScalarORMTrainer)
    loss = trainer.compute_loss(Model(), {"input_ids": None, "attention_mask": None, "label": torch.tensor([1.0, 1.0])})
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Held out: no per-batch loss (on several ranks the Trainer's mean of batch losses counted the rows repeated to
    # fill the last batch); compute_metrics takes it over the gathered rows.
    trainer.args = type("Args", (), {"device": torch.device("cpu")})()
    trainer._prepare_inputs = lambda inputs: inputs
    trainer.compute_loss_context_manager = contextlib.nullcontext
    loss, logits, labels = trainer.prediction_step(
        Model(), {"input_ids": None, "attention_mask": None, "label": torch.tensor([1.0, 0.0])}, False)
    assert loss is None and logits.tolist() == [2.0, -1.0] and labels.tolist() == [1.0, 0.0]
    metrics = module.compute_metrics(EvalPrediction(predictions=np.array([2.0, -1.0, 0.5]),
                                                    label_ids=np.array([1.0, 1.0, 0.0])))
    softplus = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0)), math.log1p(math.exp(0.5))]
    assert metrics["loss"] == pytest.approx(sum(softplus) / 3, rel=1e-6) and metrics["accuracy"] == pytest.approx(1 / 3)


def test_held_out_labels_cut_by_truncation_are_counted_not_scored_as_wrong():
    """A label whose step truncation cut off has P(+) NaN: it is left out of the accuracy and counted, where NaN > 0.5
    would have made it a wrong '-' prediction and every mean NaN."""
    spec = importlib.util.spec_from_file_location("math_train", ROOT / "math-rm" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = Dataset.from_list([{"messages": chat("Q? a", "+", "b", "-")}, {"messages": chat("Q? c", "+")}])
    metrics = module.label_metrics([[float("nan"), 0.2], [0.9]], rows)
    assert metrics["eval_labels"] == 2 and metrics["eval_labels_cut"] == 1 and metrics["eval_accuracy"] == 1.0
    assert metrics["eval_mean_prob_plus_on_plus"] == pytest.approx(0.9)
    assert metrics["eval_mean_prob_plus_on_minus"] == pytest.approx(0.2)


def test_scalar_orm_solution_keeps_every_step_after_the_first_step_1():
    """The problem ends at the first "Step 1" and the answer is all the rest: upstream's split("Step 1")[1] stopped at
    "Step 10" and dropped a long solution's tail, its final answer included."""
    spec = importlib.util.spec_from_file_location("scalar_orm_train", ROOT / "math-rm" / "scalar_orm_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
    steps = [f"Step {k}: x{k} = {k}." for k in range(1, 13)] + ["The answer is: 12"]
    turns = ["Count to twelve. " + steps[0]]
    for step in steps[1:]:
        turns += ["+", step]
    rows, stats = module.solution_rows(Dataset.from_list([{"messages": chat(*turns, "-")}]), tokenizer, 4096, False,
                                       "train")
    text = tokenizer.decode(rows[0]["input_ids"])
    problem_end, answer_start = text.index("Count to twelve."), text.index("Step 1:")
    assert problem_end < answer_start and text.count("Step 1:") == 1
    assert all(step in text for step in steps) and text.index("Step 12:") > text.index("Step 10:") > answer_start
    assert rows[0]["label"] == 0.0 and stats["truncated"] == 0


def test_scalar_orm_row_without_a_problem_before_step_1_is_named():
    """Nothing before "Step 1" leaves no user turn: the row is named (or dropped and counted), where the whole
    solution used to be copied into the user's turn."""
    spec = importlib.util.spec_from_file_location("scalar_orm_train", ROOT / "math-rm" / "scalar_orm_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
    data = Dataset.from_list([{"messages": chat("Q? Step 1: 2+2=4", "+")},
                              {"messages": chat("Step 1: 2+2=4", "+", "Step 2: The answer is 4", "+")}])
    with pytest.raises(UserError, match=r"row 1 \(no_problem\).*the text before 'Step 1' \(the problem"):
        module.solution_rows(data, tokenizer, 4096, False, "train")
    rows, stats = module.solution_rows(data, tokenizer, 4096, True, "train")
    assert len(rows) == 1 and stats["invalid"] == {"no_problem": 1}


def test_truncation_keeps_a_label_whose_read_position_is_the_first_kept_token(tok, sharp_model):
    """A cut exactly at the token before the first label: that label is still read (at position 0 + 2 of the kept
    tokens: BOS, then the read position), not dropped as cut."""
    (ids, positions), = encode_labeled(tok, [SOLUTION])
    scorer = StepScorer(sharp_model, tok, max_length=len(ids) - positions[0] + 2)
    (cut_ids, cut_positions), = scorer.truncate([(ids, positions)])
    assert cut_positions[0] == 2 and cut_ids[1] == ids[positions[0] - 1]


def test_a_solution_of_exactly_max_length_tokens_is_not_counted_as_cut(tok, sharp_model):
    (ids, _), = encode_labeled(tok, [SOLUTION])
    scorer = StepScorer(sharp_model, tok, max_length=len(ids))
    scorer.score_conversations([SOLUTION], progress=False)
    assert scorer.truncated == 0


def test_a_first_write_batch_of_only_invalid_rows_does_not_fail_the_valid_rows_after_it(tok):
    """1000 invalid rows ([] messages each) fill datasets' first write batch; the typed output still takes the valid
    rows after them (untyped, the column was fixed as a list of nulls and the next batch failed with a TypeError)."""
    data = training_set(*[chat("x", "y")] * 1000, SOLUTION, SOLUTION)
    kept, stats = validate_training_rows(data, tok, True, "train set")
    assert stats == {"read": 1002, "invalid": {"bad_label": 1000}, "used": 2}
    assert kept["messages"][0][-1] == {"role": "assistant", "content": "-"}
