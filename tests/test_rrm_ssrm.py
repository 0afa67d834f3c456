"""RRM augmentation (pair-pm/RRM/rrm_augmentation.py) and SSRM pseudo-labelling (pair-pm/SSRM/pseudo_label.py,
conf_threshold.py): the augmented examples of three pairs written out by hand, counts, seeds and the PM-format input;
pseudo-label probabilities against PairPreferenceScorer called directly, the induced order, thresholds by hand, the
one path contract between the two SSRM scripts, and invalid rows as one line naming row and rule."""

import importlib
import json
import sys
from collections import Counter
from contextlib import redirect_stdout
from io import StringIO

import pytest

from helpers import ROOT, run, save_sharp_checkpoints
from useful_code.cli import UserError
from useful_code.defaults import DEFAULT_PREFERENCE_DATA
from useful_code.pm_data import build_pm_prompt, pairs_to_pm
from useful_code.pm_scoring import PairPreferenceScorer

RRM_DIR, SSRM_DIR = ROOT / "pair-pm" / "RRM", ROOT / "pair-pm" / "SSRM"
for script_dir in (RRM_DIR, SSRM_DIR):  # the scripts import their neighbours as a plain `python script.py` does
    if str(script_dir) not in sys.path:
        sys.path.insert(0, str(script_dir))
rrm = importlib.import_module("rrm_augmentation")
pseudo_label = importlib.import_module("pseudo_label")
conf_threshold = importlib.import_module("conf_threshold")

TOY_TEST = f"{DEFAULT_PREFERENCE_DATA}/test.jsonl"


def conversation(context: list[dict], response: str) -> list[dict]:
    return context + [{"role": "assistant", "content": response}]


# Three pairs with different prompts (one with a system message, one multi-turn): (context, chosen, rejected).
THREE = [
    ([{"role": "user", "content": "How do I boil an egg?"}], "Boil it for eight minutes.", "Eggs are round."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}], "Seven.", "Nine."),
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "What is the capital of France?"}], "Paris.", "Lyon, I think."),
]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def standard_rows(triples) -> list[dict]:
    return [{"chosen": conversation(c, w), "rejected": conversation(c, lo)} for c, w, lo in triples]


def call(main, *argv) -> str:
    """A script's main() in this process; returns what it printed."""
    printed = StringIO()
    with redirect_stdout(printed):
        main(list(argv))
    return printed.getvalue()


def augment(tmp_path, rows, *flags, name="out.jsonl") -> tuple[list[dict], str]:
    source = write_jsonl(tmp_path / f"in-{name}", rows) if isinstance(rows, list) else rows
    printed = call(rrm.main, "--input_dataset", source, "--output_dataset", str(tmp_path / name), *flags)
    return read_jsonl(tmp_path / name), printed


# ---------------------------------------------------------------------------------------------------------- RRM


def expected_meanings(triples) -> tuple[dict, Counter]:
    """Every prompt an augmented example of the three pairs may have, mapped to what it means (its kind, the example
    it augments, its responses) and the label it must carry in that order; and the Counter of meanings expected:
    the original, each own response over each of the 4 borrowed ones (8), and every pair of borrowed ones tying (6)."""
    lookup, expected = {}, Counter()

    def add(meaning, context, first, second, label_first, label_second):
        lookup[build_pm_prompt(context, first, second)] = (meaning, label_first)
        lookup[build_pm_prompt(context, second, first)] = (meaning, label_second)
        expected[meaning] += 1

    for i, (context, chosen, rejected) in enumerate(triples):
        borrowed = [r for j, (_, w, lo) in enumerate(triples) if j != i for r in (w, lo)]
        add(("original", i, chosen, rejected), context, chosen, rejected, "A", "B")
        for own in (chosen, rejected):
            for other in borrowed:
                add(("decisive", i, own, other), context, own, other, "A", "B")
        for a in range(4):
            for b in range(a + 1, 4):
                pair = tuple(sorted((borrowed[a], borrowed[b])))
                add(("same", i, *pair), context, borrowed[a], borrowed[b], "Same", "Same")
    return lookup, expected


def test_rrm_three_pairs_by_hand(tmp_path):
    out, printed = augment(tmp_path, standard_rows(THREE), "--seed", "3")
    lookup, expected = expected_meanings(THREE)
    seen = Counter()
    for example in out:
        user, assistant = example["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        meaning, label = lookup[user["content"]]  # a KeyError is a prompt that is none of the expected ones
        assert assistant["content"] == label, meaning
        seen[meaning] += 1
    assert seen == expected and len(out) == 3 * 15
    labels = Counter(e["messages"][1]["content"] for e in out)
    assert labels == {"A": 14, "B": 13, "Same": 18} or labels == {"A": 13, "B": 14, "Same": 18}
    assert "original: 3, decisive augmented: 24, 'Same' augmented: 18, augmented dropped: 0" in printed
    assert f"Wrote 45 PM examples to {tmp_path / 'out.jsonl'} (A: {labels['A']}, B: {labels['B']}, Same: 18)" in printed


def test_rrm_reads_pm_format_as_process_pair_data_writes_it(tmp_path):
    from datasets import Dataset

    from useful_code.formats import standardize_pairs

    pairs, _ = standardize_pairs(Dataset.from_list(standard_rows(THREE)), False, "test")
    pm_file = tmp_path / "pm.jsonl"
    pairs_to_pm(pairs, seed=5).to_json(str(pm_file), lines=True)
    from_pm, printed = augment(tmp_path, str(pm_file), "--seed", "3", name="from_pm.jsonl")
    from_pairs, _ = augment(tmp_path, standard_rows(THREE), "--seed", "3", name="from_pairs.jsonl")
    assert from_pm == from_pairs
    assert "(pm): 3 read, 0 invalid dropped" in printed


def test_rrm_seed_counts_and_options(tmp_path):
    rows = read_jsonl(TOY_TEST)[:40]
    first, printed = augment(tmp_path, rows, "--seed", "1", name="a.jsonl")
    again, _ = augment(tmp_path, rows, "--seed", "1", name="b.jsonl")
    other, _ = augment(tmp_path, rows, "--seed", "2", name="c.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first != other and sorted(map(json.dumps, first)) != sorted(map(json.dumps, other))
    labels = Counter(e["messages"][1]["content"] for e in first)
    dropped = 40 * 14 - (labels["A"] + labels["B"] - 40) - labels["Same"]
    assert abs(labels["A"] - labels["B"]) <= 1
    assert (f"original: 40, decisive augmented: {labels['A'] + labels['B'] - 40}, 'Same' augmented: "
            f"{labels['Same']}, augmented dropped: {dropped}") in printed

    decided, printed = augment(tmp_path, rows, "--seed", "1", "--include_same", "false", "--include_original",
                               "false", name="d.jsonl")
    assert Counter(e["messages"][1]["content"] for e in decided).keys() == {"A", "B"}
    assert len(decided) == labels["A"] + labels["B"] - 40
    assert "original: 0 (--include_original false)" in printed and "not written: --include_same false" in printed


def test_rrm_drops_borrowed_responses_to_the_same_prompt(tmp_path):
    # Pairs 0 and 1 share a prompt: their responses answer each other's prompt, so nothing borrowed between them is
    # labelled. For i = 0 (and likewise 1): 2 x 2 decisive examples against pair 1's responses, and 5 of the 6 ties
    # (all but pair 2's two responses) are dropped; pair 2 borrows from both freely.
    shared = THREE[0][0]
    triples = [THREE[0], (shared, "Put it in boiling water.", "Ask a chicken."), THREE[2]]
    out, printed = augment(tmp_path, standard_rows(triples))
    assert len(out) == 3 * 15 - 2 * (4 + 5)
    assert "augmented dropped: 18 (same prompt: 18, identical responses: 0)" in printed


def test_rrm_invalid_rows(tmp_path):
    rows = standard_rows(THREE)
    rows.insert(1, {"chosen": conversation(THREE[0][0], "Same."), "rejected": conversation(THREE[0][0], "Same.")})
    with pytest.raises(UserError, match=r"first: row 1 \(identical_responses\).*chosen and rejected must differ"):
        augment(tmp_path, rows)
    out, printed = augment(tmp_path, rows, "--skip_invalid", "true")
    assert len(out) == 45 and "4 read, 1 invalid dropped (identical_responses: 1)" in printed

    pm = [{"messages": [{"role": "user", "content": build_pm_prompt(c, w, lo)}, {"role": "assistant", "content": "A"}]}
          for c, w, lo in THREE]
    pm[2]["messages"][1]["content"] = "C"
    pm[0]["messages"][0]["content"] = "Which is better, A or B?"
    with pytest.raises(UserError, match=r"2 of 3 rows are invalid .*first: row 0 \(unparseable_prompt\), row 2 "
                                        r"\(bad_label\)"):
        augment(tmp_path, pm)
    with pytest.raises(UserError, match="needs at least 3"):
        augment(tmp_path, standard_rows(THREE[:2]))


def test_rrm_keeps_a_tie_a_tie(tmp_path):
    # PM-format input whose pair 0 is a "Same" tie (accepted by the PM rules): as upstream keeps it neutral, the
    # original is written as "Same", never as a win for either response; its responses still beat the borrowed ones.
    pm = [{"messages": [{"role": "user", "content": build_pm_prompt(c, w, lo)},
                        {"role": "assistant", "content": "Same" if i == 0 else "A"}]}
          for i, (c, w, lo) in enumerate(THREE)]
    out, printed = augment(tmp_path, pm, "--seed", "3")
    lookup, expected = expected_meanings(THREE)
    seen = Counter()
    for example in out:
        meaning, label = lookup[example["messages"][0]["content"]]
        seen[meaning] += 1
        if meaning[:2] == ("original", 0):
            assert example["messages"][1]["content"] == "Same"
        else:
            assert example["messages"][1]["content"] == label, meaning
    assert seen == expected
    assert "original: 3 (of which Same ties: 1), decisive augmented: 24, 'Same' augmented: 18" in printed
    assert "(A: 13, B: 13, Same: 19)" in printed

    decided, printed = augment(tmp_path, pm, "--seed", "3", "--include_same", "false", name="no_same.jsonl")
    assert ("original", 0, THREE[0][1], THREE[0][2]) not in Counter(
        lookup[e["messages"][0]["content"]][0] for e in decided)
    assert Counter(e["messages"][1]["content"] for e in decided).keys() == {"A", "B"} and len(decided) == 2 + 24


def test_rrm_output_directory_spelled_another_way_is_the_input(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    monkeypatch.chdir(tmp_path)
    DatasetDict({"train": Dataset.from_list(standard_rows(THREE))}).save_to_disk("std_dir")
    with pytest.raises(UserError, match=r"--output_dataset: \./std_dir is an input of this run \(std_dir\)"):
        call(rrm.main, "--input_dataset", "std_dir", "--output_dataset", "./std_dir")
    printed = call(rrm.main, "--input_dataset", "./std_dir", "--output_dataset", "rrm_dir")  # a new directory works
    assert (tmp_path / "rrm_dir" / "dataset_dict.json").exists() and "nothing was pushed" not in printed
    # upstream's --output_dataset was the hub repo it pushed to: written here as a directory, and said so
    printed = call(rrm.main, "--input_dataset", "./std_dir", "--output_dataset", "someone/rrm_out")
    assert (tmp_path / "someone" / "rrm_out" / "dataset_dict.json").exists()
    assert "note: nothing was pushed" in printed and "--push_to_hub someone/rrm_out" in printed


# --------------------------------------------------------------------------------------------------------- SSRM


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A BT and a PM checkpoint: the tiny model with sharpened random weights (helpers.save_sharp_checkpoints)."""
    out = tmp_path_factory.mktemp("ssrm")
    save_sharp_checkpoints(out, seed=1)
    return out


def label(checkpoints, data, *flags) -> str:
    return call(pseudo_label.main, "--reward_name_or_path", str(checkpoints / "pm"), "--dataset_path", str(data),
                "--bf16", "False", "--batch_size", "3", *flags)


def test_pseudo_labels_are_the_scorers_probabilities(checkpoints, tmp_path):
    rows = read_jsonl(TOY_TEST)[:8]
    data = write_jsonl(tmp_path / "unlabelled.jsonl", [{"id": i, **r} for i, r in enumerate(rows)])
    printed = label(checkpoints, data, "--output_path", str(tmp_path / "labels.jsonl"))
    out = read_jsonl(tmp_path / "labels.jsonl")

    scorer = PairPreferenceScorer.from_pretrained(str(checkpoints / "pm"), bf16=False, batch_size=3)
    p = scorer.prob_first_preferred([r["chosen"][:-1] for r in rows], [r["chosen"][-1]["content"] for r in rows],
                                    [r["rejected"][-1]["content"] for r in rows])["mean"]
    assert [r["id"] for r in out] == list(range(8))
    for row, source, p_first in zip(out, rows, p):
        assert row["swapped"] == bool(p_first < 0.5)
        # The induced order follows p > 0.5: the input's first response is chosen exactly when the PM prefers it.
        expected = (source["chosen"], source["rejected"]) if p_first > 0.5 else (source["rejected"], source["chosen"])
        assert (row["chosen"], row["rejected"]) == expected
        assert row["chosen_prob"] == pytest.approx(max(p_first, 1 - p_first), abs=1e-6)
    assert {r["swapped"] for r in out} == {True, False}, "pick pairs the PM orders both ways"
    n_swapped = sum(r["swapped"] for r in out)
    assert f"prefers the input's first response in {8 - n_swapped}, the second in {n_swapped}" in printed

    # The same pairs as a prompt and two responses label the same way.
    responses = [{"prompt": r["chosen"][:-1], "responses": [r["chosen"][-1]["content"], r["rejected"][-1]["content"]]}
                 for r in rows]
    label(checkpoints, write_jsonl(tmp_path / "responses.jsonl", responses), "--output_path",
          str(tmp_path / "labels2.jsonl"))
    again = read_jsonl(tmp_path / "labels2.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in again] == [(r["chosen"], r["rejected"]) for r in out]
    assert [r["chosen_prob"] for r in again] == pytest.approx([r["chosen_prob"] for r in out], abs=1e-6)


def test_pseudo_label_token_budget_reaches_the_scorer(checkpoints, tmp_path, monkeypatch):
    """--max_tokens_per_batch 0 (padded batches of --batch_size) is the scorer's setting, with the packed run's
    labels."""
    rows = read_jsonl(TOY_TEST)[:8]
    data = write_jsonl(tmp_path / "unlabelled.jsonl", rows)
    label(checkpoints, data, "--output_path", str(tmp_path / "packed.jsonl"))
    budgets, init = [], PairPreferenceScorer.__init__

    def recording_init(self, *args, **kwargs):
        budgets.append(kwargs["max_tokens_per_batch"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(PairPreferenceScorer, "__init__", recording_init)
    label(checkpoints, data, "--output_path", str(tmp_path / "padded.jsonl"), "--max_tokens_per_batch", "0")
    assert budgets == [0]
    packed, padded = read_jsonl(tmp_path / "packed.jsonl"), read_jsonl(tmp_path / "padded.jsonl")
    assert [r["swapped"] for r in padded] == [r["swapped"] for r in packed]
    assert [r["chosen_prob"] for r in padded] == pytest.approx([r["chosen_prob"] for r in packed], abs=1e-5)


def test_default_paths_chain_the_two_scripts(checkpoints, tmp_path, monkeypatch):
    # One path contract: conf_threshold.py reads, by default, what pseudo_label.py writes by default.
    defaults = pseudo_label.ScriptArguments(reward_name_or_path="pm")
    assert conf_threshold.ScriptArguments().data_name == defaults.data_name
    assert pseudo_label.pred_probs_path(defaults.data_name) == "outputs/ssrm/ssrm-pred-probs.jsonl"
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "unlabelled.jsonl", read_jsonl(TOY_TEST)[:6])
    label(checkpoints, data, "--data_name", "toy")
    printed = call(conf_threshold.main, "--data_name", "toy", "--conf_threshold", "0.5")
    labelled = read_jsonl(tmp_path / "outputs/ssrm/toy-pred-probs.jsonl")
    kept = read_jsonl(tmp_path / "outputs/ssrm/toy-selected.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in kept] == [(r["chosen"], r["rejected"]) for r in labelled]
    assert ("kept 6 (100.00% of 6), dropped 0 not above the threshold; chosen/rejected swapped to the PM's "
            "preference: 0") in printed
    with pytest.raises(UserError, match="run pair-pm/SSRM/pseudo_label.py --data_name other first"):
        call(conf_threshold.main, "--data_name", "other")


def test_thresholds_by_hand(tmp_path):
    context = [{"role": "user", "content": "Pick a colour."}]
    probs = [0.9, 0.55, 0.2, 0.25, 0.5]
    rows = [{"chosen": conversation(context, f"first {i}"), "rejected": conversation(context, f"second {i}"),
             "chosen_prob": p} for i, p in enumerate(probs)]
    source = write_jsonl(tmp_path / "labels.jsonl", rows)
    printed = call(conf_threshold.main, "--input_path", source, "--output_path", str(tmp_path / "kept.jsonl"),
                   "--conf_threshold", "0.75")
    kept = read_jsonl(tmp_path / "kept.jsonl")
    # 0.9 keeps its order; 0.2 (confidence 0.8) is kept the other way round; 0.25 (confidence exactly the threshold
    # 0.75) is dropped, as upstream keeps confidence > threshold only.
    assert [(r["chosen"][-1]["content"], r["rejected"][-1]["content"], r["chosen_prob"]) for r in kept] == [
        ("first 0", "second 0", 0.9), ("second 2", "first 2", 0.8)]
    assert "Confidence threshold: 0.75" in printed
    assert "5 read, 0 invalid dropped; kept 2 (40.00% of 5), dropped 3 not above the threshold; chosen/rejected " \
           "swapped to the PM's preference: 1" in printed


def test_outputs_and_flags_checked_before_any_work(checkpoints, tmp_path):
    source = write_jsonl(tmp_path / "labels.jsonl", [])
    with pytest.raises(UserError, match="--conf_threshold must be at least 0.5, got 0.4"):
        call(conf_threshold.main, "--input_path", source, "--conf_threshold", "0.4")
    with pytest.raises(UserError, match="is an input of this run"):
        call(conf_threshold.main, "--input_path", source, "--output_path", source)
    with pytest.raises(UserError, match="must be a .jsonl file"):
        label(checkpoints, TOY_TEST, "--output_path", str(tmp_path / "labels.txt"))
    with pytest.raises(UserError, match="must be a .jsonl file"):  # the deepspeed launcher's flag is taken
        label(checkpoints, TOY_TEST, "--output_path", str(tmp_path / "labels.txt"), "--local_rank=0")
    with pytest.raises(UserError, match="is not a pairwise preference model"):
        call(pseudo_label.main, "--reward_name_or_path", str(checkpoints / "bt"), "--output_path",
             str(tmp_path / "x.jsonl"))
    (tmp_path / "plain").write_text("not a directory")
    with pytest.raises(UserError, match="--output_dataset: .*plain is a file; a path without .json/.jsonl/.parquet"):
        augment(tmp_path, standard_rows(THREE), name="plain")


def test_invalid_row_is_one_line_naming_row_and_rule(tmp_path):
    context = [{"role": "user", "content": "Pick a colour."}]
    rows = [{"chosen": conversation(context, "Red."), "rejected": conversation(context, "Blue."), "chosen_prob": p}
            for p in (0.9, 1.5)]
    source = write_jsonl(tmp_path / "labels.jsonl", rows)
    proc = run([sys.executable, str(SSRM_DIR / "conf_threshold.py"), "--input_path", source, "--output_path",
                str(tmp_path / "kept.jsonl")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: pseudo labels: 1 of 2 rows are invalid (bad_prob: 1); first: row 1 (bad_prob) (0-based). "
                      "Rules: bad_prob: chosen_prob must be a number between 0 and 1. Fix the data, or pass "
                      "--skip_invalid to drop them with a count."]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "kept.jsonl").exists()


def test_upstream_shard_flags_label_slices_that_conf_threshold_gathers(checkpoints, tmp_path, monkeypatch):
    # Upstream's --n_shards/--shard_idx (0-based; datasets' contiguous shards) and --n_gpu (no GPU here: a note).
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "unlabelled.jsonl", [{"id": i, **r} for i, r in enumerate(read_jsonl(TOY_TEST)[:7])])
    label(checkpoints, data, "--data_name", "whole")
    for shard in (2, 0, 1):
        printed = label(checkpoints, data, "--data_name", "toy", "--n_shards", "3", "--shard_idx", str(shard),
                        "--n_gpu", "2")
        ids = [[0, 1, 2], [3, 4], [5, 6]][shard]
        assert f"shard {shard} of 3 (0-based), labelled: {len(ids)};" in printed
        assert "Note: --n_gpu 2 is ignored (this machine has no GPU)" in printed
        rows = read_jsonl(tmp_path / f"outputs/ssrm/toy-pred-probs-shard-{shard + 1}-of-3.jsonl")
        assert [r["id"] for r in rows] == ids
    whole = {r["id"]: r for r in read_jsonl(tmp_path / "outputs/ssrm/whole-pred-probs.jsonl")}
    printed = call(conf_threshold.main, "--data_name", "toy", "--conf_threshold", "0.5")
    kept = read_jsonl(tmp_path / "outputs/ssrm/toy-selected.jsonl")
    assert [r["id"] for r in kept] == list(range(7))  # the shards in order, as upstream concatenates them
    for row in kept:
        assert (row["chosen"], row["rejected"]) == (whole[row["id"]]["chosen"], whole[row["id"]]["rejected"])
        assert row["chosen_prob"] == pytest.approx(whole[row["id"]]["chosen_prob"], abs=1e-6)
    assert "3 shards (outputs/ssrm/toy-pred-probs-shard-1-of-3.jsonl ...): 7 read" in printed

    (tmp_path / "outputs/ssrm/toy-pred-probs-shard-2-of-3.jsonl").unlink()
    with pytest.raises(UserError, match=r"shards \[2\] of 3 \(1-based, as in the file names\) of --data_name toy are "
                                        r"missing; run pair-pm/SSRM/pseudo_label.py --n_shards 3 --shard_idx 1"):
        call(conf_threshold.main, "--data_name", "toy")
    with pytest.raises(UserError, match="--shard_idx must be below --n_shards=3 \\(0-based\\), got 3"):
        label(checkpoints, data, "--n_shards", "3", "--shard_idx", "3")
    with pytest.raises(UserError, match="--n_shards must be at least 1, got 0"):
        label(checkpoints, data, "--n_shards", "0")
