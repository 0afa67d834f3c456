"""Data-parallel evaluation: two CPU ranks under torchrun give the one-process run's per-example scores (to float
tolerance) and identical decisions, for RewardBench 1 and 2, BT and PM. The models are the tiny one with sharpened
random weights, so scores vary by units and a slice or order mix-up would show."""

import json
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, check_ok, run, save_sharp_checkpoints, two_ranks
from useful_code.defaults import REWARD_BENCH_2_SAMPLE, REWARD_BENCH_SAMPLE

pytestmark = pytest.mark.e2e  # subprocesses and torchrun ranks: `make test-fast` skips this file

V2_SAMPLE = REWARD_BENCH_2_SAMPLE
SCRIPTS = {"bt": str(ROOT / "useful_code" / "eval_reward_bench_bt.py"),
           "pm": str(ROOT / "useful_code" / "eval_reward_bench_pm.py")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A BT and a PM checkpoint: the tiny model with sharpened random weights (helpers.save_sharp_checkpoints)."""
    out = tmp_path_factory.mktemp("ranks")
    save_sharp_checkpoints(out, seed=1)
    return out


def evaluate(models, kind: str, data: str, ranks: int, tmp_path, launcher: str = "torchrun") -> dict:
    results = tmp_path / f"{kind}-{ranks}-{'v2' if data == V2_SAMPLE else 'v1'}.json"
    launcher = two_ranks(launcher) if ranks > 1 else [sys.executable]  # deepspeed adds --local_rank to the flags
    proc = run([*launcher, SCRIPTS[kind], "--reward_name_or_path", str(models / kind), "--data_set_name", data,
                "--record_dir", str(tmp_path / "record.txt"), "--results_json", str(results), "--batch_size", "4"],
               env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    if data == V2_SAMPLE:  # a data note is said once, by the main rank, whatever the number of ranks
        assert proc.stdout.count("RewardBench 2 columns, scored as RewardBench 2") == 1, proc.stdout
    saved = json.loads(results.read_text())
    assert saved["data"]["processes"] == ranks
    if not torch.cuda.is_available():  # --bf16 (the default) asked for, fp32 used: the JSON says which ran
        assert saved["options"]["bf16"] is True and saved["dtype"] == "float32"
    return saved


def assert_same_scores(one: dict, two: dict, score_keys) -> None:
    assert [e["id"] for e in one["per_example"]] == [e["id"] for e in two["per_example"]]
    for key in score_keys:
        a = np.concatenate([np.ravel(e[key]) for e in one["per_example"]])
        b = np.concatenate([np.ravel(e[key]) for e in two["per_example"]])
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        assert np.ptp(a) > 0.05  # scores vary: a slice or order mix-up would show


@pytest.mark.parametrize("kind", ["bt", "pm"])
def test_two_ranks_match_one_process_on_rewardbench_2(models, tmp_path, kind):
    one, two = (evaluate(models, kind, V2_SAMPLE, ranks, tmp_path) for ranks in (1, 2))
    assert one["benchmark"] == two["benchmark"] == 2
    assert_same_scores(one, two, ["scores"])
    assert [e["credit"] for e in one["per_example"]] == [e["credit"] for e in two["per_example"]]  # decisions
    assert one["subsets"] == pytest.approx(two["subsets"], abs=1e-6)


def test_two_ranks_match_one_process_on_rewardbench_1(models, tmp_path):
    one, two = (evaluate(models, "bt", str(REWARD_BENCH_SAMPLE), ranks, tmp_path, "deepspeed") for ranks in (1, 2))
    assert_same_scores(one, two, ["chosen_reward", "rejected_reward"])
    assert [e["correct"] for e in one["per_example"]] == [e["correct"] for e in two["per_example"]]
    assert one["sections"] == two["sections"] and one["score"] == two["score"]


def test_rewardbench_2_says_how_many_completions_were_cut(models, tmp_path):
    results = tmp_path / "cut.json"
    proc = run([sys.executable, SCRIPTS["bt"], "--reward_name_or_path", str(models / "bt"), "--data_set_name",
                V2_SAMPLE, "--record_dir", str(tmp_path / "record.txt"), "--results_json", str(results),
                "--max_length", "40"], env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    cut = json.loads(results.read_text())["data"]["truncated"]
    assert cut > 0
    assert f"[data_set_name] truncated {cut} completions longer than max_length=40 tokens from the left" in proc.stdout


def test_an_error_in_one_ranks_share_stops_every_rank_with_its_line(tmp_path):
    """A NaN or a refused row in one rank's slice (PRM/ORM evaluation, PM score_dataset): that rank stopped alone and
    the others died at the gather with a gloo traceback. map_across_ranks raises it on every rank, after the gather."""
    script = tmp_path / "shares.py"
    script.write_text(
        "from useful_code.cli import UserError, run_cli\n"
        "from useful_code.data_parallel import finish, map_across_ranks, process_state\n\n\n"
        "def score(items):\n"
        "    if 7 in items:\n"
        "        raise UserError(f'item 7 is bad (position {items.index(7)})')\n"
        "    return [2 * x for x in items]\n\n\n"
        "def main():\n"
        "    state = process_state()\n"
        "    print(f'results {map_across_ranks(state, score, list(range(5)))}', flush=True)  # one write\n"
        "    map_across_ranks(state, score, list(range(8)))\n"
        "    finish(state)\n\n\n"
        "run_cli(main)\n")
    proc = run([*two_ranks("torchrun"), str(script)], env_extra={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and proc.stdout.count("results [0, 2, 4, 6, 8]") == 2  # uneven shares, in order
    assert proc.stderr.count("error: item 7 is bad (position 3) (counted within rank 1's share of the items)") == 2, \
        proc.stderr[-3000:]
    # the ranks exit 2 together (torchrun then prints its own ChildFailedError report): no worker traceback, no gloo
    # connection error, no abort from a process group left open
    assert "failed (exitcode: 2)" in proc.stderr
    assert not any(marker in proc.stderr for marker in ("gloo", "terminate called", "RuntimeError", "UserError"))
