"""The one held-out split (data.held_out_pairs) and the one reload verification (checkpoints.verify_reload) that
every trainer and the ArmoRM export use."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from useful_code.checkpoints import verify_reload
from useful_code.cli import UserError
from useful_code.data import hold_out, held_out_pairs
from useful_code.formats import standardize_pairs


def pairs(n, tag="t"):
    rows = [{"prompt": f"{tag} question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]
    return Dataset.from_list(rows)


def prompts(dataset):
    return [c[0]["content"] for c in dataset["chosen"]]


def test_holds_out_disjoint_seeded_pairs():
    train, _ = standardize_pairs(pairs(20), False, "train")
    kept, held, stats = held_out_pairs(train, {"train": pairs(20)}, None, 5, seed=3, skip_invalid=False,
                                       train_flag="--train_set_path")
    assert len(kept) == 15 and len(held) == 5
    assert stats == {"read": 5, "source": "held out of --train_set_path", "used": 5}
    assert not set(prompts(kept)) & set(prompts(held))
    assert set(prompts(kept)) | set(prompts(held)) == {f"t question {i}" for i in range(20)}
    _, again, _ = held_out_pairs(train, {}, None, 5, seed=3, skip_invalid=False, train_flag="x")
    assert prompts(again) == prompts(held)  # seeded


def test_repeated_pairs_held_out_with_a_training_copy_are_left_out_counted(capsys):
    """Real sets repeat pairs: a held-out pair whose copy is trained on is left out of the evaluation, counted."""
    rows = pairs(10).to_list() * 3  # every pair three times
    train, _ = standardize_pairs(Dataset.from_list(rows), False, "train")
    kept, held, stats = held_out_pairs(train, {}, None, 10, seed=0, skip_invalid=False, train_flag="--train_set_path")
    assert len(kept) == 20 and not set(prompts(kept)) & set(prompts(held))
    left_out = stats["training_pairs_left_out"]
    assert left_out > 0 and stats["used"] == len(held) == 10 - left_out and stats["read"] == 10
    assert f"Left {left_out} of the 10 held-out pairs out of the evaluation: the data repeats them" \
        in capsys.readouterr().out
    twice = standardize_pairs(Dataset.from_list(pairs(1).to_list() * 4), False, "train")[0]
    with pytest.raises(UserError, match="every held-out pair is also a training pair .the data repeats its pairs."):
        held_out_pairs(twice, {}, None, 2, seed=0, skip_invalid=False, train_flag="--train_set_path")


def test_math_rows_hold_out_by_their_own_columns(capsys):
    """The math trainers' rows (one chat, or one tokenized solution) are held out by the same rule, keyed on their
    own columns: a repeated row is never both trained on and scored."""
    chats = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "+"}]}
             for i in range(6)]
    train = Dataset.from_list(chats + chats[:3])  # three rows twice
    kept, held, stats = hold_out(train, 4, 0, "no 'test' split", "--dataset_path", key_columns=("messages",),
                                 unit="rows")
    kept_keys = {json.dumps(m) for m in kept["messages"]}
    assert len(kept) == 5 and not kept_keys & {json.dumps(m) for m in held["messages"]}
    assert 0 < stats["training_rows_left_out"] < 4 and stats["used"] == len(held) == 4 - stats["training_rows_left_out"]
    assert "held-out rows out of the evaluation: the data repeats them, and a copy is a training row" \
        in capsys.readouterr().out
    solutions = Dataset.from_list([{"input_ids": [1, 2, i % 3], "label": float(i % 2)} for i in range(9)])
    with pytest.raises(UserError, match="9 valid solutions and no 'test' split: too few to hold out "
                                        "--eval_holdout_size=5"):
        hold_out(solutions, 5, 0, "no 'test' split", "--train_set_path", key_columns=("input_ids",),
                 unit="solutions")
    with pytest.raises(UserError, match="every held-out solution is also a training solution"):
        hold_out(solutions, 3, 0, "no 'test' split", "--train_set_path", key_columns=("input_ids",),
                 unit="solutions")


def test_too_few_pairs_to_hold_out_is_one_error():
    train, _ = standardize_pairs(pairs(9), False, "train")
    with pytest.raises(UserError, match="9 valid pairs and no 'test' split: too few to hold out --eval_holdout_size=5"):
        held_out_pairs(train, {}, None, 5, seed=0, skip_invalid=False, train_flag="--train_set_path")


def test_test_split_comes_before_holding_out():
    train, _ = standardize_pairs(pairs(20), False, "train")
    kept, held, stats = held_out_pairs(train, DatasetDict(train=pairs(20), test=pairs(4, "x")), None, 5, 0, False,
                                       "--dataset_path")
    assert len(kept) == 20 and prompts(held) == [f"x question {i}" for i in range(4)]
    assert stats["source"] == "test split of --dataset_path" and stats["used"] == 4 and stats["format"] == "prompt"


def test_a_test_split_that_is_the_train_set_is_never_the_held_out_set(capsys):
    """Data whose only split is 'test' trains on it (pick_split's fallback): the held-out pairs are then held out of
    it, disjoint from the training pairs, as when there is no test split."""
    only_test = DatasetDict(test=pairs(20))
    train, _ = standardize_pairs(only_test["test"], False, "train")
    kept, held, stats = held_out_pairs(train, only_test, None, 5, 3, False, "--train_set_path")
    assert len(kept) == 15 and len(held) == 5 and stats["source"] == "held out of --train_set_path"
    assert not set(prompts(kept)) & set(prompts(held))
    assert "Held out 5 of the train set's pairs for evaluation (--eval_holdout_size; its 'test' split is the " \
           "train set)" in capsys.readouterr().out
    # asked for by name (a --dataset_split test) while a train split exists: the same
    both = DatasetDict(train=pairs(20, "x"), test=pairs(20))
    kept, held, _ = held_out_pairs(train, both, None, 5, 3, False, "--dataset_path", train_split="test")
    assert len(kept) == 15 and not set(prompts(kept)) & set(prompts(held))
    with pytest.raises(UserError, match="9 valid pairs and its 'test' split is the train set: too few to hold out"):
        held_out_pairs(standardize_pairs(pairs(9), False, "t")[0], DatasetDict(test=pairs(9)), None, 5, 0, False,
                       "--train_set_path")


def test_eval_set_path_comes_first(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(3, "e")))
    train, _ = standardize_pairs(pairs(20), False, "train")
    kept, held, stats = held_out_pairs(train, DatasetDict(train=pairs(20), test=pairs(4, "x")), str(path), 5, 0,
                                       False, "--dataset_path")
    assert len(kept) == 20 and prompts(held) == ["e question 0", "e question 1", "e question 2"]
    assert stats["source"] == str(path)


def test_held_out_pairs_that_are_training_pairs_are_left_out_counted(tmp_path, capsys):
    path = tmp_path / "eval.jsonl"
    # 3 new pairs, then training pairs 4 and 7 (a pair is the same when its prompt, chosen and rejected are)
    rows = [r for r in pairs(3, "e")] + [pairs(20)[4], pairs(20)[7], {**pairs(20)[9], "rejected": "other"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = standardize_pairs(pairs(20), False, "train")
    kept, held, stats = held_out_pairs(train, {}, str(path), 5, 0, False, "--train_set_path")
    assert len(kept) == 20
    assert prompts(held) == ["e question 0", "e question 1", "e question 2", "t question 9"]
    assert stats["read"] == 6 and stats["used"] == 4 and stats["training_pairs_left_out"] == 2
    assert f"Left 2 of the 6 pairs of the {path} out of the evaluation: they are training pairs too" \
        in capsys.readouterr().out
    # The same pairs under a test split of the train data: the same check
    kept, held, stats = held_out_pairs(train, DatasetDict(train=pairs(20), test=Dataset.from_list(rows)), None, 5, 0,
                                       False, "--dataset_path")
    assert len(held) == 4 and stats["training_pairs_left_out"] == 2


def test_an_eval_set_that_is_the_training_data_is_replaced_by_held_out_pairs(tmp_path, capsys):
    """Upstream's recipes pass the training data as --eval_set_path: evaluating on it would score training pairs."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(20)))
    train, _ = standardize_pairs(pairs(20), False, "train")
    kept, held, stats = held_out_pairs(train, {}, str(path), 5, 3, False, "--train_set_path")
    assert len(kept) == 15 and len(held) == 5
    assert stats == {"read": 5, "source": "held out of --train_set_path", "used": 5}
    assert not set(prompts(kept)) & set(prompts(held))
    assert f"(--eval_holdout_size; every pair of the {path} is a training pair)" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"20 valid pairs and every pair of the {path} is a training pair: too few to "
                                        "hold out --eval_holdout_size=15; pass other pairs as --eval_set_path or a "
                                        "smaller --eval_holdout_size"):
        held_out_pairs(train, {}, str(path), 15, 3, False, "--train_set_path")


def test_reload_within_tolerance_returns_the_largest_difference(capsys):
    expected = np.array([[1.0, -2.0], [0.5, 3.0]])
    assert verify_reload(expected, expected + [[0, 4e-4], [0, 0]], torch.float32, "ckpt", "rewards") == \
        pytest.approx(4e-4)
    assert "Checkpoint verified: the reloaded rewards match the trained model (max |diff| 4.00e-04 on 2 inputs)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("dtype,diff,ok", [(torch.float32, 2.9e-3, True), (torch.float32, 3.1e-3, False),
                                           (torch.bfloat16, 0.14, True), (torch.bfloat16, 0.16, False)])
def test_reload_tolerance_scales_with_outputs_and_dtype(dtype, diff, ok):
    expected = np.array([3.0, -1.0, 0.0])  # scale 3: fp32 tolerance 3e-3, bf16 0.15
    reloaded = expected + [0.0, diff, 0.0]
    if ok:
        assert verify_reload(expected, reloaded, dtype, "ckpt", "rewards") == pytest.approx(diff)
    else:
        with pytest.raises(RuntimeError, match="ckpt does not reproduce the trained model: rewards differ"):
            verify_reload(expected, reloaded, dtype, "ckpt", "rewards")


def test_reload_nan_or_shape_mismatch_is_an_error():
    with pytest.raises(RuntimeError, match="differ by up to nan"):
        verify_reload(np.array([1.0, 2.0]), np.array([1.0, np.nan]), torch.float32, "c", "scores")
    with pytest.raises(RuntimeError, match="shape"):
        verify_reload(np.zeros((2, 2)), np.zeros(4), torch.float32, "c", "scores")
