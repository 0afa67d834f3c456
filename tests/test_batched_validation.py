"""The validation maps (standardize_pairs, validate_conversations, validate_pair_values, reject_special_tokens) run
batched: every row keeps its own verdict, in order, with the same outputs, counts, messages and errors as row by row.
Every expected value is written out by hand."""

import math

import pytest
from datasets import Dataset

from test_preprocessing import conv, msg, tok  # noqa: F401 (tok: the tiny tokenizer fixture)
from useful_code.cli import UserError
from useful_code.formats import standardize_pairs, validate_conversations, validate_pair_values
from useful_code.templates import reject_special_tokens


def pair(i, chosen, rejected):
    return {"id": i, "chosen": chosen, "rejected": rejected}


MESSAGE_PAIRS = [
    pair(0, conv("u", "q0", "a", "yes"), conv("u", "q0", "a", "no")),
    pair(1, None, conv("u", "q1", "a", "no")),  # not_a_message_list
    pair(2, [{"content": "q2"}, msg("assistant", "yes")], conv("u", "q2", "a", "no")),  # no role: not_a_message_list
    pair(3, conv("u", "q3", "a", "yes"), conv("u", "q3", "bot", "no")),  # unknown_role
    pair(4, conv("u", "q4", "a", "  "), conv("u", "q4", "a", "no")),  # empty_content
    pair(5, conv("u", "q5", "u", "q5", "a", "yes"), conv("u", "q5", "u", "q5", "a", "no")),  # roles_not_alternating
    pair(6, conv("u", "q6"), conv("u", "q6")),  # last_not_assistant
    pair(7, conv("u", "q7", "a", "yes"), conv("u", "other", "a", "no")),  # context_mismatch
    pair(8, conv("u", "q8", "a", "same"), conv("u", "q8", "a", "same")),  # identical_responses
    pair(9, conv("s", "sys", "u", "q9", "a", "yes"), conv("s", "sys", "u", "q9", "a", "no")),
    pair(10, conv("u", "hi <|eot_id|>", "a", "yes"), conv("u", "hi <|eot_id|>", "a", "no")),  # a special token
    pair(11, conv("u", "q11", "a", "yes"), conv("u", "q11", "a", "<|start_header_id|>no")),  # in rejected's answer
]
PAIR_COUNTS = ("not_a_message_list: 2, unknown_role: 1, empty_content: 1, roles_not_alternating: 1, "
               "last_not_assistant: 1, context_mismatch: 1, identical_responses: 1")
VALID_PAIRS = [
    pair(0, conv("u", "q0", "a", "yes"), conv("u", "q0", "a", "no")),
    pair(9, conv("s", "sys", "u", "q9", "a", "yes"), conv("s", "sys", "u", "q9", "a", "no")),
    pair(10, conv("u", "hi <|eot_id|>", "a", "yes"), conv("u", "hi <|eot_id|>", "a", "no")),
    pair(11, conv("u", "q11", "a", "yes"), conv("u", "q11", "a", "<|start_header_id|>no")),
]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_message_pairs_every_rule_then_special_tokens(tok, capsys, num_proc):
    data, stats = standardize_pairs(Dataset.from_list(MESSAGE_PAIRS), True, "train")
    assert data.to_list() == VALID_PAIRS
    assert stats == {"format": "messages", "read": 12, "used": 4,
                     "invalid": {"not_a_message_list": 2, "unknown_role": 1, "empty_content": 1,
                                 "roles_not_alternating": 1, "last_not_assistant": 1, "context_mismatch": 1,
                                 "identical_responses": 1}}
    assert capsys.readouterr().out == f"[train] dropped 8 of 12 invalid rows (--skip_invalid): {PAIR_COUNTS}\n"
    with pytest.raises(UserError) as err:
        standardize_pairs(Dataset.from_list(MESSAGE_PAIRS), False, "train")
    assert str(err.value).startswith(
        f"train: 8 of 12 rows are invalid ({PAIR_COUNTS}); first: row 1 (not_a_message_list), row 2 "
        "(not_a_message_list), row 3 (unknown_role), row 4 (empty_content), row 5 (roles_not_alternating) (0-based). "
        "Rules: not_a_message_list: chosen/rejected must be non-empty lists")

    kept, dropped = reject_special_tokens(data, tok, ("chosen", "rejected"), True, "train", num_proc)
    assert kept.to_list() == VALID_PAIRS[:2] and dropped == 2
    assert capsys.readouterr().out == ("[train] dropped 2 of 4 invalid rows (--skip_invalid): "
                                       "special_token_in_content: 2\n")
    with pytest.raises(UserError) as err:
        reject_special_tokens(data, tok, ("chosen", "rejected"), False, "train", num_proc)
    assert str(err.value).startswith("train: 2 of 4 rows are invalid (special_token_in_content: 2); first: row 2 "
                                     "(special_token_in_content), row 3 (special_token_in_content) (0-based).")
    # Only the named columns are read: row 3's special token is in rejected.
    kept, dropped = reject_special_tokens(data, tok, ("chosen",), True, "train", num_proc)
    assert kept["id"] == [0, 9, 11] and dropped == 1


def hh(*turns):
    return "".join(f"\n\n{speaker}: {content}" for speaker, content in turns)


def test_prompt_and_hh_rows_each_read_in_their_own_format(capsys):
    rows = [
        {"id": 0, "prompt": "q0", "chosen": "yes", "rejected": "no"},
        {"id": 1, "prompt": None, "chosen": hh(("Human", "q1"), ("Assistant", "yes")),
         "rejected": hh(("Human", "q1"), ("Assistant", "no"))},
        {"id": 2, "prompt": None, "chosen": "yes", "rejected": "no"},  # a RewardBench row without its prompt
        {"id": 3, "prompt": " ", "chosen": "yes", "rejected": "no"},  # bad_prompt
        {"id": 4, "prompt": "q4", "chosen": None, "rejected": "no"},  # not_a_message_list
        {"id": 5, "prompt": None, "chosen": hh(("Human", "q5"), ("Assistant", "yes")), "rejected": "no turns"},
        {"id": 6, "prompt": "q6", "chosen": "same", "rejected": "same"},  # identical_responses
        {"id": 7, "prompt": "q7", "chosen": "yes", "rejected": ""},  # empty_content
        {"id": 8, "prompt": None, "chosen": hh(("Human", "a"), ("Human", "q8"), ("Assistant", "yes")),
         "rejected": hh(("Human", "a"), ("Human", "q8"), ("Assistant", "no"))},  # roles_not_alternating
    ]
    data, stats = standardize_pairs(Dataset.from_list(rows), True, "mixed")
    assert data.to_list() == [pair(0, conv("u", "q0", "a", "yes"), conv("u", "q0", "a", "no")),
                              pair(1, conv("u", "q1", "a", "yes"), conv("u", "q1", "a", "no"))]
    assert stats == {"format": "prompt: 6, hh: 3", "read": 9, "used": 2,
                     "invalid": {"bad_prompt": 2, "not_a_message_list": 1, "unparseable_hh": 1,
                                 "identical_responses": 1, "empty_content": 1, "roles_not_alternating": 1}}
    assert capsys.readouterr().out == (
        "[mixed] dropped 7 of 9 invalid rows (--skip_invalid): bad_prompt: 2, not_a_message_list: 1, "
        "unparseable_hh: 1, identical_responses: 1, empty_content: 1, roles_not_alternating: 1\n")


def test_conversations_every_rule(tok, capsys):
    rows = [conv("u", "q", "a", "x"), None, [], [{"content": "q"}, msg("assistant", "x")], conv("u", "q", "robot", "x"),
            conv("u", "", "a", "x"), conv("a", "x"), conv("u", "q"), conv("s", "be brief", "u", "q", "a", "x"),
            conv("u", "q <|eot_id|>", "a", "x")]
    ds = Dataset.from_list([{"id": i, "messages": m} for i, m in enumerate(rows)])
    kept, stats = validate_conversations(ds, True, "mo")
    assert kept.to_list() == [{"id": i, "messages": rows[i]} for i in (0, 8, 9)]
    assert stats == {"read": 10, "used": 3, "invalid": {"not_a_message_list": 3, "unknown_role": 1, "empty_content": 1,
                                                        "roles_not_alternating": 1, "last_not_assistant": 1}}
    assert capsys.readouterr().out == ("[mo] dropped 7 of 10 invalid rows (--skip_invalid): not_a_message_list: 3, "
                                       "unknown_role: 1, empty_content: 1, roles_not_alternating: 1, "
                                       "last_not_assistant: 1\n")
    kept, dropped = reject_special_tokens(kept, tok, ("messages",), True, "mo")
    assert kept["id"] == [0, 8] and dropped == 1
    # A string where a message list belongs.
    kept, stats = validate_conversations(Dataset.from_list([{"messages": "hi"}, {"messages": "there"}]), True, "mo")
    assert len(kept) == 0 and stats == {"read": 2, "used": 0, "invalid": {"not_a_message_list": 2}}


@pytest.mark.parametrize("column,values,kept", [
    ("margin", [1.5, math.nan, math.inf, None, -2.0, 0.0], [1.5, -2.0, 0.0]),
    ("weight", [1.0, -1.0, 0.0, None, math.nan, 2.5], [1.0, 0.0, 2.5]),
])
def test_pair_values_every_rule(capsys, column, values, kept):
    ds = Dataset.from_list([{"id": i, column: v} for i, v in enumerate(values)])
    data, stats = validate_pair_values(ds, column, True, "t")
    assert data[column] == kept and data.column_names == ["id", column]
    assert stats == {"read": 6, "used": 3, "invalid": {f"bad_{column}": 3}}
    assert capsys.readouterr().out == f"[t] dropped 3 of 6 invalid rows (--skip_invalid): bad_{column}: 3\n"
    with pytest.raises(UserError, match=rf"^t: 3 of 6 rows are invalid \(bad_{column}: 3\); first: row 1 \(bad_"):
        validate_pair_values(ds, column, False, "t")


def test_a_first_batch_of_only_unparseable_rows_does_not_fix_the_column_types(capsys):
    """1500 unparseable HH rows ([] messages each) fill the first write batch; the valid rows after them must still
    convert (untyped, arrow fixed the columns as lists of null and the next batch failed with a TypeError)."""
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
    rows = [{"chosen": "no markers", "rejected": "none either"}] * 1500 + [hh] * 3
    converted, stats = standardize_pairs(Dataset.from_list(rows), True, "train")
    assert stats["invalid"] == {"unparseable_hh": 1500} and stats["used"] == 3
    assert converted["chosen"] == [conv("u", "q", "a", "yes")] * 3
    assert converted["rejected"] == [conv("u", "q", "a", "no")] * 3


def test_extra_message_keys_are_not_carried_as_null_fields():
    named = conv("u", "q", "a", "yes")
    named[0]["name"] = "bob"
    converted, _ = standardize_pairs(Dataset.from_list([pair(0, named, conv("u", "q", "a", "no"))]), False, "train")
    assert converted[0]["chosen"] == conv("u", "q", "a", "yes") and converted[0]["id"] == 0
