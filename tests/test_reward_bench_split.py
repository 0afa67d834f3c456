"""--split of the RewardBench eval scripts: a split the data lacks is one clear error unless it is the benchmark's
default (which falls back to the data's only split, as a single local file needs), and the results JSON records the
split actually read."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

from helpers import ROOT, check_ok, run, save_sharp_checkpoints
from useful_code import evaluation
from useful_code.cli import UserError
from useful_code.defaults import REWARD_BENCH_2_SAMPLE, REWARD_BENCH_SAMPLE

SCRIPTS = {"bt": str(ROOT / "useful_code" / "eval_reward_bench_bt.py"),
           "pm": str(ROOT / "useful_code" / "eval_reward_bench_pm.py")}


def bench_args(data, split=None, benchmark=None):
    return SimpleNamespace(benchmark=benchmark, data_set_name=str(data), split=split, skip_invalid=False,
                           prior_sets_path=None, tie_credit=0.0)


def save_splits(path, names):
    """A save_to_disk directory of the v1 sample, one copy per split name."""
    rows = [json.loads(line) for line in Path(REWARD_BENCH_SAMPLE).read_text().splitlines()]
    DatasetDict({name: Dataset.from_list(rows) for name in names}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("data, benchmark, expected_benchmark", [
    (REWARD_BENCH_SAMPLE, None, 1), (REWARD_BENCH_SAMPLE, 1, 1), (REWARD_BENCH_2_SAMPLE, None, 2),
    (REWARD_BENCH_2_SAMPLE, 2, 2)])
def test_the_default_split_reads_a_single_file_and_records_train(data, benchmark, expected_benchmark, capsys):
    args = bench_args(data, benchmark=benchmark)
    got, raw = evaluation.load_benchmark(args)
    assert got == expected_benchmark and args.split == "train" and len(raw) == (69 if got == 1 else 28)
    assert "--split" not in capsys.readouterr().out  # a single file is its own split: nothing to say


@pytest.mark.parametrize("split, benchmark", [("filtered", 1), ("filtered", None), ("test", 2), ("test", None)])
def test_the_default_split_named_explicitly_also_reads_a_single_file(split, benchmark):
    args = bench_args(REWARD_BENCH_SAMPLE if split == "filtered" else REWARD_BENCH_2_SAMPLE, split, benchmark)
    evaluation.load_benchmark(args)
    assert args.split == "train"


def test_an_unknown_split_of_a_single_file_is_one_error_naming_flag_split_and_splits():
    args = bench_args(REWARD_BENCH_SAMPLE, split="nosuch")
    with pytest.raises(UserError) as err:
        evaluation.load_benchmark(args)
    assert str(err.value) == f"--split: {REWARD_BENCH_SAMPLE} has no split 'nosuch' (its splits: train)"
    # Another benchmark's default is not this one's: named with --benchmark 1, 'test' is an unknown split too.
    with pytest.raises(UserError, match=r"^--split: .* has no split 'test' \(its splits: train\)$"):
        evaluation.load_benchmark(bench_args(REWARD_BENCH_SAMPLE, split="test", benchmark=1))


def test_an_unknown_split_of_a_saved_dataset_is_an_error_and_a_known_one_is_read(tmp_path):
    only_filtered = save_splits(tmp_path / "filtered_only", ["filtered"])
    with pytest.raises(UserError) as err:
        evaluation.load_benchmark(bench_args(only_filtered, split="nosuch"))
    assert str(err.value) == f"--split: {only_filtered} has no split 'nosuch' (its splits: filtered)"
    args = bench_args(only_filtered)
    evaluation.load_benchmark(args)
    assert args.split == "filtered"
    two = save_splits(tmp_path / "two", ["filtered", "extra"])
    args = bench_args(two, split="extra")
    evaluation.load_benchmark(args)
    assert args.split == "extra"
    with pytest.raises(UserError, match=r"has no split 'train' \(its splits: filtered, extra\)$"):
        evaluation.load_benchmark(bench_args(two, split="train"))


def test_the_default_falls_back_to_a_saved_datasets_only_split_and_says_so(tmp_path, capsys):
    only = save_splits(tmp_path / "validation_only", ["validation"])
    args = bench_args(only, benchmark=1)
    evaluation.load_benchmark(args)
    assert args.split == "validation"
    assert capsys.readouterr().out.strip() == (f"--split: {only} has no split 'filtered' (the default); reading its "
                                               "only split, 'validation'")
    # Several splits and none the default: which one is meant is the user's to say.
    several = save_splits(tmp_path / "several", ["a", "b"])
    with pytest.raises(UserError) as err:
        evaluation.load_benchmark(bench_args(several))
    assert str(err.value) == (f"--split: {several} has no split 'filtered' or 'test' (the default) and several "
                              "others (a, b): name one with --split")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("split_models")
    save_sharp_checkpoints(out, seed=1)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["bt", "pm"])
def test_the_eval_scripts_refuse_an_unknown_split_and_record_the_split_read(models, tmp_path, kind):
    base = [sys.executable, SCRIPTS[kind], "--reward_name_or_path", str(models / kind), "--record_dir",
            str(tmp_path / "r.txt"), "--results_json", str(tmp_path / "r.json"), "--batch_size", "16"]
    only_filtered = save_splits(tmp_path / "filtered_only", ["filtered"])
    for data in (REWARD_BENCH_SAMPLE, only_filtered):
        proc = run(base + ["--data_set_name", str(data), "--split", "nosuch"], env_extra={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        splits = "train" if data == REWARD_BENCH_SAMPLE else "filtered"
        assert proc.stderr.strip().splitlines()[-1] == (f"error: --split: {data} has no split 'nosuch' (its "
                                                        f"splits: {splits})")
        assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.txt").exists()
    if kind == "bt":  # the default split on a single file: scored, and recorded as the split read
        check_ok(run(base + ["--data_set_name", REWARD_BENCH_SAMPLE], env_extra={"OMP_NUM_THREADS": "1"}))
        results = json.loads((tmp_path / "r.json").read_text())
        assert results["options"]["split"] == "train" and len(results["per_example"]) == 69
