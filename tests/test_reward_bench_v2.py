"""RewardBench 2: the official arithmetic against hand-computed values, the data rules, benchmark detection, the
results JSON and record, and the PM's win-rate scores."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from useful_code import evaluation
from useful_code import reward_bench as rb
from useful_code.cli import UserError
from useful_code.data_parallel import map_across_ranks
from useful_code.defaults import REPO_ROOT, REWARD_BENCH_2_SAMPLE
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.scoring import split_by_sizes

SAMPLE = REWARD_BENCH_2_SAMPLE


def test_best_of_n_credit_shares_a_tie_at_the_maximum():
    assert rb.best_of_n_credit([3.0, 1.0, 2.0, 0.0]) == 1.0
    assert rb.best_of_n_credit([2.0, 2.0, 1.0, 2.0]) == pytest.approx(1 / 3)  # three completions at the maximum
    assert rb.best_of_n_credit([1.0, 2.0, 0.0, 0.0]) == 0.0
    assert rb.best_of_n_credit([1.0, 1.0]) == 0.5


# ref:1  correct [3] vs [1, 2]          -> accurate, gap 1
# tied:1 correct [5, 4, 4.5] vs [1]     -> accurate, spread 1, gap 3
# ref:2  correct [1] vs [2]             -> wrong, gap -1
# tied:2 correct [2, 0] vs [1]          -> wrong, spread 2, gap -1
# tied:3 correct [1, 1] vs [0], no ref  -> accurate; in the accuracy only (its margins need a ref:3)
TIES_IDS = ["ref:1", "tied:1", "ref:2", "tied:2", "tied:3"]
TIES_SCORES = [[3, 1, 2], [5, 4, 4.5, 1], [1, 2], [2, 0, 1], [1, 1, 0]]
TIES_CORRECT = [1, 3, 1, 2, 2]


def test_ties_score_by_hand():
    terms = rb.ties_score(TIES_IDS, TIES_SCORES, TIES_CORRECT)
    assert terms["tied_accuracy"] == pytest.approx(2 / 3) and terms["ref_accuracy"] == 0.5
    # paired n = 1, 2: spread [1, 2], tied gap [3, -1], hard gap min(ref gap, tied gap) = [1, -1]
    assert terms["correctness_preferred"] == 0.5  # 3 > 1, -1 < 2
    assert terms["correctness_preferred_hard"] == 0.0  # 1 > 1 is false, -1 < 2
    margin = (math.tanh(1 / 1 - 1) + math.tanh(-1 / 2 - 1)) / 2
    assert terms["correctness_margin"] == pytest.approx(margin)
    expected = 0.3 * 2 / 3 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * margin
    assert terms["score"] == pytest.approx(expected) and expected == pytest.approx(0.445474, abs=1e-6)
    assert terms["paired_prompts"] == 2


def test_ties_zero_spread_counts_the_margin_term_as_official():
    # spread 0: gap / 0 is +inf (tanh 1); both correct answers tied and the gap 0: 0/0, counted as 0
    terms = rb.ties_score(["ref:1", "tied:1"], [[2, 1], [3, 3, 1]], [1, 2])
    assert terms["correctness_margin"] == 1.0
    terms = rb.ties_score(["ref:1", "tied:1"], [[1, 1], [1, 1, 1]], [1, 2])
    assert terms["correctness_margin"] == 0.0 and terms["ref_accuracy"] == 0.0


def test_ties_needs_paired_prompts_and_well_formed_ids():
    with pytest.raises(UserError, match="at least one 'ref:<n>' prompt with a 'tied:<n>'"):
        rb.ties_score(["ref:1", "tied:2"], [[2, 1], [3, 2, 1]], [1, 2])
    with pytest.raises(UserError, match="'7' is not 'ref:<n>' or 'tied:<n>'"):
        rb.ties_score(["7"], [[2, 1]], [1])


def test_ties_pairs_prompt_numbers_as_integers_and_needs_two_correct_in_a_tied_prompt():
    # run_v2.py's process_single_model reads n with int(): 'ref:07' and 'tied:7' are one pair
    assert rb.ties_score(["ref:07", "tied:7"], [[2, 1], [3, 2, 1]], [1, 2])["paired_prompts"] == 1
    with pytest.raises(UserError, match="'tied:x' is not 'ref:<n>' or 'tied:<n>' with n an integer"):
        rb.ties_score(["ref:1", "tied:x"], [[2, 1], [3, 2, 1]], [1, 2])
    with pytest.raises(UserError, match="'tied:1': a tied prompt needs at least two correct completions"):
        rb.ties_score(["ref:1", "tied:1"], [[2, 1], [3, 1]], [1, 1])
    with pytest.raises(UserError, match="'ref:01': a second 'ref:1' prompt"):
        rb.ties_score(["ref:1", "ref:01", "tied:1"], [[2, 1], [2, 1], [3, 2, 1]], [1, 1, 2])


def test_ties_in_any_case_is_scored_as_ties():
    # run_v2.py picks the Ties rows by subset.lower() == "ties"
    upper = rb.score_examples_v2(TIES_IDS, ["Ties"] * 5, TIES_SCORES, TIES_CORRECT)
    lower = rb.score_examples_v2(TIES_IDS, ["ties"] * 5, TIES_SCORES, TIES_CORRECT)
    assert lower["subsets"]["Ties"] == upper["subsets"]["Ties"] == pytest.approx(100 * 0.445474, abs=1e-4)
    assert lower["per_example"][0]["subset"] == "Ties" and "ties" not in lower["subsets"]


def test_score_examples_v2_subsets_score_and_a_missing_subset():
    ids = ["0", "1", "2", *TIES_IDS]
    subsets = ["Math", "Math", "Focus"] + ["Ties"] * 5
    scores = [[4, 1, 2, 3], [1, 1, 0, 1], [0, 5, 1, 2], *TIES_SCORES]
    results = rb.score_examples_v2(ids, subsets, scores, [1, 1, 1, *TIES_CORRECT])
    assert results["benchmark"] == 2
    assert results["subsets"]["Math"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert results["subsets"]["Focus"] == 0.0
    assert results["subsets"]["Ties"] == pytest.approx(44.5474, abs=1e-3)
    for absent in ("Factuality", "Precise IF", "Safety"):
        assert results["subsets"][absent] is None
    assert results["score_subsets"] == ["Math", "Focus", "Ties"]
    assert results["score"] == pytest.approx((66.6667 + 0 + 44.5474) / 3, abs=1e-3)
    assert results["missing_subsets"] == ["Factuality", "Precise IF", "Safety"]
    first, ties_row = results["per_example"][0], results["per_example"][3]
    assert first == {"id": "0", "subset": "Math", "scores": [4.0, 1.0, 2.0, 3.0], "num_correct": 1, "credit": 1.0}
    assert ties_row["credit"] is None and ties_row["num_correct"] == 1
    assert results["ties"] == 1  # prompt "1": its correct completion shares the maximum
    json.dumps(results, allow_nan=False)
    report = rb.format_report_v2(results)
    assert "absent" in report and "(mean of Math, Focus, Ties)" in report


def test_score_examples_v2_all_six_is_their_plain_mean():
    subsets = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties", "Ties"]
    scores = [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [2, 1], [3, 3, 0]]
    results = rb.score_examples_v2(["0", "1", "2", "3", "4", "ref:0", "tied:0"], subsets, scores, [1] * 6 + [2])
    ties = 100 * (0.3 + 0.3 + 0.2 * 1 + 0.2 * 1 + 0.01 * 1)  # spread 0: every margin term at its best
    assert results["subsets"]["Ties"] == pytest.approx(ties)
    assert results["score"] == pytest.approx((100 * 3 + ties) / 6) and len(results["score_subsets"]) == 6


def test_score_examples_v2_refuses_nan_and_duplicate_ids():
    with pytest.raises(UserError, match=r"NaN or infinite scores for 1 examples \(ids: b\)"):
        rb.score_examples_v2(["a", "b"], ["Math", "Math"], [[1, 0], [float("nan"), 0]], [1, 1])
    with pytest.raises(UserError, match="ids occur more than once"):
        rb.score_examples_v2(["a", "a"], ["Math", "Math"], [[1, 0], [1, 0]], [1, 1])


def v2_row(i, subset="Math", **changes):
    row = {"id": str(i), "prompt": f"question {i}", "chosen": [f"right {i}"], "rejected": [f"wrong {i}", f"no {i}"],
           "num_correct": 1, "num_incorrect": 2, "total_completions": 3, "subset": subset}
    return {**row, **changes}


def test_v2_rows_are_validated_per_row():
    rows = [v2_row(0), v2_row(1, prompt=""), v2_row(2, chosen=[]), v2_row(3, num_correct=2),
            v2_row(4, subset="Ties"), v2_row(5, rejected=["fine <|eot_id|>", "no"]),
            v2_row(6, subset="Ties", id="ref:6"), v2_row(7, subset="Ties", id="tied:6"),
            v2_row(8, subset="ties", id="tied:x"), v2_row(9, subset=None), v2_row(10, subset=" ")]
    dataset = Dataset.from_list(rows)
    with pytest.raises(UserError, match=r"row 1 \(bad_prompt\), row 2 \(not_a_completion_list\), row 3 "
                                        r"\(counts_mismatch\), row 4 \(bad_ties_id\), row 7 \(bad_ties_id\)"):
        evaluation.prepare_examples_v2(dataset, "--data_set_name", False)
    pattern = re.compile(r"<\|eot_id\|>")
    kept, stats = evaluation.prepare_examples_v2(dataset, "--data_set_name", True, pattern)
    assert stats["invalid"] == {"bad_prompt": 1, "not_a_completion_list": 1, "counts_mismatch": 1,
                                "bad_ties_id": 3, "special_token_in_content": 1, "bad_subset": 2}
    assert kept["id"] == ["0", "ref:6"] and kept["num_correct"] == [1, 1]
    assert kept[0]["context"] == [{"role": "user", "content": "question 0"}]
    assert kept[0]["responses"] == ["right 0", "wrong 0", "no 0"]  # the correct completions first


def test_benchmark_is_detected_from_the_columns_and_checked(tmp_path):
    args = SimpleNamespace(benchmark=None, data_set_name=str(SAMPLE), split=None, skip_invalid=False,
                           prior_sets_path=None, tie_credit=0.0)
    benchmark, raw = evaluation.load_benchmark(args)
    assert benchmark == 2 and args.benchmark == 2 and len(raw) == 28
    v1 = str(REPO_ROOT / "assets" / "data" / "reward_bench_sample.jsonl")
    args = SimpleNamespace(benchmark=2, data_set_name=v1, split=None, skip_invalid=False, prior_sets_path=None,
                           tie_credit=0.0)
    with pytest.raises(UserError, match="has RewardBench 1's columns, not those of --benchmark 2"):
        evaluation.load_benchmark(args)
    args = SimpleNamespace(benchmark=None, data_set_name=str(SAMPLE), split=None, skip_invalid=False,
                           prior_sets_path=None, tie_credit=0.5)
    with pytest.raises(UserError, match="--tie_credit applies to RewardBench 1"):
        evaluation.load_benchmark(args)


def test_the_bundled_sample_has_all_six_subsets_and_paired_ties():
    rows = [json.loads(line) for line in open(SAMPLE)]
    subsets = {r["subset"] for r in rows}
    assert subsets == set(rb.V2_SUBSETS)
    ties = [r for r in rows if r["subset"] == "Ties"]
    refs = {r["id"].split(":")[1] for r in ties if r["id"].startswith("ref:")}
    tied = [r for r in ties if r["id"].startswith("tied:")]
    assert tied and all(r["id"].split(":")[1] in refs and r["num_correct"] >= 2 for r in tied)


def test_v2_record_and_json(tmp_path):
    results = rb.score_examples_v2(["0", "ref:0", "tied:0"], ["Math", "Ties", "Ties"],
                                   [[1, 0], [2, 1], [3, 3, 0]], [1, 1, 2])
    record, path = tmp_path / "rec.txt", tmp_path / "r.json"
    evaluation.write_results(results, "m", str(record), str(path))
    lines = record.read_text().splitlines()
    assert lines[0] == "m (RewardBench 2)" and "Factuality\tabsent" in lines and "Math\t100.0" in lines
    assert lines[-1] == "Score averages\tMath, Ties"
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == 2 and saved["model"] == "m"
    assert {"per_example", "subsets", "score", "ties", "model"} <= set(saved)


def test_pm_response_scores_are_mean_win_probabilities():
    scorer = PairPreferenceScorer.__new__(PairPreferenceScorer)
    table = {("a", "b"): 0.9, ("a", "c"): 0.6, ("b", "c"): 0.2, ("x", "y"): 0.3}

    def prob_first_preferred(contexts, first, second, progress=False):
        return {"mean": np.array([table[(f, s)] for f, s in zip(first, second)])}

    scorer.prob_first_preferred = prob_first_preferred
    scores = scorer.response_scores([[], []], [["a", "b", "c"], ["x", "y"]])
    assert scores[0] == pytest.approx([(0.9 + 0.6) / 2, (0.1 + 0.2) / 2, (0.4 + 0.8) / 2])
    assert scores[1] == pytest.approx([0.3, 0.7])  # two completions: P(first preferred) and its complement


def test_pm_repeated_completion_is_an_exact_tie_and_is_compared_once():
    """A completion repeated in a prompt's list gets exactly its copy's win rate (RewardBench 2 credits an exact tie
    1/k), and the copies are not compared with each other or a second time with the rest."""
    scorer = PairPreferenceScorer.__new__(PairPreferenceScorer)
    table = {("a", "b"): 0.9, ("a", "c"): 0.6, ("b", "c"): 0.2}
    asked = []

    def prob_first_preferred(contexts, first, second, progress=False):
        asked.extend(zip(first, second))
        return {"mean": np.array([table[(f, s)] for f, s in zip(first, second)])}

    scorer.prob_first_preferred = prob_first_preferred
    (scores,) = scorer.response_scores([[]], [["a", "b", "a", "c"]])
    assert sorted(asked) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert scores[0] == scores[2] == pytest.approx((0.9 + 0.5 + 0.6) / 3)  # against b, its copy, c
    assert scores[1] == pytest.approx((0.1 + 0.1 + 0.2) / 3) and scores[3] == pytest.approx((0.4 + 0.8 + 0.4) / 3)


def test_split_by_sizes_and_one_process_mapping():
    assert split_by_sizes([1, 2, 3, 4, 5, 6], [1, 3, 2]) == [[1], [2, 3, 4], [5, 6]]
    assert map_across_ranks(None, lambda items: [2 * x for x in items], [1, 2, 3]) == [2, 4, 6]


def test_a_repeated_sequence_is_scored_once_so_its_ties_are_exact():
    """RewardBench 2 credits a tie at the maximum 1/k by exact equality: a completion repeated among the rejected ones
    must get exactly its twin's score, whatever batch or rank each would land in."""
    from useful_code.scoring import once_each

    seen = []

    def score(sequences):
        seen.append([list(s) for s in sequences])
        return [sum(s) + 0.001 * len(seen[-1]) for s in sequences]  # depends on the batch, as float noise does

    out = once_each(score, [[1, 2], [3], [1, 2], [4], [3]])
    assert seen == [[[1, 2], [3], [4]]] and out[0] == out[2] and out[1] == out[4]
    assert once_each(score, [[5], [6]]) == [5.002, 6.002]  # nothing repeated: one call as given


def test_pm_with_nothing_to_compare_returns_nothing():
    """Every prompt of a rank's slice with one response: no comparison, no crash (the chat template refuses [])."""
    scorer = PairPreferenceScorer.__new__(PairPreferenceScorer)
    result = scorer.prob_first_preferred([], [], [])
    assert {k: v.shape for k, v in result.items()} == {"first_as_A": (0,), "first_as_B": (0,), "mean": (0,)}


def test_ties_gap_equal_to_the_spread_is_not_preferred():
    """reward-bench's process_single_model: the tied prompt is 'preferred' only when the gap between its worst
    correct and best incorrect answers is strictly above the correct answers' spread. Here tied:1's correct [3, 1]
    (spread 2) against incorrect [-1] (gap 2), and ref:1's gap 3 - 1 = 2: nothing is preferred."""
    ties = rb.ties_score(["ref:1", "tied:1"], [[3.0, 1.0], [3.0, 1.0, -1.0]], [1, 2])
    assert ties["correctness_preferred"] == ties["correctness_preferred_hard"] == ties["correctness_margin"] == 0.0
    assert ties["score"] == pytest.approx(0.6)


def test_a_subset_outside_reward_bench_2_is_reported_but_not_in_the_score():
    result = rb.score_examples_v2(["0", "1"], ["Math", "Extra"], [[1.0, 0.0], [0.0, 1.0]], [1, 1])
    assert result["subsets"]["Math"] == 100.0 and result["subsets"]["Extra"] == 0.0
    assert result["score"] == 100.0 and result["score_subsets"] == ["Math"]


def test_a_v2_file_without_count_columns_is_detected_as_reward_bench_2(tmp_path):
    path = tmp_path / "v2.jsonl"
    path.write_text(json.dumps({"id": "0", "prompt": "p", "chosen": ["a"], "rejected": ["b", "c"], "subset": "Math"})
                    + "\n")
    args = SimpleNamespace(benchmark=None, data_set_name=str(path), split=None, skip_invalid=False,
                           prior_sets_path=None, tie_credit=0.0)
    assert evaluation.load_benchmark(args)[0] == 2
