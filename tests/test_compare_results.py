"""useful_code/compare_results.py on small hand-made results JSON files (no model, no eval run)."""

import json
import sys

import pytest

from helpers import ROOT, run
from useful_code.cli import UserError
from useful_code.compare_results import main

SCRIPT = str(ROOT / "useful_code/compare_results.py")


def v1_results(model="outputs/a/last_checkpoint", flip=(), extra=False, benchmark_key=True):
    """Three v1 examples (ids 0-2); `flip` ids get the opposite `correct`; `extra` adds id 9 (math-prm)."""
    rows = [{"id": 0, "subset": "alpacaeval-easy", "chosen_reward": 1.2, "rejected_reward": -0.3, "correct": 1.0},
            {"id": 1, "subset": "alpacaeval-easy", "chosen_reward": 0.2, "rejected_reward": 0.4, "correct": 0.0},
            {"id": 2, "subset": "refusals-dangerous", "chosen_reward": 0.9, "rejected_reward": 0.1, "correct": 1.0}]
    for row in rows:
        if row["id"] in flip:
            row["correct"] = 1.0 - row["correct"]
    if extra:
        rows.append({"id": 9, "subset": "math-prm", "chosen_reward": 1.0, "rejected_reward": 0.0, "correct": 1.0})
    results = {"model": model, "per_example": rows,
               "subsets": {"alpacaeval-easy": 0.5, "refusals-dangerous": 1.0, **({"math-prm": 1.0} if extra else {})},
               "sections": {"Chat": 50.0, "Chat Hard": None, "Safety": 100.0, "Reasoning": 100.0 if extra else None},
               "score": 75.0 if not extra else 83.33, "score_sections": ["Chat", "Safety"]}
    return {"benchmark": 1, **results} if benchmark_key else results


def v2_results(model="m2", math_scores=(1.0, 0.2, 0.3, 0.9)):
    rows = [{"id": "ref:3", "subset": "Ties", "scores": [0.1, 0.5, -0.2], "num_correct": 2, "credit": None},
            {"id": 17, "subset": "Math", "scores": list(math_scores), "num_correct": 1, "credit": 1.0},
            {"id": 18, "subset": "Focus", "scores": [0.5, 0.5, 0.1, 0.0], "num_correct": 1, "credit": 0.0}]
    return {"benchmark": 2, "model": model, "per_example": rows,
            "subsets": {"Factuality": 50.0, "Precise IF": None, "Math": 75.0, "Focus": 40.0, "Ties": 33.1},
            "score": 47.2, "score_subsets": ["Factuality", "Math", "Focus", "Ties"]}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def table_row(out, label):
    """The cells of the table row whose label is `label` (labels may hold spaces, cells do not)."""
    line = next(line for line in out.splitlines() if line.startswith(label + "  "))
    return line[len(label):].split()


def test_v1_table_on_a_0_100_scale(tmp_path, capsys):
    a = write(tmp_path, "a.json", v1_results())
    b = write(tmp_path, "b.json", {**v1_results("outputs/b/last_checkpoint", extra=True),
                                   "prior_sets": {"score": 61.5}, "leaderboard_score": 70.25})
    main([a, b])
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header == ["outputs/a/last_checkpoint", "outputs/b/last_checkpoint"]
    assert table_row(out, "alpacaeval-easy") == ["50.00", "50.00"]  # 0.5 accuracy shown as 50.00
    assert table_row(out, "math-prm") == ["absent", "100.00"]  # subset of the second file only, after the first's
    assert table_row(out, "Chat Hard") == ["absent", "absent"]
    assert table_row(out, "Reasoning") == ["absent", "100.00"]
    assert table_row(out, "Score") == ["75.00", "83.33"]
    assert table_row(out, "Prior Sets") == ["absent", "61.50"]
    assert table_row(out, "Leaderboard Score") == ["absent", "70.25"]
    labels = [line.split("  ")[0] for line in out.splitlines()[2:9]]
    assert labels == ["alpacaeval-easy", "refusals-dangerous", "math-prm", "-" * len(labels[3]), "Chat", "Chat Hard",
                      "Safety"]


def test_v1_differences_and_ids_in_one_file(tmp_path, capsys):
    a = write(tmp_path, "a.json", v1_results(benchmark_key=False))  # older files have no "benchmark": v1
    b = write(tmp_path, "b.json", v1_results("outputs/b/last_checkpoint", flip=(2,), extra=True))
    main([a, b])
    out = capsys.readouterr().out
    assert "Decisions differ on 1 of 3 examples in both" in out
    listed = [line for line in out.splitlines() if line.startswith("  id ")]
    assert len(listed) == 1 and listed[0].startswith("  id 2 [refusals-dangerous]")
    assert "correct=1 (chosen 0.900, rejected 0.100)" in listed[0] and "correct=0 (chosen" in listed[0]
    assert "Ids in one file only: 0 only in outputs/a/last_checkpoint, 1 only in outputs/b/last_checkpoint " \
           "(first: 9)" in out


def test_max_examples_limits_the_list_not_the_count(tmp_path, capsys):
    a = write(tmp_path, "a.json", v1_results())
    b = write(tmp_path, "b.json", v1_results("other", flip=(0, 1, 2)))
    main([a, "--max_examples", "1", b])  # files on both sides of a flag
    out = capsys.readouterr().out
    assert "Decisions differ on 3 of 3 examples" in out
    assert [line[:6] for line in out.splitlines() if line.startswith("  id ")] == ["  id 0"]
    assert "  ... and 2 more (--max_examples)" in out
    assert "one file only" not in out


def test_v2_table_and_argmax_differences(tmp_path, capsys):
    a = write(tmp_path, "a.json", v2_results())
    b = write(tmp_path, "b.json", v2_results(math_scores=(1.0, 0.2, 0.3, 1.1)))  # argmax of id 17: 0 -> 3
    main([a, b])
    out = capsys.readouterr().out
    # Same model in both files: the columns are named by file stem.
    assert out.splitlines()[1].split() == ["a", "b"]
    assert table_row(out, "Ties") == ["33.10", "33.10"]  # v2 subsets are already 0-100
    assert table_row(out, "Precise IF") == ["absent", "absent"]
    assert table_row(out, "Score") == ["47.20", "47.20"]
    assert "Chat" not in out  # no v1 sections
    assert "Decisions differ on 1 of 3 examples" in out
    listed = [line for line in out.splitlines() if line.startswith("  id ")]
    assert listed == ["  id 17 [Math]  a: argmax=0 credit=1 scores=[1.000, 0.200, 0.300, 0.900]  |  "
                      "b: argmax=3 credit=1 scores=[1.000, 0.200, 0.300, 1.100]"]


def test_v2_ties_take_the_first_index_and_string_ids_match(tmp_path, capsys):
    first = v2_results()
    second = v2_results()
    second["per_example"][2]["scores"] = [0.5, 0.2, 0.1, 0.5]  # tie 0/3 in both: argmax 0 either way
    second["per_example"][0]["scores"] = [0.5, 0.5, 0.5]  # "ref:3": argmax 1 -> 0
    second["per_example"].append({"id": "ref:4", "subset": "Ties", "scores": [1, 0], "credit": None})
    main([write(tmp_path, "a.json", first), write(tmp_path, "b.json", second)])
    out = capsys.readouterr().out
    assert "Decisions differ on 1 of 3 examples" in out
    assert [line.split(" [")[0] for line in out.splitlines() if line.startswith("  id ")] == ["  id ref:3"]
    assert "credit=n/a" in out
    assert "0 only in a, 1 only in b (first: ref:4)" in out


def test_one_file_shows_the_table_and_skips_the_differences(tmp_path, capsys):
    main([write(tmp_path, "a.json", v1_results())])
    out = capsys.readouterr().out
    assert table_row(out, "refusals-dangerous") == ["100.00"]
    assert "One file: no decisions to compare" in out and "Decisions differ" not in out


def test_mixing_v1_and_v2_is_refused(tmp_path):
    a = write(tmp_path, "old.json", v1_results(benchmark_key=False))
    b = write(tmp_path, "new.json", v2_results())
    with pytest.raises(UserError, match=r"v1 with v2") as err:
        main([a, b])
    assert f"{a} (v1)" in str(err.value) and f"{b} (v2)" in str(err.value)


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read"),
    ("not_json", "is not JSON"),
    ("no_per_example", "is not a RewardBench results JSON"),
    ("no_files", "give one or more results JSON files"),
    ("plot_dir", "is a directory"),
    ("unknown_flag", "unknown flag(s): --bogus"),
    ("bad_row", "per_example[1] is not a v2 example"),
])
def test_user_errors(tmp_path, case, message):
    a = write(tmp_path, "a.json", v1_results())
    bad_row = v2_results()
    del bad_row["per_example"][1]["scores"]
    (tmp_path / "not.json").write_text("{nope")
    argv = {"missing": [str(tmp_path / "none.json")], "not_json": [str(tmp_path / "not.json")],
            "no_per_example": [write(tmp_path, "x.json", {"subsets": {}})], "no_files": [],
            "plot_dir": [a, "--plot", str(tmp_path)], "unknown_flag": [a, "--bogus", "1"],
            "bad_row": [write(tmp_path, "v2.json", v2_results()), write(tmp_path, "bad.json", bad_row)]}[case]
    with pytest.raises(UserError) as err:
        main(argv)
    assert message in str(err.value)


@pytest.mark.parametrize("count", [1, 2])
def test_plot_is_a_png(tmp_path, capsys, count):
    files = [write(tmp_path, "a.json", v1_results()), write(tmp_path, "b.json", v1_results("b", extra=True))]
    plot = tmp_path / "charts" / "cmp.png"  # its directory is created
    main(files[:count] + ["--plot", str(plot)])
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in plot.parent.iterdir()) == ["cmp.png"]  # the temporary file was moved into place
    assert capsys.readouterr().out.rstrip().endswith(f"Plot: {plot}")


def test_command_line_exit_codes(tmp_path):
    a = write(tmp_path, "a.json", v1_results())
    b = write(tmp_path, "b.json", v1_results("outputs/b/last_checkpoint", flip=(1,)))
    proc = run([sys.executable, SCRIPT, a, b], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, "alpacaeval-easy") == ["50.00", "50.00"]
    assert "Decisions differ on 1 of 3 examples" in proc.stdout
    proc = run([sys.executable, SCRIPT, a, write(tmp_path, "c.json", v2_results())], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot compare RewardBench v1 with v2 results")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
