"""score_dataset.py: rewards against the scorer and the eval path, best-of-n and pairs by hand, every input format
in one file, the row and response rules (checked before the model loads), resuming after a kill, one run per
output, two ranks, and the command line's one-line errors. The models are the tiny one with sharpened random
weights, so rewards differ by units and a row or order mix-up shows; the ArmoRM is assembled from it."""

import datetime
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, check_ok, run, save_sharp_checkpoints, save_tiny_armo, two_ranks
from useful_code import score_dataset
from useful_code.cli import UserError
from useful_code.defaults import TOY_GENERATIONS
from useful_code.reward_scorer import RewardScorer
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer, truncate_all

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
def armo(tmp_path_factory):
    """A tiny ArmoRM as armo-rm/export.py writes one (helpers.save_tiny_armo)."""
    return save_tiny_armo(tmp_path_factory.mktemp("armo") / "model")


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


def best_and_pairs(path, expected: int, threshold: float):
    """score_dataset.best_and_pairs read whole: (best-of-n rows, pairs, counts)."""
    counts = {}
    derived = list(score_dataset.best_and_pairs(path, expected, threshold, counts))
    return [best for best, _ in derived], [pair for _, pair in derived if pair is not None], counts


def test_pairs_by_hand(tmp_path):
    rows = [{"prompt": "Q1", "responses": ["a", "b", "c"], "rewards": [0.5, 2.0, 1.0]},  # margin 1.5
            {"prompt": "Q2", "responses": ["d", "e"], "rewards": [1.0, 1.0]},  # equal rewards
            {"context_messages": [{"role": "user", "content": "Q3"}], "responses": ["f"], "rewards": [3.0]}]
    write_jsonl(tmp_path / "scored.jsonl", rows)
    best, pairs, counts = best_and_pairs(tmp_path / "scored.jsonl", 3, 0.0)
    assert [b["messages"][-1]["content"] for b in best] == ["b", "d", "f"] and [b["reward"] for b in best] == [2, 1, 3]
    assert pairs == [{"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "b"}],
                      "rejected": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
                      "chosen_reward": 2.0, "rejected_reward": 0.5, "margin": 1.5}]
    assert counts == {"rows": 3, "pairs": 1, "below_margin": 1, "one_response": 1}
    assert len(best_and_pairs(tmp_path / "scored.jsonl", 3, 1.4)[1]) == 1
    assert best_and_pairs(tmp_path / "scored.jsonl", 3, 1.5)[1:] == ([], {"rows": 3, "pairs": 0, "below_margin": 2,
                                                                          "one_response": 1})
    with pytest.raises(RuntimeError, match="holds 3 scored rows, expected 4"):
        best_and_pairs(tmp_path / "scored.jsonl", 4, 0.0)


def test_ties_take_the_first_and_a_pms_lone_response_is_null(tmp_path):
    """The documented tie rule (the first of equal rewards is the best, and the worst); a PM's lone response (reward
    null: no opponent) is its prompt's best with reward null, and makes no pair."""
    rows = [{"prompt": "Q1", "responses": ["a", "b", "c", "d"], "rewards": [1.0, 2.0, 1.0, 2.0]},
            {"prompt": "Q2", "responses": ["e"], "rewards": [None]}]
    write_jsonl(tmp_path / "scored.jsonl", rows)
    best, pairs, counts = best_and_pairs(tmp_path / "scored.jsonl", 2, 0.0)
    assert [b["messages"][-1]["content"] for b in best] == ["b", "e"] and best[1]["reward"] is None
    assert [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs] == [("b", "a")]
    assert counts == {"rows": 2, "pairs": 1, "below_margin": 0, "one_response": 1}


def test_one_text_as_best_and_worst_makes_no_pair_whatever_its_rewards(tmp_path):
    """The same response text twice (its rewards apart by batching noise, here by 2.0) is no preference pair:
    counted below the margin; the text is still its prompt's best."""
    rows = [{"prompt": "Q", "responses": ["x", "y", "x"], "rewards": [3.0, 2.5, 1.0]}]  # best 0, worst 2: both "x"
    write_jsonl(tmp_path / "scored.jsonl", rows)
    best, pairs, counts = best_and_pairs(tmp_path / "scored.jsonl", 1, 0.0)
    assert best == [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"}],
                     "reward": 3.0}]
    assert pairs == [] and counts == {"rows": 1, "pairs": 0, "below_margin": 1, "one_response": 0}


def test_help_describes_the_script_and_the_tie_rule():
    printed = StringIO()
    with redirect_stdout(printed):
        score_dataset.main(["--help"])
    text = " ".join(printed.getvalue().split())
    assert text.startswith("usage:") and "Score every candidate response of every prompt" in text
    assert "the first of equal rewards is taken as the best, and as the worst" in text
    assert "of equal rewards the first is taken as best, and as worst" in text  # --pairs_path's help


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
    printed = score(checkpoints / "pm", data, tmp_path, "--best_of_n_path", str(tmp_path / "best.jsonl"))
    scored = read_jsonl(tmp_path / "scored.jsonl")
    scorer = RewardScorer.from_pretrained(str(checkpoints / "pm"), bf16=False)
    direct, _ = scorer.response_scores(contexts_of(scored), [r["responses"] for r in scored])
    for row, expected in zip(scored, direct):
        if len(expected) > 1:
            assert row["rewards"] == pytest.approx(expected, abs=1e-5)
    assert scored[0]["rewards"][0] + scored[0]["rewards"][1] == pytest.approx(1.0)
    assert abs(scored[0]["rewards"][0] - 0.5) > 0.01  # the sharpened PM prefers one of the two
    # A lone response has no opponent: null, not pm_scoring's 0.0 (the lowest win rate); still its prompt's best.
    assert scored[2]["id"] == 3 and direct[2] == [0.0] and scored[2]["rewards"] == [None]
    assert read_jsonl(tmp_path / "best.jsonl")[2]["reward"] is None
    assert "one response only: 1 (a PM gives a lone response no reward: null)" in printed


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
    proc = run([*two_ranks("torchrun"), SCRIPT, "--reward_name_or_path",
                str(checkpoints / "bt"), "--output_path", str(tmp_path / "scored.jsonl"), "--batch_size", "3",
                "--prompts_per_chunk", "5", "--bf16", "False", "--pairs_path", str(tmp_path / "pairs.jsonl")],
               env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "(2 processes)" in proc.stdout
    one, two = read_jsonl(out / "scored.jsonl"), read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in one]
    np.testing.assert_allclose([r["rewards"] for r in two], [r["rewards"] for r in one], rtol=1e-5, atol=1e-5)
    assert len(read_jsonl(tmp_path / "pairs.jsonl")) == 24


@pytest.mark.e2e
def test_a_bad_row_on_two_ranks_is_one_line_per_rank_and_no_traceback(checkpoints, tmp_path):
    """The rows are checked on the main rank first (main_process_first): its error reaches the other rank as the
    same line, where Accelerate's barrier left that rank to die on a closed gloo connection with a traceback."""
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "responses": ["a", "b"]}, {"prompt": 5, "responses": ["a"]}])
    proc = run([*two_ranks("torchrun"), SCRIPT, "--reward_name_or_path", str(checkpoints / "bt"), "--dataset_path",
                str(tmp_path / "bad.jsonl"), "--output_path", str(tmp_path / "out.jsonl")],
               env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and "row 1 (bad_prompt)" in errors[0]
    assert "[rank1]" not in proc.stderr and "Connection closed" not in proc.stderr  # torchrun's own summary aside


def test_one_process_errors_pass_through_on_main_and_main_process_first():
    """Without a launcher there is no one to stop together with: the error itself reaches the caller (a script's
    run_cli, or a test calling main() in-process), not an exit."""
    from useful_code.data_parallel import main_process_first, on_main, process_state

    state = process_state()

    def fail():
        raise UserError("bad row")

    assert on_main(state, lambda: 3) == 3
    with pytest.raises(UserError, match="^bad row$"):
        on_main(state, fail)
    with pytest.raises(FileNotFoundError):
        with main_process_first(state):
            open("/nonexistent/file")


@pytest.mark.e2e
def test_a_crash_of_the_main_rank_stops_the_others_with_one_line(tmp_path):
    """on_main and main_process_first: the main rank's traceback, one line on the other, no rank left waiting. The
    rank given as argv[3] is made slow to print: torchrun stops the others as soon as one exits, so the slow one's
    line is there only because every rank prints before a barrier that all pass before any exits (CI once lost a
    line without it)."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys, time\n"
        "import useful_code.cli as cli, useful_code.data_parallel as data_parallel\n"
        "from useful_code.cli import UserError, run_cli\n"
        "from useful_code.data_parallel import main_process_first, on_main, process_state\n"
        "def slow(print_line):\n"
        "    return lambda err: (time.sleep(3 * (os.environ['RANK'] == sys.argv[3])), print_line(err))\n"
        "cli.report_error = data_parallel.report_error = slow(cli.report_error)\n"
        "data_parallel.print_exception = slow(data_parallel.print_exception)\n"
        "def fail():\n"
        "    if sys.argv[2] == 'user':\n"
        "        raise UserError('bad row')\n"
        "    open('/nonexistent/file')\n"
        "def main():\n"
        "    state = process_state()\n"
        "    if sys.argv[1] == 'on_main':\n"
        "        on_main(state, fail)\n"
        "    with main_process_first(state):\n"
        "        fail()\n"
        "run_cli(main)\n")
    for where, slow_rank in (("on_main", "1"), ("main_process_first", "0")):
        proc = run([*two_ranks("torchrun"), str(script), where, "crash", slow_rank],
                   env_extra={"OMP_NUM_THREADS": "1"}, timeout=120)
        assert proc.returncode != 0
        assert "open('/nonexistent/file')" in proc.stderr  # the main rank's own traceback
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == ["error: the main process stopped (FileNotFoundError)"], where
    for slow_rank in ("0", "1"):
        proc = run([*two_ranks("torchrun"), str(script), "on_main", "user", slow_rank],
                   env_extra={"OMP_NUM_THREADS": "1"}, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and errors == ["error: bad row"] * 2, slow_rank
        assert "data_parallel.py" not in proc.stderr  # no rank's traceback (torchrun prints its own summary)


def test_armo_response_cut_past_its_user_turn_is_named_before_scoring_or_dropped(armo, tmp_path):
    """ArmoRM reads its gating input at the end of the user turn: a response so long that --max_length cuts that
    turn off is named (row, response, rule) when the rows are checked, before anything is scored or written; with
    --skip_invalid only that response is dropped (a row left with none is dropped), counted."""
    long = " ".join(["word"] * 200)
    rows = [{"id": i, "prompt": "Hi?", "responses": ["ok", "fine"]} for i in range(5)]
    rows += [{"id": 5, "prompt": "Hi?", "responses": ["ok", long]}, {"id": 6, "prompt": "Hi?", "responses": [long]}]
    write_jsonl(tmp_path / "long.jsonl", rows)
    flags = ("--trust_remote_code", "--max_length", "100")
    with pytest.raises(UserError) as err:
        score(armo, tmp_path / "long.jsonl", tmp_path, *flags)
    assert ("2 of 7 rows are invalid (no_user_turn_for_gating: 2); first: row 5 response 1 (no_user_turn_for_gating), "
            "row 6 response 0 (no_user_turn_for_gating)") in str(err.value) and "max_length=100" in str(err.value)
    assert not (tmp_path / "scored.jsonl").exists()

    printed = score(armo, tmp_path / "long.jsonl", tmp_path, *flags, "--skip_invalid")
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in scored] == [0, 1, 2, 3, 4, 5]
    assert scored[5]["responses"] == ["ok"] and scored[5]["dropped_responses"] == [1]
    assert scored[5]["rewards"][0] == pytest.approx(scored[0]["rewards"][0], abs=1e-5)
    assert "dropped_responses" not in scored[0]
    assert "dropped: 1 (no_user_turn_for_gating: 1)" in printed
    assert "responses dropped: 1 (no_user_turn_for_gating: 1)" in printed


def test_a_gating_failure_after_an_empty_response_names_that_response_by_its_index_in_the_row():
    """The gating check sees only the non-empty responses; the rule it breaks is reported at the response's index in
    the row as read (what 'dropped_responses' and the error name)."""
    def fails_on_long(context, responses):
        return [i for i, r in enumerate(responses) if r == "long"]

    context = [{"role": "user", "content": "Q"}]
    assert score_dataset.response_problems(context, ["", "ok", "long"], fails_on_long) == [
        [0, "empty_response"], [2, "no_user_turn_for_gating"]]
    assert score_dataset.response_problems(context, [" ", "long", "", "long"], fails_on_long) == [
        [0, "empty_response"], [1, "no_user_turn_for_gating"], [2, "empty_response"], [3, "no_user_turn_for_gating"]]


def test_armo_rows_are_checked_again_when_the_model_lowers_max_length(armo, tmp_path, monkeypatch):
    """A learned position table lowers max_length when the model loads (RewardScorer): the gating rule is checked
    again at the lowered length, before scoring."""
    load = RewardScorer.from_pretrained

    def lowered(*args, **kwargs):
        scorer = load(*args, **kwargs)
        scorer.max_length = 100
        return scorer

    monkeypatch.setattr(score_dataset.RewardScorer, "from_pretrained", lowered)
    long = " ".join(["word"] * 200)
    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi?", "responses": ["ok"]}, {"prompt": "Hi?",
                                                                                   "responses": ["ok", long]}])
    with pytest.raises(UserError, match=r"row 1 response 1 \(no_user_turn_for_gating\).*max_length=100"):
        score(armo, tmp_path / "long.jsonl", tmp_path, "--trust_remote_code")
    assert not (tmp_path / "scored.jsonl").exists()


def test_values_json_has_no_type_for_are_written_as_strings_and_resume(checkpoints, tmp_path):
    """A parquet timestamp column: written with str() (not a TypeError after the first chunk), and a resumed run
    compares it so."""
    import datasets

    rows = [{"id": i, "prompt": QUESTION, "responses": [GOOD, "No."], "created": datetime.datetime(2024, 1, 1 + i)}
            for i in range(7)]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "gen.parquet")
    score(checkpoints / "bt", tmp_path / "gen.parquet", tmp_path)
    lines = (tmp_path / "scored.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["created"] for line in lines] == [f"2024-01-0{1 + i} 00:00:00" for i in range(7)]
    (tmp_path / "scored.jsonl").write_text("".join(lines[:6]))  # a killed run's rows
    printed = score(checkpoints / "bt", tmp_path / "gen.parquet", tmp_path)
    assert "6 of 7 prompts already scored" in printed and "scored now: 1, resumed: 6" in printed
    assert [{**r, "rewards": None} for r in read_jsonl(tmp_path / "scored.jsonl")] == [
        {**json.loads(line), "rewards": None} for line in lines]


def test_messages_and_conversations_are_context_columns(checkpoints, tmp_path):
    context = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    rows = [{"id": i, column: context, "responses": [GOOD, "No."]}
            for i, column in enumerate(("context_messages", "messages", "conversations", "prompt"))]
    write_jsonl(tmp_path / "mixed.jsonl", rows)
    score(checkpoints / "bt", tmp_path / "mixed.jsonl", tmp_path)
    scored = read_jsonl(tmp_path / "scored.jsonl")
    for row, column in zip(scored, ("context_messages", "messages", "conversations", "prompt")):
        assert set(row) == {"id", column, "responses", "rewards"}  # the others, null in a mixed file, left out
        assert row["rewards"] == pytest.approx(scored[0]["rewards"], abs=1e-5)
    write_jsonl(tmp_path / "messages.jsonl", [{"id": 0, "messages": context, "responses": [GOOD, "No."]}])
    score(checkpoints / "bt", tmp_path / "messages.jsonl", tmp_path, "--overwrite")
    assert read_jsonl(tmp_path / "scored.jsonl")[0]["rewards"] == pytest.approx(scored[0]["rewards"], abs=1e-5)


def test_a_chat_templated_prompt_gets_a_hint(checkpoints, tmp_path):
    """RLHFlow's older gen_hf.py writes chat-templated string prompts in one {"instances": [...]} JSON: both are
    refused with what to give instead (its gen_hf2.py jsonl, or the prompt as text or messages)."""
    tokenizer = load_tokenizer(str(checkpoints / "bt"), "--m")
    templated = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                              add_generation_prompt=True)
    row = {"prompt": templated, "responses": [GOOD, "No."]}
    write_jsonl(tmp_path / "templated.jsonl", [row])
    with pytest.raises(UserError, match=r"row 0 \(special_token_in_content\).*looks chat-templated.*the user's text "
                                        r"or as the message list.*templated twice"):
        score(checkpoints / "bt", tmp_path / "templated.jsonl", tmp_path)
    (tmp_path / "gen.json").write_text(json.dumps({"type": "text_only", "instances": [row]}))
    with pytest.raises(UserError, match=r"found: type, instances\).*gen_hf.py.*gen_hf2.py"):
        score(checkpoints / "bt", tmp_path / "gen.json", tmp_path)


def test_an_empty_response_is_named_or_dropped_alone(checkpoints, tmp_path):
    rows = [{"id": 0, "prompt": QUESTION, "responses": [GOOD, "", "No."]},
            {"id": 1, "prompt": QUESTION, "responses": ["  ", "\n"]},
            {"id": 2, "prompt": QUESTION, "responses": [GOOD, "No."]}]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    with pytest.raises(UserError) as err:
        score(checkpoints / "bt", tmp_path / "gen.jsonl", tmp_path)
    assert ("2 of 3 rows are invalid (empty_response: 2); first: row 0 response 1 (empty_response), row 1 response 0 "
            "(empty_response) (0-based)") in str(err.value)
    assert "chat-templated" not in str(err.value)

    printed = score(checkpoints / "bt", tmp_path / "gen.jsonl", tmp_path, "--skip_invalid")
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in scored] == [0, 2]
    assert scored[0]["responses"] == [GOOD, "No."] and scored[0]["dropped_responses"] == [1]
    assert scored[0]["rewards"] == pytest.approx(scored[1]["rewards"], abs=1e-5)  # aligned with the kept ones
    assert "dropped_responses" not in scored[1]
    assert "dropped: 1 (empty_response: 1)" in printed and "responses dropped: 1 (empty_response: 1)" in printed
    assert "scored now: 0, resumed: 2" in score(checkpoints / "bt", tmp_path / "gen.jsonl", tmp_path, "--skip_invalid")
    # A scored file scored again: its rows' old indices name responses of another row, so they are not carried.
    (tmp_path / "scored.jsonl").rename(tmp_path / "first.jsonl")
    score(checkpoints / "bt", tmp_path / "first.jsonl", tmp_path)
    again = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["responses"] for r in again] == [[GOOD, "No."], [GOOD, "No."]]
    assert not any("dropped_responses" in r for r in again)


def test_the_data_is_checked_before_the_model_loads(checkpoints, tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(score_dataset.RewardScorer, "from_pretrained", load)
    write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    with pytest.raises(UserError, match="3 of 7 rows are invalid"):
        score(checkpoints / "bt", tmp_path / "mixed.jsonl", tmp_path)


def test_a_context_the_chat_template_refuses_is_named_by_its_row_or_dropped(checkpoints, tmp_path):
    """Gemma's template raises on a system message: row 1, named before anything is written (it used to stop the
    run mid-way, naming a position in its chunk); --skip_invalid drops and counts it. A PM reads the context as text
    in its own prompt, so the same template does not refuse that row there."""
    valid = [MIXED[i] for i in VALID_IDS]
    write_jsonl(tmp_path / "valid.jsonl", valid)
    for kind in ("bt", "pm"):
        shutil.copytree(checkpoints / kind, tmp_path / kind)
        template = tmp_path / kind / "chat_template.jinja"
        template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported')"
                            " }}{% endif %}" + template.read_text())
    with pytest.raises(UserError) as err:
        score(tmp_path / "bt", tmp_path / "valid.jsonl", tmp_path)
    assert ("1 of 4 rows are invalid (chat_template_rejects: 1); first: row 1 (chat_template_rejects) (0-based). "
            "Rules: chat_template_rejects: the model's chat template must accept the conversation (it raised: "
            "'System role not supported')") in str(err.value)
    assert not (tmp_path / "scored.jsonl").exists()
    printed = score(tmp_path / "bt", tmp_path / "valid.jsonl", tmp_path, "--skip_invalid")
    assert [r["id"] for r in read_jsonl(tmp_path / "scored.jsonl")] == [0, 3, 5]
    assert "chat_template_rejects: 1" in printed
    (tmp_path / "pm_out").mkdir()
    score(tmp_path / "pm", tmp_path / "valid.jsonl", tmp_path / "pm_out")
    assert [r["id"] for r in read_jsonl(tmp_path / "pm_out" / "scored.jsonl")] == VALID_IDS


def test_one_run_writes_an_output_at_a_time(checkpoints, tmp_path):
    """Another process holding <output>.lock (as a concurrent run does): one line, nothing written."""
    lock = tmp_path / "scored.jsonl.lock"
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "os.write(fd, str(os.getpid()).encode()); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=rf"another run \(PID {holder.pid}\) is writing .*scored.jsonl"):
            score(checkpoints / "bt", TOY, tmp_path)
        assert not (tmp_path / "scored.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert "scored now: 24" in score(checkpoints / "bt", TOY, tmp_path)  # a dead holder's lock is taken over
    assert not lock.exists()  # removed when the run ends


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_output_is_one_line(checkpoints, tmp_path):
    with pytest.raises(UserError, match=r"--best_of_n_path: cannot write /proc/best.jsonl \("):
        score(checkpoints / "bt", TOY, tmp_path, "--best_of_n_path", "/proc/best.jsonl")


def test_resume_refuses_an_edited_chat_template(checkpoints, tmp_path):
    """Every file of a local checkpoint that changes its rewards is recorded (chat_template.jinja here), not only
    weights and .json; documentation is not."""
    model = tmp_path / "bt"
    shutil.copytree(checkpoints / "bt", model)
    assert (model / "chat_template.jinja").exists()
    score(model, TOY, tmp_path)
    lines = (tmp_path / "scored.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "scored.jsonl").write_text("".join(lines[:12]))
    (model / "README.md").write_text("notes")
    assert "resumed: 12" in score(model, TOY, tmp_path)
    (tmp_path / "scored.jsonl").write_text("".join(lines[:12]))
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + "\n")
    with pytest.raises(UserError, match="holds 12 scored rows, scored with other files"):
        score(model, TOY, tmp_path)


def test_a_nan_reward_stops_the_run_before_its_chunk_is_written(checkpoints, tmp_path):
    """A NaN compares false: written, it would silently decide the best response and the pair."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-bt"
    shutil.copytree(checkpoints / "bt", broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["score.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"NaN or infinite reward to response 0 of row 0 \(0-based, of the rows "
                                        r"kept\), prompt 'Tell me something useful about painting"):
        score(broken, TOY, tmp_path)
    assert (tmp_path / "scored.jsonl").read_text() == ""


def test_the_first_non_finite_reward_is_named_by_its_row_and_response():
    items = [([{"role": "user", "content": f"question {i}"}], ["a", "b", "c"]) for i in range(3)]
    results = [([0.5, 1.0, -2.0], 0), ([None], 0), ([1.0, float("inf"), float("nan")], 0)]
    score_dataset.check_finite_rewards(results[:2], items[:2], 10)  # finite, and a PM's lone response: no error
    with pytest.raises(UserError, match="reward to response 1 of row 12 .*prompt 'question 2'"):
        score_dataset.check_finite_rewards(results, items, 10)


def test_only_a_prompt_may_be_the_users_text():
    # A context column holds messages; a string there is a malformed row, not a user turn.
    responses = ["a", "b"]
    assert score_dataset.parse_row({"prompt": "Hi?", "responses": responses})[2] == ""
    for column in ("context_messages", "messages", "conversations"):
        assert score_dataset.parse_row({column: "Hi?", "prompt": None, "responses": responses})[2] == "bad_prompt"


def test_a_prompt_of_hh_rlhf_turns_is_read_as_those_turns():
    hh = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant:"
    context, responses, reason = score_dataset.parse_row({"prompt": hh, "responses": [" Bye.", " No."]})
    assert (reason, responses) == ("", [" Bye.", " No."])  # the responses are scored as written
    assert context == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                       {"role": "user", "content": "Bye?"}]
