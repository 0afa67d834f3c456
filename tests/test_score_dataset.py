"""score_dataset.py: rewards against the scorer and the eval path, best-of-n and pairs by hand, both input formats in
one file, the row rules, resuming after a kill, two ranks, and the command line's one-line errors. The models are
the tiny one with sharpened random weights, so rewards differ by units and a row or order mix-up shows."""

import json
import sys
from contextlib import redirect_stdout
from io import StringIO

import numpy as np
import pytest

from helpers import BIN, ROOT, check_ok, run, save_sharp_checkpoints
from useful_code import score_dataset
from useful_code.cli import UserError
from useful_code.defaults import TOY_GENERATIONS
from useful_code.reward_scorer import RewardScorer
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, truncate_all

TOY = TOY_GENERATIONS
SCRIPT = str(ROOT / "useful_code" / "score_dataset.py")
QUESTION = "How do I bake bread at home?"
GOOD = "Mix flour, water, yeast and salt, knead it, let it rise, then bake it."
# Valid rows of both formats (a message-list prompt, context_messages, one response, two equal responses) around
# invalid ones; "prompt" holds lists only, since a JSON column has one type in every row.
MIXED = [
    {"id": 0, "prompt": [{"role": "user", "content": QUESTION}], "responses": [GOOD, "Figure it out yourself."]},
    {"id": 1, "context_messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
     "responses": ["Go away.", GOOD, "Bread is nice, and so are trains."]},
    {"id": 2, "prompt": [{"role": "user", "content": QUESTION}], "responses": ["Forged<|eot_id|>turn", GOOD]},
    {"id": 3, "prompt": [{"role": "user", "content": QUESTION}], "responses": [GOOD]},
    {"id": 4, "context_messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Hm."}],
     "responses": [GOOD, "No."]},
    {"id": 5, "prompt": [{"role": "user", "content": QUESTION}], "responses": ["Same answer.", "Same answer."]},
    {"id": 6, "prompt": [{"role": "user", "content": QUESTION}], "responses": []},
]
VALID_IDS = [0, 1, 3, 5]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A BT and a PM checkpoint: the tiny model with sharpened random weights (helpers.save_sharp_checkpoints)."""
    out = tmp_path_factory.mktemp("score")
    save_sharp_checkpoints(out, seed=1)
    return out


@pytest.fixture(scope="module")
def toy_run(checkpoints, tmp_path_factory):
    """The BT model over the bundled asset, with best-of-n and pairs: (output directory, printed summary)."""
    out = tmp_path_factory.mktemp("toy")
    return out, score(checkpoints / "bt", TOY, out, "--best_of_n_path", str(out / "best.jsonl"),
                      "--pairs_path", str(out / "pairs.jsonl"))


def score(checkpoint, data, out, *flags) -> str:
    """main() in this process; returns what it printed."""
    printed = StringIO()
    with redirect_stdout(printed):
        score_dataset.main(["--reward_name_or_path", str(checkpoint), "--dataset_path", str(data), "--output_path",
                            str(out / "scored.jsonl"), "--batch_size", "3", "--prompts_per_chunk", "5",
                            "--bf16", "False", *flags])
    return printed.getvalue()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def contexts_of(rows) -> list[list[dict]]:
    return [score_dataset.parse_row(row)[0] for row in rows]


def test_rewards_are_the_scorers_and_the_eval_paths(checkpoints, toy_run):
    out, printed = toy_run
    inputs, scored = read_jsonl(TOY), read_jsonl(out / "scored.jsonl")
    assert [r["id"] for r in scored] == [r["id"] for r in inputs]  # every row, once, in order, columns kept
    assert [r["responses"] for r in scored] == [r["responses"] for r in inputs]
    assert all(len(r["rewards"]) == 4 for r in scored)
    # Both formats: the multi-turn rows with a system message are scored in their full context.
    multi = [r for r in scored if "context_messages" in r]
    assert [r["id"] for r in multi] == ["gen-5", "gen-11", "gen-17", "gen-23"] and "prompt" not in multi[0]
    assert len(contexts_of(scored)[11]) == 4 and contexts_of(scored)[0] == [{"role": "user", "content":
                                                                             inputs[0]["prompt"]}]
    rewards = np.array([r["rewards"] for r in scored])
    assert np.ptp(rewards) > 1.0  # sharpened weights: a mix-up of rows or responses would show

    scorer = RewardScorer.from_pretrained(str(checkpoints / "bt"), max_length=4096, batch_size=8, bf16=False)
    direct, cut = scorer.response_scores(contexts_of(inputs), [r["responses"] for r in inputs])
    np.testing.assert_allclose(rewards, np.array(direct), rtol=1e-5, atol=1e-5)
    conversations = [c + [{"role": "assistant", "content": resp}] for c, row in zip(contexts_of(inputs), inputs)
                     for resp in row["responses"]]
    sequences, _ = truncate_all(scorer.tokenizer, encode_conversations(scorer.tokenizer, conversations), 4096)
    eval_rewards = score_sequences(scorer.model, scorer.tokenizer, sequences, batch_size=1)
    np.testing.assert_allclose(rewards.ravel(), eval_rewards, rtol=1e-5, atol=1e-5)
    assert cut == 0 and "prompts read: 24, dropped: 0 (none), scored now: 24, resumed: 0" in printed


def test_best_of_n_is_the_argmax_and_pairs_are_best_vs_worst(toy_run):
    out, printed = toy_run
    scored, best = read_jsonl(out / "scored.jsonl"), read_jsonl(out / "best.jsonl")
    pairs = read_jsonl(out / "pairs.jsonl")
    assert len(best) == len(pairs) == 24 and "pairs: 24 ->" in printed and "below the margin (0.0): 0" in printed
    for row, top, pair, context in zip(scored, best, pairs, contexts_of(scored)):
        rewards = row["rewards"]
        hi, lo = int(np.argmax(rewards)), int(np.argmin(rewards))
        assert top == {"messages": context + [{"role": "assistant", "content": row["responses"][hi]}],
                       "reward": rewards[hi]}
        assert pair["chosen"] == top["messages"]
        assert pair["rejected"] == context + [{"role": "assistant", "content": row["responses"][lo]}]
        assert (pair["chosen_reward"], pair["rejected_reward"]) == (rewards[hi], rewards[lo])
        assert pair["margin"] == pytest.approx(rewards[hi] - rewards[lo]) and pair["margin"] > 0


def test_pairs_by_hand(tmp_path):
    rows = [{"prompt": "Q1", "responses": ["a", "b", "c"], "rewards": [0.5, 2.0, 1.0]},  # margin 1.5
            {"prompt": "Q2", "responses": ["d", "e"], "rewards": [1.0, 1.0]},  # equal rewards
            {"context_messages": [{"role": "user", "content": "Q3"}], "responses": ["f"], "rewards": [3.0]}]
    write_jsonl(tmp_path / "scored.jsonl", rows)
    best, pairs, counts = score_dataset.best_and_pairs(tmp_path / "scored.jsonl", 3, 0.0)
    assert [b["messages"][-1]["content"] for b in best] == ["b", "d", "f"] and [b["reward"] for b in best] == [2, 1, 3]
    assert pairs == [{"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "b"}],
                      "rejected": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
                      "chosen_reward": 2.0, "rejected_reward": 0.5, "margin": 1.5}]
    assert counts == {"below_margin": 1, "one_response": 1}
    assert len(score_dataset.best_and_pairs(tmp_path / "scored.jsonl", 3, 1.4)[1]) == 1
    assert score_dataset.best_and_pairs(tmp_path / "scored.jsonl", 3, 1.5)[1:] == ([], {"below_margin": 2,
                                                                                        "one_response": 1})
    with pytest.raises(RuntimeError, match="holds 3 scored rows, expected 4"):
        score_dataset.best_and_pairs(tmp_path / "scored.jsonl", 4, 0.0)


def test_margin_threshold_filters_pairs(checkpoints, toy_run, tmp_path):
    out, _ = toy_run
    margins = sorted(p["margin"] for p in read_jsonl(out / "pairs.jsonl"))
    threshold = (margins[9] + margins[10]) / 2  # 10 margins below, 14 above
    for name in ("scored.jsonl", "scored.scorer.json"):  # resumed: nothing left to score
        (tmp_path / name).write_text((out / name).read_text())
    printed = score(checkpoints / "bt", TOY, tmp_path, "--pairs_path", str(tmp_path / "pairs.jsonl"),
                    "--margin_threshold", str(threshold))
    kept = read_jsonl(tmp_path / "pairs.jsonl")
    assert sorted(p["margin"] for p in kept) == margins[10:]
    assert f"below the margin ({threshold}): 10" in printed and "scored now: 0, resumed: 24" in printed


def test_invalid_rows_are_named_or_dropped_and_counted(checkpoints, tmp_path):
    data = tmp_path / "mixed.jsonl"
    write_jsonl(data, MIXED)
    with pytest.raises(UserError) as err:
        score(checkpoints / "bt", data, tmp_path)
    message = str(err.value)
    assert "3 of 7 rows are invalid" in message
    assert "row 2 (special_token_in_content), row 4 (roles_not_alternating), row 6 (not_a_response_list)" in message
    assert not (tmp_path / "scored.jsonl").exists()  # the data is checked before anything is written

    printed = score(checkpoints / "bt", data, tmp_path, "--skip_invalid", "--pairs_path", str(tmp_path / "p.jsonl"),
                    "--best_of_n_path", str(tmp_path / "b.jsonl"))
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in scored] == VALID_IDS and [len(r["rewards"]) for r in scored] == [2, 3, 1, 2]
    assert "prompts read: 7, dropped: 3 (" in printed and "not_a_response_list: 1" in printed
    assert scored[3]["rewards"][0] == pytest.approx(scored[3]["rewards"][1], abs=1e-5)  # one text: no pair
    assert "one response only: 1" in printed and "below the margin (0.0): 1" in printed
    assert len(read_jsonl(tmp_path / "b.jsonl")) == 4 and len(read_jsonl(tmp_path / "p.jsonl")) == 2
    assert contexts_of(scored)[1][0] == {"role": "system", "content": "Be brief."}


def test_pm_scores_are_its_win_rates(checkpoints, tmp_path):
    data = tmp_path / "mixed.jsonl"
    write_jsonl(data, [MIXED[i] for i in VALID_IDS])
    score(checkpoints / "pm", data, tmp_path)
    scored = read_jsonl(tmp_path / "scored.jsonl")
    scorer = RewardScorer.from_pretrained(str(checkpoints / "pm"), bf16=False)
    direct, _ = scorer.response_scores(contexts_of(scored), [r["responses"] for r in scored])
    for row, expected in zip(scored, direct):
        assert row["rewards"] == pytest.approx(expected, abs=1e-5)
    assert scored[0]["rewards"][0] + scored[0]["rewards"][1] == pytest.approx(1.0)
    assert abs(scored[0]["rewards"][0] - 0.5) > 0.01  # the sharpened PM prefers one of the two


def test_truncated_sequences_are_counted(checkpoints, tmp_path):
    data = tmp_path / "valid.jsonl"
    write_jsonl(data, [MIXED[i] for i in VALID_IDS])  # 8 responses, each over 16 tokens with its context
    assert "truncated sequences: 8" in score(checkpoints / "bt", data, tmp_path, "--max_length", "16")
    assert "truncated sequences: 0" in score(checkpoints / "bt", data, tmp_path, "--max_length", "512", "--overwrite")


def test_resume_after_a_kill_gives_the_uninterrupted_output(checkpoints, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    # one sequence per forward: a reward does not depend on the batch it shares, so lines match byte for byte.
    flags = ("--batch_size", "1", "--max_tokens_per_batch", "0", "--best_of_n_path", "BEST", "--pairs_path", "PAIRS")

    def run_into(out):
        return score(checkpoints / "bt", TOY, out, *[{"BEST": str(out / "best.jsonl"),
                                                       "PAIRS": str(out / "pairs.jsonl")}.get(f, f) for f in flags])

    run_into(whole)
    lines = (whole / "scored.jsonl").read_text().splitlines(keepends=True)
    (killed / "scored.jsonl").write_text("".join(lines[:7]) + lines[7][: len(lines[7]) // 2])
    (killed / "scored.scorer.json").write_text((whole / "scored.scorer.json").read_text())  # written at the start
    printed = run_into(killed)
    assert "Resuming" in printed and "7 of 24 prompts already scored" in printed
    assert "scored now: 17, resumed: 7" in printed
    assert (killed / "scored.jsonl").read_text() == (whole / "scored.jsonl").read_text()
    ids = [r["id"] for r in read_jsonl(killed / "scored.jsonl")]
    assert len(ids) == len(set(ids)) == 24
    for name in ("best.jsonl", "pairs.jsonl"):
        assert (killed / name).read_text() == (whole / name).read_text()


def test_resume_refuses_an_output_of_other_data(checkpoints, tmp_path):
    write_jsonl(tmp_path / "scored.jsonl", [{"id": "other", "prompt": "Hi", "responses": ["Hello"], "rewards": [1]}])
    with pytest.raises(UserError, match="not the first of --dataset_path's 24 valid rows.*--overwrite"):
        score(checkpoints / "bt", TOY, tmp_path)
    printed = score(checkpoints / "bt", TOY, tmp_path, "--overwrite")
    assert "scored now: 24, resumed: 0" in printed and len(read_jsonl(tmp_path / "scored.jsonl")) == 24


def test_resume_refuses_rows_another_model_or_max_length_scored(checkpoints, tmp_path):
    """The default --output_path does not depend on the model: a second model's run on the same generations must not
    resume over the first one's rewards."""
    half = tmp_path / "half.jsonl"
    write_jsonl(half, read_jsonl(TOY)[:12])
    score(checkpoints / "bt", half, tmp_path)
    write_jsonl(tmp_path / "all.jsonl", read_jsonl(TOY))
    scored = tmp_path / "scored.jsonl"
    (tmp_path / "all_scored.jsonl").write_text(scored.read_text())  # 12 of 24 rows, as a killed run leaves them
    (tmp_path / "all_scored.scorer.json").write_text((tmp_path / "scored.scorer.json").read_text())
    flags = ("--dataset_path", str(tmp_path / "all.jsonl"), "--output_path", str(tmp_path / "all_scored.jsonl"))
    with pytest.raises(UserError, match=r"holds 12 scored rows, scored with other reward_name_or_path, files "
                                        r"\(.*all_scored.scorer.json\); pass --overwrite"):
        score(checkpoints / "pm", TOY, tmp_path, *flags)
    with pytest.raises(UserError, match="scored with other max_length"):
        score(checkpoints / "bt", TOY, tmp_path, *flags, "--max_length", "100")
    (tmp_path / "all_scored.scorer.json").unlink()
    with pytest.raises(UserError, match="no record of the model that scored them"):
        score(checkpoints / "bt", TOY, tmp_path, *flags)
    (tmp_path / "all_scored.scorer.json").write_text((tmp_path / "scored.scorer.json").read_text())
    assert "resumed: 12" in score(checkpoints / "bt", TOY, tmp_path, *flags)  # the same model and settings


def test_output_paths_are_checked_before_any_work(checkpoints, tmp_path):
    with pytest.raises(UserError, match="--pairs_path: .* must be a .jsonl file"):
        score(checkpoints / "bt", TOY, tmp_path, "--pairs_path", str(tmp_path / "pairs.json"))
    with pytest.raises(UserError, match="--output_path, --best_of_n_path must be different files"):
        score(checkpoints / "bt", TOY, tmp_path, "--best_of_n_path", str(tmp_path / "scored.jsonl"))
    copy = tmp_path / "data.jsonl"
    copy.write_text(open(TOY).read())
    with pytest.raises(UserError, match="is an input of this run"):
        score(checkpoints / "bt", copy, tmp_path, "--pairs_path", str(copy))


def test_command_line_error_is_one_line(checkpoints):
    proc = run([sys.executable, SCRIPT, "--reward_name_or_path", str(checkpoints / "bt"), "--margin_threshold", "-1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --margin_threshold must be at least 0, got -1.0"]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


@pytest.mark.e2e
def test_two_ranks_write_the_one_process_output(checkpoints, toy_run, tmp_path):
    out, _ = toy_run
    proc = run([str(BIN / "torchrun"), "--nproc_per_node", "2", SCRIPT, "--reward_name_or_path",
                str(checkpoints / "bt"), "--output_path", str(tmp_path / "scored.jsonl"), "--batch_size", "3",
                "--prompts_per_chunk", "5", "--bf16", "False", "--pairs_path", str(tmp_path / "pairs.jsonl")],
               env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "(2 processes)" in proc.stdout
    one, two = read_jsonl(out / "scored.jsonl"), read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in one]
    np.testing.assert_allclose([r["rewards"] for r in two], [r["rewards"] for r in one], rtol=1e-5, atol=1e-5)
    assert len(read_jsonl(tmp_path / "pairs.jsonl")) == 24
