"""Hand-computed checks of the RewardBench scoring arithmetic."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from useful_code import evaluation
from useful_code import reward_bench as rb
from useful_code.cli import UserError


def test_constants_match_reward_bench():
    assert rb.SECTIONS == ("Chat", "Chat Hard", "Safety", "Reasoning")
    assert rb.EXAMPLE_COUNTS["xstest-should-refuse"] == 154
    assert rb.EXAMPLE_COUNTS["xstest-should-respond"] == 250
    assert rb.EXAMPLE_COUNTS["math-prm"] == 984
    per_section = {sec: sum(rb.EXAMPLE_COUNTS[s] for s in rb.SUBSET_MAPPING[sec]) for sec in rb.SECTIONS}
    assert per_section == {
        "Chat": 100 + 95 + 95 + 28 + 40,  # 358
        "Chat Hard": 37 + 100 + 134 + 92 + 47 + 46,  # 456
        "Safety": 100 + 100 + 154 + 250 + 136,  # 740
        "Reasoning": 984 + 6 * 164,  # 1968
    }
    mapped = [s for sec in rb.SECTIONS for s in rb.SUBSET_MAPPING[sec]]
    assert sorted(mapped) == sorted(rb.EXAMPLE_COUNTS)
    assert rb.LEADERBOARD_WEIGHTS == {"Chat": 2, "Chat Hard": 2, "Safety": 2, "Reasoning": 2, "Prior Sets": 1}
    assert rb.PRIOR_SETS_SUBSETS == ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")


def test_example_correct_ties():
    assert rb.example_correct(1.0, 0.5) == 1.0
    assert rb.example_correct(0.5, 1.0) == 0.0
    assert rb.example_correct(0.5, 0.5) == 0.0
    assert rb.example_correct(0.5, 0.5, tie_credit=0.5) == 0.5


def test_chat_section_weighted_by_counts():
    sections = rb.section_scores({"alpacaeval-easy": 1.0, "alpacaeval-length": 0.5})
    expected = (1.0 * 100 + 0.5 * 95) / (100 + 95) * 100  # 75.64
    assert sections["Chat"] == pytest.approx(expected) and round(expected, 2) == 75.64
    # Sections with no subset present are absent (None), not 0.
    assert sections["Chat Hard"] is None
    assert sections["Safety"] is None
    assert sections["Reasoning"] is None


def test_xstest_weights_not_swapped():
    sections = rb.section_scores({"xstest-should-refuse": 1.0, "xstest-should-respond": 0.0})
    assert round(sections["Safety"], 2) == 38.12  # 154 / (154 + 250)
    # Upstream RLHFlow's swapped counts would give 250/404 = 61.88.
    assert round(sections["Safety"], 2) != round(250 / 404 * 100, 2)


def test_reasoning_math_weight_equals_all_code():
    hep = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]
    assert rb.EXAMPLE_COUNTS["math-prm"] == sum(rb.EXAMPLE_COUNTS[h] for h in hep)
    acc = {"math-prm": 1.0, **{h: 0.0 for h in hep}}
    assert rb.section_scores(acc)["Reasoning"] == 50.0
    acc = {"math-prm": 0.2, **{h: 0.6 for h in hep}}
    assert rb.section_scores(acc)["Reasoning"] == pytest.approx(40.0)


def test_subset_accuracies_order_and_values():
    acc = rb.subset_accuracies(
        ["zzz", "hep-go", "alpacaeval-easy", "alpacaeval-easy", "aaa"],
        [1.0, 0.0, 1.0, 0.0, 0.5],
    )
    assert list(acc) == ["alpacaeval-easy", "hep-go", "aaa", "zzz"]
    assert acc == {"alpacaeval-easy": 0.5, "hep-go": 0.0, "aaa": 0.5, "zzz": 1.0}


def test_prior_sets_nanmean_over_present_only():
    assert rb.prior_sets_score({}) is None
    assert rb.prior_sets_score({"other": 1.0}) is None
    score = rb.prior_sets_score({"anthropic_helpful": 0.6, "shp": 0.8, "unrelated": 0.0})
    assert score == pytest.approx((0.6 + 0.8) / 2 * 100)
    score = rb.prior_sets_score({"anthropic_hhh": float("nan"), "summarize": 0.5})
    assert score == pytest.approx(50.0)


def test_the_score_averages_unrounded_sections_as_reward_bench_does():
    # Sections 40, 27.027..., 44.117..., 56.707...: their mean is 41.963 (41.96); the mean of the sections rounded
    # to 2 decimals first would be 41.965 (shown as 41.97).
    acc = {"alpacaeval-easy": 0.40, "mt-bench-hard": 10 / 37, "donotanswer": 60 / 136, "hep-cpp": 93 / 164}
    sections = rb.section_scores(acc)
    assert sections["Chat Hard"] == pytest.approx(100 * 10 / 37, abs=1e-12)
    expected = (40 + 100 * 10 / 37 + 100 * 60 / 136 + 100 * 93 / 164) / 4
    assert rb.overall_score(sections) == pytest.approx(expected, abs=1e-12) and f"{expected:.2f}" == "41.96"
    assert round(sum(round(v, 2) for v in sections.values()) / 4, 2) == 41.97  # the rounding this avoids


def test_overall_and_leaderboard_weighting():
    sections = {"Chat": 90.0, "Chat Hard": 60.0, "Safety": 80.0, "Reasoning": 70.0}
    assert rb.overall_score(sections) == (90 + 60 + 80 + 70) / 4 == 75.0
    expected = (2 * 90 + 2 * 60 + 2 * 80 + 2 * 70 + 1 * 50) / 9  # 72.22
    assert rb.overall_score(sections, 50.0) == pytest.approx(expected)
    assert rb.overall_score(sections, None) == 75.0


def _small_bench():
    ids = [0, 1, 2, 3, 4]
    subsets = ["alpacaeval-easy", "alpacaeval-easy", "alpacaeval-length", "alpacaeval-length", "mystery"]
    chosen = np.array([2.0, 1.0, 3.0, 0.0, 1.0], dtype=np.float32)
    rejected = np.array([1.0, 1.0, 1.0, 4.0, 0.0], dtype=np.float32)
    return ids, subsets, chosen, rejected


def test_score_examples_ties_default_and_half_credit():
    ids, subsets, chosen, rejected = _small_bench()
    res = rb.score_examples(ids, subsets, chosen, rejected)
    assert res["ties"] == 1
    assert res["num_examples"] == 5
    assert res["tie_credit"] == 0.0
    # easy: [1, 0 (tie)] -> 0.5; length: [1, 0] -> 0.5
    assert res["subsets"]["alpacaeval-easy"] == 0.5
    assert res["subsets"]["alpacaeval-length"] == 0.5
    assert res["sections"]["Chat"] == 50.0
    assert res["score"] == 50.0 and res["score_sections"] == ["Chat"]  # absent sections are not averaged as 0
    assert res["unknown_subsets"] == ["mystery"]
    assert "alpacaeval-easy" not in res["missing_subsets"]
    assert "alpacaeval-hard" in res["missing_subsets"]
    assert len(res["missing_subsets"]) == len(rb.EXAMPLE_COUNTS) - 2

    half = rb.score_examples(ids, subsets, chosen, rejected, tie_credit=0.5)
    assert half["ties"] == 1
    assert half["subsets"]["alpacaeval-easy"] == 0.75
    assert half["sections"]["Chat"] == pytest.approx((0.75 * 100 + 0.5 * 95) / (100 + 95) * 100)  # 62.82
    assert half["per_example"][1]["correct"] == 0.5


def test_score_examples_keys_and_json_serializable():
    ids, subsets, chosen, rejected = _small_bench()
    res = rb.score_examples(np.arange(5), subsets, chosen, rejected)
    assert set(res) == {
        "benchmark", "per_example", "subsets", "sections", "score", "ties",
        "num_examples", "tie_credit", "missing_subsets", "unknown_subsets", "score_sections",
    }
    assert set(res["sections"]) == set(rb.SECTIONS)
    assert set(res["per_example"][0]) == {"id", "subset", "chosen_reward", "rejected_reward", "correct"}
    assert type(res["per_example"][0]["chosen_reward"]) is float
    json.dumps(res)


def test_score_examples_with_prior_sets():
    ids, subsets, chosen, rejected = _small_bench()
    prior = (
        ["p0", "p1", "p2", "p3"],
        ["anthropic_helpful", "anthropic_helpful", "shp", "shp"],
        [1.0, 0.0, 1.0, 1.0],
        [0.0, 1.0, 0.0, 0.0],
    )
    res = rb.score_examples(ids, subsets, chosen, rejected, prior=prior)
    assert set(res) >= {"prior_sets", "leaderboard_score"}
    assert set(res["prior_sets"]) == {"subsets", "score", "per_example"}
    assert res["prior_sets"]["subsets"] == {"anthropic_helpful": 0.5, "shp": 1.0}
    assert res["prior_sets"]["score"] == pytest.approx(75.0)
    assert res["leaderboard_score"] == pytest.approx((2 * 50.0 + 1 * 75.0) / 3)  # Chat and Prior Sets only
    json.dumps(res)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        rb.score_examples([0, 1], ["a", "b"], [1.0], [0.0, 1.0])
    with pytest.raises(ValueError):
        rb.score_examples([0], ["a"], [1.0], [0.0], prior=(["p"], ["shp"], [1.0, 2.0], [0.0]))
    with pytest.raises(ValueError):
        rb.subset_accuracies(["a", "b"], [1.0])


def test_write_results_appends_and_writes_json(tmp_path):
    ids, subsets, chosen, rejected = _small_bench()
    res = rb.score_examples(ids, subsets, chosen, rejected)
    record = tmp_path / "nested" / "record.txt"
    out_json = tmp_path / "other" / "res.json"
    evaluation.write_results(res, "model-a", str(record), str(out_json))
    evaluation.write_results(res, "model-b", str(record), str(out_json))
    lines = record.read_text().splitlines()
    block = ["Chat\t50.0", "Chat Hard\tabsent", "Safety\tabsent", "Reasoning\tabsent", "Score\t50.0",
             "Score averages\tChat"]
    assert lines == ["model-a", *block, "model-b", *block]
    data = json.loads(out_json.read_text())
    assert data["model"] == "model-b"
    assert set(data) == set(res) | {"model"}


def test_the_record_is_appended_only_once_the_json_is_written(tmp_path):
    """A run that dies writing the JSON (here: a value strict JSON refuses) leaves no record line claiming it, and
    the staged file that a killed write left (its PID gone) is cleared by the next write."""
    ids, subsets, chosen, rejected = _small_bench()
    res = rb.score_examples(ids, subsets, chosen, rejected)
    record, out_json = tmp_path / "record.txt", tmp_path / "res.json"
    with pytest.raises(ValueError):
        evaluation.write_results({**res, "bad": float("nan")}, "model-a", str(record), str(out_json))
    assert not record.exists() and not out_json.exists()
    left = tmp_path / ".res.json.tmp-999999999"  # a killed write's, by a PID that is gone
    left.write_text("{")
    evaluation.write_results(res, "model-a", str(record), str(out_json))
    assert record.read_text().splitlines()[0] == "model-a" and json.loads(out_json.read_text())["model"] == "model-a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.txt", "res.json"]


def test_write_results_prior_sets_line(tmp_path):
    ids, subsets, chosen, rejected = _small_bench()
    prior = (["p0"], ["shp"], [1.0], [0.0])
    res = rb.score_examples(ids, subsets, chosen, rejected, prior=prior)
    record = tmp_path / "record.txt"
    evaluation.write_results(res, "m", str(record), str(tmp_path / "r.json"))
    lines = record.read_text().splitlines()
    assert lines[-3:] == ["Prior Sets\t100.0", "Score\t50.0", "Score averages\tChat"]


def test_the_record_rounds_to_two_decimals_and_the_json_keeps_every_digit(tmp_path):
    res = rb.score_examples([0, 1, 2], ["mt-bench-hard"] * 3, [1.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    record, path = tmp_path / "record.txt", tmp_path / "r.json"
    evaluation.write_results(res, "m", str(record), str(path))
    assert "Chat Hard\t66.67" in record.read_text().splitlines()
    assert json.loads(path.read_text())["sections"]["Chat Hard"] == pytest.approx(200 / 3, abs=1e-12)


def test_default_results_json_names_rewardbench_2_apart():
    """The README's v1 and v2 commands share --record_dir: each benchmark keeps its own results JSON."""
    v1 = evaluation.default_results_json("runs/bench.txt", "org/model", 1)
    v2 = evaluation.default_results_json("runs/bench.txt", "org/model", 2)
    assert (v1, v2) == ("runs/bench_org_model.json", "runs/bench_org_model_v2.json")


def test_prior_sets_are_read_as_reward_bench_reads_them(tmp_path):
    """allenai/preference-test-sets: one split per set, each with a 'subset' column of its own and ids that restart
    at 0. The split name is the subset, ids are made unique, and the retired pku splits are left out."""
    from datasets import Dataset, DatasetDict

    def split(subset_values):
        return Dataset.from_list([{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "subset": v, "id": i}
                                  for i, v in enumerate(subset_values)])

    DatasetDict({"anthropic_hhh": split(["harmless", "honest"]), "shp": split(["askscience"]),
                 "pku_safer": split(["pku"])}).save_to_disk(str(tmp_path / "prior"))
    dataset, stats = evaluation.load_examples(str(tmp_path / "prior"), None, "--prior_sets_path", False)
    assert dataset["subset"] == ["anthropic_hhh", "anthropic_hhh", "shp"]
    assert dataset["id"] == ["anthropic_hhh:0", "anthropic_hhh:1", "shp:0"]
    # One file with a subset column is read as it is.
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "subset": s, "id": i})
                             for i, s in enumerate(["shp", "summarize"])))
    assert evaluation.load_examples(str(one), None, "--prior_sets_path", False)[0]["subset"] == ["shp", "summarize"]


def test_duplicate_ids_are_refused_before_scoring(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "subset": "shp", "id": 7})
                              for _ in range(2)))
    with pytest.raises(UserError, match="1 example ids occur more than once"):
        evaluation.load_examples(str(path), None, "--data_set_name", False)


def test_a_pair_with_the_same_response_twice_is_scored_not_refused(tmp_path):
    """reward-bench scores every row, and a pair whose two responses are the same is a tie (counted wrong): the
    training rule that refuses such a pair must not shrink a benchmark's denominators."""
    path = tmp_path / "same.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": r, "subset": "shp", "id": i} for i, r in enumerate("ab")]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kept, stats = evaluation.load_examples(str(path), None, "--data_set_name", False)
    assert kept["id"] == [0, 1] and stats["used"] == 2 and stats["invalid"] == {}
    assert kept[0]["chosen"] == kept[0]["rejected"]


def test_a_row_without_a_subset_name_is_named_or_dropped(tmp_path):
    """A null or blank subset would be scored under "None": a row error, or a counted drop with --skip_invalid."""
    path = tmp_path / "subsets.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "subset": s, "id": i}
            for i, s in enumerate(["shp", None, " ", "shp"])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match=r"2 of 4 rows are invalid \(bad_subset: 2\); first: row 1 \(bad_subset\), "
                                        r"row 2 \(bad_subset\)"):
        evaluation.load_examples(str(path), None, "--data_set_name", False)
    kept, stats = evaluation.load_examples(str(path), None, "--data_set_name", True)
    assert kept["id"] == [0, 3] and stats["read"] == 4 and stats["invalid"] == {"bad_subset": 2}


def test_all_four_sections_present_record_has_no_averages_line(tmp_path):
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm"]
    res = rb.score_examples([0, 1, 2, 3], subsets, [1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0])
    assert res["sections"] == {"Chat": 100.0, "Chat Hard": 0.0, "Safety": 100.0, "Reasoning": 100.0}
    assert res["score"] == 75.0 and res["score_sections"] == list(rb.SECTIONS)
    record = tmp_path / "record.txt"
    evaluation.write_results(res, "m", str(record), str(tmp_path / "r.json"))
    assert record.read_text().splitlines()[-1] == "Score\t75.0"


def test_only_unknown_subsets_give_no_score():
    res = rb.score_examples([0], ["mystery"], [1.0], [0.0])
    assert res["score"] is None and res["score_sections"] == []
    assert re.search(r"^Score +absent  \(mean of nothing\)$", rb.format_report(res), re.M)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_an_error_naming_the_ids(bad):
    with pytest.raises(UserError, match=r"NaN or infinite rewards for 2 examples \(ids: b, d\)"):
        rb.score_examples(["a", "b", "c", "d"], ["shp"] * 4, [1.0, bad, 0.0, 1.0], [0.0, 0.0, 1.0, bad])


def test_duplicate_ids_are_an_error():
    with pytest.raises(UserError, match="2 example ids occur more than once .first: 3, 7."):
        rb.score_examples([3, 7, 3, 7, 1], ["shp"] * 5, [1.0] * 5, [0.0] * 5)


@pytest.mark.parametrize("credit", [-0.1, 1.5, 7])
def test_tie_credit_outside_0_1_is_an_error(credit):
    with pytest.raises(UserError, match="--tie_credit must be between 0 and 1"):
        rb.score_examples([0], ["shp"], [1.0], [1.0], tie_credit=credit)


def test_format_report_mentions_everything():
    ids, subsets, chosen, rejected = _small_bench()
    res = rb.score_examples(ids, subsets, chosen, rejected, prior=(["p0"], ["shp"], [1.0], [0.0]))
    report = rb.format_report(res)
    for needle in ["alpacaeval-easy", "Chat Hard", "Reasoning", "Score", "ties: 1", "Prior Sets", "Leaderboard"]:
        assert needle in report


def test_default_results_json():
    path = evaluation.default_results_json("results/bench_record.txt", "RLHFlow/ArmoRM Llama3-8B_v0.1")
    assert path == "results/bench_record_RLHFlow_ArmoRM_Llama3-8B_v0.1.json"
    assert evaluation.default_results_json("rec.txt", "/models/x/") == "rec_models_x.json"


def test_eval_outputs_are_checked_before_scoring(tmp_path):
    args = evaluation.EvalArguments(data_set_name=str(tmp_path / "data.jsonl"), reward_name_or_path="m",
                                    record_dir=str(tmp_path / "rec" / "r.txt"))
    one_process = SimpleNamespace(num_processes=1)
    evaluation.check_eval_arguments(args, one_process)
    assert (tmp_path / "rec").is_dir() and not (tmp_path / "rec" / "r.txt").exists()  # nothing written yet
    args.results_json = str(tmp_path)
    with pytest.raises(UserError, match="--results_json: .* is a directory"):
        evaluation.check_eval_arguments(args, one_process)
    args.results_json, args.record_dir = None, args.data_set_name
    with pytest.raises(UserError, match="--record_dir: .* is an input of this run"):
        evaluation.check_eval_arguments(args, one_process)
    (tmp_path / "file").write_text("")
    args.record_dir = str(tmp_path / "file" / "r.txt")
    with pytest.raises(UserError, match="--record_dir: cannot create"):
        evaluation.check_eval_arguments(args, one_process)
    args.record_dir, args.device_map = str(tmp_path / "rec" / "r.txt"), "auto"
    evaluation.check_eval_arguments(args, one_process)
    with pytest.raises(UserError, match="--device_map auto spreads one model .* without a launcher"):
        evaluation.check_eval_arguments(args, SimpleNamespace(num_processes=2))
    # Results written into the model's directory replaced its weights or config; one file for both wiped the records.
    args.device_map, args.reward_name_or_path = None, str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    args.results_json = str(tmp_path / "model" / "model.safetensors")
    with pytest.raises(UserError, match=f"--results_json: .*model.safetensors is inside {tmp_path / 'model'}, an "
                                        "input of this run; write it elsewhere"):
        evaluation.check_eval_arguments(args, one_process)
    args.results_json = args.record_dir
    with pytest.raises(UserError, match="--results_json and --record_dir are one file .*: the JSON would replace the "
                                        "records; give two"):
        evaluation.check_eval_arguments(args, one_process)
    args.results_json = str(tmp_path / "rec" / "r.json")
    evaluation.check_eval_arguments(args, one_process)


@pytest.mark.parametrize("temperature, rule", [("0", "be above 0"), ("-1", "be above 0"),
                                               ("nan", "be a finite number")])
def test_pm_eval_temperature_must_be_above_zero(temperature, rule):
    """0 divides the A/B logits by zero; a negative temperature turns every preference around and still scores."""
    from useful_code.cli import parse_args
    from useful_code.eval_reward_bench_pm import ScriptArguments

    with pytest.raises(UserError, match=f"^--temperature must {rule}, got {float(temperature)}$"):
        parse_args((ScriptArguments,), argv=["--temperature", temperature])


def test_a_failed_results_write_leaves_the_old_file_and_no_staged_one(tmp_path):
    from useful_code.output_files import atomic_write_text

    path = tmp_path / "r.json"
    atomic_write_text(path, "old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new \ud800")  # a lone surrogate cannot be written as UTF-8
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
