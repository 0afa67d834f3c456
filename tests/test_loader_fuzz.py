"""Loader fuzz: seeded, thousands of valid and malformed rows and lines in every input format, through every loader.
Asserted: no traceback (only one-line UserErrors), every valid row kept with its content, every invalid row or line
named with its rule and counted."""

import gzip
import json
import random
import zlib
from collections import Counter

import pytest
from datasets import Dataset

from useful_code.cli import UserError
from useful_code.data import load_dataset_dict, read_json_records
from useful_code.evaluation import load_examples
from useful_code.formats import standardize_pairs, validate_conversations
from useful_code.pm_data import validate_pm_examples

ROWS_PER_FORMAT = 1200


def m(role, content):
    return {"role": role, "content": content}


def messages_row(rng, i):
    """(row, expected rule or '') of the standard format; every row's chosen answer is unique ('answer i')."""
    context = ([m("system", "Be kind.")] if rng.random() < 0.3 else []) + [m("user", f"question {i}")]
    for t in range(rng.randrange(2)):
        context += [m("assistant", f"reply {i}.{t}"), m("user", f"follow-up {i}.{t}")]
    chosen, rejected = context + [m("assistant", f"answer {i}")], context + [m("assistant", f"other {i}")]
    kind = rng.choice(["valid"] * 6 + ["empty_content", "unknown_role", "roles_not_alternating",
                                       "last_not_assistant", "context_mismatch", "identical_responses",
                                       "not_a_message_list"])
    if kind == "empty_content":
        chosen[-1] = m("assistant", rng.choice(["", "  ", "\n"]))
    elif kind == "unknown_role":
        rejected[-1] = m("bot", "beep")
    elif kind == "roles_not_alternating":
        chosen, rejected = [m("user", "a")] + chosen, [m("user", "a")] + rejected
    elif kind == "last_not_assistant":
        chosen, rejected = chosen[:-1], rejected[:-1]
    elif kind == "context_mismatch":
        rejected[-2] = m("user", "something else")
    elif kind == "identical_responses":
        rejected = chosen
    elif kind == "not_a_message_list":
        chosen = None
    return {"chosen": chosen, "rejected": rejected}, "" if kind == "valid" else kind


def prompt_row(rng, i):
    row = {"id": i, "subset": rng.choice(["shp", "alpacaeval-easy"]), "prompt": f"question {i}",
           "chosen": f"answer {i}", "rejected": f"other {i}"}
    kind = rng.choice(["valid"] * 6 + ["bad_prompt", "empty_content", "identical_responses", "not_a_message_list"])
    if kind == "bad_prompt":
        row["prompt"] = rng.choice([None, "", " "])
    elif kind == "empty_content":
        row["rejected"] = ""
    elif kind == "identical_responses":
        row["rejected"] = row["chosen"]
    elif kind == "not_a_message_list":
        row["chosen"] = None
    return row, "" if kind == "valid" else kind


def hh_row(rng, i):
    def text(*turns):
        return "".join(f"\n\n{speaker}: {content}" for speaker, content in turns)

    context = [("Human", f"question {i}")]
    chosen, rejected = text(*context, ("Assistant", f"answer {i}")), text(*context, ("Assistant", f"other {i}"))
    kind = rng.choice(["valid"] * 6 + ["unparseable_hh", "empty_content", "roles_not_alternating",
                                       "context_mismatch", "identical_responses"])
    if kind == "unparseable_hh":
        chosen = f"answer {i} with no turn markers"
    elif kind == "empty_content":
        chosen = text(*context, ("Assistant", ""))
    elif kind == "roles_not_alternating":
        chosen = text(("Human", "hi"), *context, ("Assistant", f"answer {i}"))
        rejected = text(("Human", "hi"), *context, ("Assistant", f"other {i}"))
    elif kind == "context_mismatch":
        rejected = text(("Human", "different"), ("Assistant", f"other {i}"))
    elif kind == "identical_responses":
        rejected = chosen
    return {"chosen": chosen, "rejected": rejected}, "" if kind == "valid" else kind


BAD_LINES = {  # line-level corruption -> its rule
    "not_json": lambda line: line[: len(line) // 2],
    "not_an_object": lambda line: b"[" + line + b"]",
    "invalid_utf8": lambda line: line.replace(b"{", b'{"note": "caf\xe9", ', 1),  # Latin-1, not UTF-8
    "lone_surrogate": lambda line: line.replace(b"{", b'{"note": "\\ud800", ', 1),
    "mixed_types": lambda line: json.dumps({"chosen": 5, "rejected": 6}).encode(),
    # list of lists where the others hold a list of messages or a string: a conflict below the top level
    "mixed_types_nested": lambda line: json.dumps({"chosen": [[1, 2]], "rejected": [["x"]]}).encode(),
}


def write_file(path, make_row, seed, line_errors: bool):
    """Write ROWS_PER_FORMAT lines; return (expected row rules per kept line, expected line rules, valid answers)."""
    rng = random.Random(seed)
    lines, row_rules, line_rules, valid = [], Counter(), Counter(), []
    for i in range(ROWS_PER_FORMAT):
        row, rule = make_row(rng, i)
        line = json.dumps(row).encode()
        if line_errors and rng.random() < 0.05:
            corruption = rng.choice(sorted(BAD_LINES))
            lines.append(BAD_LINES[corruption](line))
            line_rules[corruption.removesuffix("_nested")] += 1
            continue
        lines.append(line)
        row_rules[rule] += 1
        if not rule:
            valid.append(f"answer {i}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return row_rules, line_rules, valid


def answers(pairs):
    return [c[-1]["content"] for c in pairs["chosen"]]


@pytest.mark.parametrize("make_row,suffix", [(messages_row, ".jsonl"), (prompt_row, ".jsonl"), (hh_row, ".jsonl.gz"),
                                             (messages_row, ".jsonl.gz")])
@pytest.mark.parametrize("line_errors", [False, True])
def test_pairs_every_valid_row_kept_every_invalid_named(tmp_path, capsys, make_row, suffix, line_errors):
    path = tmp_path / f"data{suffix}"
    row_rules, line_rules, valid = write_file(path, make_row, seed=zlib.crc32(f"{make_row.__name__}{suffix}".encode()),
                                              line_errors=line_errors)
    loaded = load_dataset_dict(str(path), "--train_set_path", skip_invalid=True)["train"]
    kept, stats = standardize_pairs(loaded, True, "fuzz")
    assert answers(kept) == valid  # every valid row, in order, with its content
    assert stats["invalid"] == {r: n for r, n in row_rules.items() if r}
    assert stats["read"] == sum(row_rules.values()) and stats["used"] == len(valid)
    out = capsys.readouterr().out
    if line_rules:
        assert f"dropped {sum(line_rules.values())} lines of {path} that are not records" in out
        for rule, n in line_rules.items():
            assert f"{rule}: {n}" in out

    # Without --skip_invalid: one UserError naming the first bad line (or row) and its rule, never a traceback.
    with pytest.raises(UserError) as err:
        standardize_pairs(load_dataset_dict(str(path), "--train_set_path")["train"], False, "fuzz")
    message = str(err.value)
    assert "\n" not in message and "0-based" in message and "--skip_invalid" in message
    assert any(rule in message for rule in (line_rules if line_rules else row_rules) if rule)


def test_rewardbench_loader_keeps_ids_and_subsets(tmp_path):
    path = tmp_path / "bench.jsonl"
    same = []

    def benchmark_row(rng, i):  # a benchmark scores a pair with the same response twice (a tie)
        row, rule = prompt_row(rng, i)
        same.append(rule == "identical_responses")
        return row, "" if same[-1] else rule

    row_rules, _, valid = write_file(path, benchmark_row, seed=7, line_errors=True)
    assert any(same)
    kept, stats = load_examples(str(path), "filtered", "--data_set_name", skip_invalid=True)
    assert answers(kept) == valid
    assert [f"answer {i}" for i in kept["id"]] == valid and set(kept["subset"]) <= {"shp", "alpacaeval-easy"}
    assert stats["invalid"] == {r: n for r, n in row_rules.items() if r}


def test_pm_and_conversation_loaders(tmp_path):
    rng = random.Random(3)
    pm_rows, pm_rules, conv_rows, conv_rules = [], Counter(), [], Counter()
    for i in range(ROWS_PER_FORMAT):
        kind = rng.choice(["valid"] * 5 + ["bad_label", "not_a_pm_example", "empty_prompt"])
        label = {"bad_label": "C"}.get(kind, rng.choice("AB"))
        messages = [m("user", "" if kind == "empty_prompt" else f"[CONTEXT] {i}"), m("assistant", label)]
        pm_rows.append({"messages": messages[:1] if kind == "not_a_pm_example" else messages})
        pm_rules[kind] += 1
        row, rule = messages_row(rng, i)
        conversation = row["chosen"] or [m("user", "q")]  # a conversation of its own; a pair's rules do not apply
        # rules about rejected or about the pair do not touch chosen; a lone user turn lacks the assistant's
        rule = {"context_mismatch": "", "identical_responses": "", "unknown_role": "",
                "not_a_message_list": "last_not_assistant"}.get(rule, rule)
        conv_rows.append({"messages": conversation})
        conv_rules[rule] += 1
    _, stats = validate_pm_examples(Dataset.from_list(pm_rows), True, "pm")
    assert stats["invalid"] == {r: n for r, n in pm_rules.items() if r != "valid"}
    assert stats["used"] == pm_rules["valid"]
    kept, stats = validate_conversations(Dataset.from_list(conv_rows), True, "mo")
    assert stats["invalid"] == {r: n for r, n in conv_rules.items() if r}
    assert len(kept) == conv_rules[""]


@pytest.mark.parametrize("content,rule", [(b"", "holds no records"), (b"\n\n", "holds no records"),
                                          (b"just text", "not_json"), (b'{"a": 1', "not_json"),
                                          # Arrow reads these bytes without complaint; the row would fail when read
                                          (b'{"a": "x"}\n{"a": "caf\xe9"}', "line 1 (invalid_utf8)")])
def test_whole_file_problems_are_one_line(tmp_path, content, rule):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_dataset_dict(str(path), "--data")
    assert rule in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_nested_type_conflict_is_its_rows_rule_whatever_the_first_row(tmp_path):
    row = {"chosen": [m("user", "q"), m("assistant", "a")], "rejected": [m("user", "q"), m("assistant", "b")]}
    odd = {"chosen": [[1, 2]], "rejected": row["rejected"]}  # a list of lists where the others hold messages
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(odd), json.dumps(row), json.dumps({**row, "note": None}), "{broken"]))
    # a line that is not JSON sends the file to the line-by-line reader, which names the nested conflict too
    with pytest.raises(UserError, match=r"line 0 \(mixed_types\), line 3 \(not_json\)"):
        load_dataset_dict(str(path), "--data")
    assert load_dataset_dict(str(path), "--data", skip_invalid=True)["train"]["chosen"] == [row["chosen"]] * 2
    # alone, `datasets` reads the conflict as a JSON-typed column and the row is the pair rules' to name
    path.write_text("\n".join([json.dumps(odd), json.dumps(row)]))
    _, stats = standardize_pairs(load_dataset_dict(str(path), "--data")["train"], True, "d")
    assert stats["invalid"] == {"not_a_message_list": 1} and stats["used"] == 1


def test_a_json_array_of_scalars_names_the_missing_columns(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"[1, 2]")  # datasets reads it as a 'text' column
    with pytest.raises(UserError, match=r"needs 'chosen' and 'rejected' columns \(found: text\)"):
        standardize_pairs(load_dataset_dict(str(path), "--data")["train"], False, "d")


def test_bad_gzip_and_empty_directory_are_one_line(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot be read as a .gz file"):
        load_dataset_dict(str(path), "--data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no data files in this directory"):
        load_dataset_dict(str(tmp_path / "empty"), "--data")


def test_a_data_directory_reads_each_file_as_a_single_file_is(tmp_path):
    """Split by datasets' file-name patterns; a bad line is named (or dropped and counted) as in a single file; two
    formats in one directory are an error, never one format's files silently left out."""
    import pandas as pd

    pair = {"chosen": "a", "rejected": "b"}
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-0.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
    (data / "train-1.jsonl").write_text(json.dumps(pair) + "\n{broken\n")
    (data / "test.jsonl").write_text(json.dumps(pair) + "\n")
    (data / "README.md").write_text("not data")
    with pytest.raises(UserError, match=r"train-1.jsonl: 1 lines are not records \(first: line 1 \(not_json\)"):
        load_dataset_dict(str(data), "--data")
    loaded = load_dataset_dict(str(data), "--data", skip_invalid=True)
    assert {name: len(split) for name, split in loaded.items()} == {"train": 3, "test": 1}
    pd.DataFrame([pair] * 3).to_parquet(data / "train-2.parquet")
    with pytest.raises(UserError, match=r"mixes data file formats \(3 json, 1 parquet files\)"):
        load_dataset_dict(str(data), "--data", skip_invalid=True)
    (data / "train-2.parquet").unlink()
    (data / "extra.csv").write_text("chosen,rejected\na,b\n")
    with pytest.raises(UserError, match=r"these data files would not be read: extra.csv \(only"):
        load_dataset_dict(str(data), "--data", skip_invalid=True)
    (data / "extra.csv").rename(data / "extra.jsonl")  # beside train*/test* files no split takes it
    with pytest.raises(UserError, match=r"these data files would not be read: extra.jsonl \(only"):
        load_dataset_dict(str(data), "--data", skip_invalid=True)
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(UserError, match="unsupported file type 'd.jsonl.zst'"):
        load_dataset_dict(str(zst), "--data")


def test_a_file_mixing_formats_reads_each_row_in_its_own(tmp_path):
    """Arrow gives every row of a mixed file the 'prompt' column, null where the row had none: a raw HH-RLHF row
    beside a RewardBench-style one is still HH-RLHF."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "What is tea?", "chosen": "A drink.", "rejected": "A car."},
            {"chosen": "\n\nHuman: hi there\n\nAssistant: hello, how can I help?",
             "rejected": "\n\nHuman: hi there\n\nAssistant: go away"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = standardize_pairs(load_dataset_dict(str(path), "--x")["train"], False, "x")
    assert stats["used"] == 2 and stats["format"] in ("prompt: 1, hh: 1", "hh: 1, prompt: 1")
    assert pairs[1]["chosen"] == [m("user", "hi there"), m("assistant", "hello, how can I help?")]


def test_an_unparseable_line_is_counted_without_datasets_error_log(tmp_path):
    """datasets logs a failed JSON parse as an ERROR before the loader counts the line: a run that goes on (with
    --skip_invalid) or stops with its own line must not show that alarm first. Its log handler is bound to the real
    stderr, so this runs in its own process."""
    import subprocess
    import sys

    path = tmp_path / "pairs.jsonl"
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(row) + "\n{bad\n")
    code = ("from useful_code.data import load_dataset_dict; "
            f"print(len(load_dataset_dict({str(path)!r}, '--x', skip_invalid=True)['train']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("1"), proc.stderr[-2000:]
    assert "dropped 1 lines" in proc.stdout and "Failed to load JSON" not in proc.stderr


@pytest.mark.parametrize("array", [False, True])
def test_a_byte_order_mark_is_not_a_bad_first_record(tmp_path, array):
    """A file an editor saved with a UTF-8 BOM: when another entry is bad, the first record is still read (it was
    named 'not_json' and dropped with it)."""
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / ("pairs.json" if array else "pairs.jsonl")
    text = json.dumps([row, row, 5]) if array else f"{json.dumps(row)}\n{json.dumps(row)}\n{{\"chosen\": oops\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, bad = read_json_records(path, "--x")
    assert len(records) == 2 and bad == [(2, "not_an_object" if array else "not_json")]
