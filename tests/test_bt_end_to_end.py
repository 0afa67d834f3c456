"""End to end: train the embedded tiny reward model, save, reload, evaluate on the RewardBench sample."""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from helpers import BIN, ROOT, check_ok, run, two_ranks
from useful_code.defaults import DEFAULT_MODEL, REWARD_BENCH_SAMPLE
from useful_code.evaluation import default_results_json
from useful_code.reward_bench import section_scores
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer

pytestmark = pytest.mark.e2e  # subprocesses and DeepSpeed ranks: `make test-fast` skips this file

TRAIN = str(ROOT / "bradley-terry-rm" / "train.py")
EVAL = str(ROOT / "useful_code" / "eval_reward_bench_bt.py")


def reload_rewards(checkpoint, pairs):
    """Rewards of (chosen, rejected) message pairs from a checkpoint, loaded as a user would."""
    tokenizer = load_tokenizer(checkpoint, "checkpoint")
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    sequences = encode_conversations(tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs])
    rewards = score_sequences(model, tokenizer, sequences, batch_size=4)
    return rewards[: len(pairs)], rewards[len(pairs):]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Plain-python training on the embedded defaults (40 steps), then evaluation of the checkpoint."""
    out = tmp_path_factory.mktemp("bt")
    check_ok(run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "40", "--logging_steps", "20"]))
    record = out / "record.txt"
    check_ok(run([sys.executable, EVAL, "--reward_name_or_path", str(out / "last_checkpoint"),
                  "--data_set_name", REWARD_BENCH_SAMPLE, "--record_dir", str(record), "--batch_size", "16"]))
    return out


def test_training_learns_the_toy_task_and_writes_metrics(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_loss"] < 0.5
    assert metrics["train_steps"] == 40
    assert metrics["examples"]["train"]["read"] == 1600 and metrics["examples"]["train"]["used"] == 1600
    assert metrics["examples"]["eval"]["used"] == 200
    assert metrics["examples"]["train"]["truncated"] == 0
    assert metrics["config"].endswith("bradley-terry-rm/configs/tiny.yaml")
    assert metrics["arguments"]["max_steps"] == 40 and metrics["arguments"]["learning_rate"] == 1e-3
    assert (metrics["arguments"]["group_by_length"], metrics["arguments"]["data_seed"]) == (True, None)
    assert metrics["command"] == ["python", str(TRAIN), "--output_path", str(trained), "--max_steps", "40",
                                  "--logging_steps", "20"]
    assert set(metrics["versions"]) >= {"torch", "transformers", "deepspeed", "datasets"}
    assert metrics["reload_max_abs_diff"] < 1e-4
    assert metrics["wall_time_s"] > 0


def test_training_leaves_curves_reward_histograms_and_a_model_card(trained):
    for picture in ("curves.png", "rewards.png"):
        assert (trained / picture).read_bytes().startswith(b"\x89PNG")
    card = (trained / "last_checkpoint" / "README.md").read_text()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers") and "pipeline_tag: text-classification" in card
    assert f"| held-out accuracy | {metrics['eval_accuracy']:g} |" in card and "| read | 1600 | 200 |" in card
    assert "python bradley-terry-rm/train.py --output_path" in card.replace(str(ROOT) + "/", "")


def test_a_copy_of_the_tiny_model_trains_with_the_same_hyper_parameters(trained, tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(DEFAULT_MODEL, copy)
    proc = run([sys.executable, TRAIN, "--model_name", str(copy), "--output_path", str(tmp_path / "out"),
                "--max_steps", "2"])
    check_ok(proc)
    assert "note: these settings are the tiny model's" in proc.stdout  # said, not silent
    ours = json.loads((tmp_path / "out" / "metrics.json").read_text())["arguments"]
    default = json.loads((trained / "metrics.json").read_text())["arguments"]
    keys = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
            "max_length", "warmup_steps", "weight_decay", "lr_scheduler_type", "activation_checkpointing")
    assert {k: ours[k] for k in keys} == {k: default[k] for k in keys}
    assert (ours["learning_rate"], ours["per_device_train_batch_size"], ours["gradient_accumulation_steps"]) == (
        1e-3, 16, 1)


def test_help_shows_the_recipes_values():
    proc = run([sys.executable, TRAIN, "--help"])
    check_ok(proc)
    text = " ".join(proc.stdout.split())
    assert "--output_path" in text and "--warmup_ratio" in text and "--save_every_steps" in text
    assert "(default: 0.001)" in text and "(default: 16)" in text and "(default: 512)" in text  # tiny.yaml
    proc = run([sys.executable, TRAIN, "bradley-terry-rm/configs/llama3-8b-it.yaml", "--help"])
    text = " ".join(proc.stdout.split())
    assert "(default: 2e-06)" in text and "(default: 64)" in text and "(default: 4096)" in text


def test_checkpoint_is_complete_safetensors_and_reloads(trained):
    checkpoint = trained / "last_checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (checkpoint / name).exists(), name
    assert not list(checkpoint.glob("*.bin")) and not list(checkpoint.glob("*.pt"))  # nothing that needs pickle
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights["score.weight"].shape == (1, 64)
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = load_tokenizer(str(checkpoint), "checkpoint")
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    # The trained model prefers the chosen side of held-out toy pairs after a reload.
    rows = [json.loads(line) for line in open(ROOT / "assets/data/toy_preference/test.jsonl")][:20]
    chosen, rejected = reload_rewards(str(checkpoint), [(r["chosen"], r["rejected"]) for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 18


def test_eval_writes_results_json_and_record(trained):
    checkpoint = str(trained / "last_checkpoint")
    record = trained / "record.txt"
    results_path = Path(default_results_json(str(record), checkpoint))
    results = json.loads(results_path.read_text())
    for key in ("per_example", "subsets", "sections", "score", "ties", "model", "options"):
        assert key in results
    assert results["model"] == checkpoint
    assert len(results["per_example"]) == 69 and len(results["subsets"]) == 23 and not results["missing_subsets"]
    # Sections and score follow from the per-example rows by the shared arithmetic.
    rows = results["per_example"]
    assert all(r["correct"] == float(r["chosen_reward"] > r["rejected_reward"]) for r in rows)
    assert results["sections"] == section_scores(results["subsets"])
    assert results["score"] == pytest.approx(sum(results["sections"].values()) / 4, abs=1e-9)
    # The bundled sample rows score the same as a direct reload of the checkpoint.
    first = json.loads(open(REWARD_BENCH_SAMPLE).readline())
    pair = ([{"role": "user", "content": first["prompt"]}, {"role": "assistant", "content": first["chosen"]}],
            [{"role": "user", "content": first["prompt"]}, {"role": "assistant", "content": first["rejected"]}])
    (chosen,), (rejected,) = reload_rewards(checkpoint, [pair])
    row = next(r for r in rows if r["id"] == first["id"])
    assert row["chosen_reward"] == pytest.approx(chosen, abs=1e-4)
    assert row["rejected_reward"] == pytest.approx(rejected, abs=1e-4)
    lines = record.read_text().splitlines()
    assert lines[0] == checkpoint and lines[1] == f"Chat\t{round(results['sections']['Chat'], 2)}"


def test_tie_credit_flag_changes_only_ties(trained, tmp_path):
    # Rejected differs from chosen only by trailing spaces, which the chat template trims: the model reads the same
    # tokens, so every example is a tie (identical texts are an invalid pair).
    rows = [json.loads(line) for line in open(REWARD_BENCH_SAMPLE)][:6]
    ties = tmp_path / "ties.jsonl"
    ties.write_text("".join(json.dumps({**r, "rejected": r["chosen"] + "  "}) + "\n" for r in rows))
    results = {}
    for credit in ("0", "0.5"):
        out = tmp_path / f"r{credit}.json"
        check_ok(run([sys.executable, EVAL, "--reward_name_or_path", str(trained / "last_checkpoint"),
                      "--data_set_name", str(ties), "--record_dir", str(tmp_path / "rec.txt"),
                      "--results_json", str(out), "--tie_credit", credit]))
        results[credit] = json.loads(out.read_text())
    assert results["0"]["ties"] == 6 and all(v == 0.0 for v in results["0"]["subsets"].values())
    assert all(v == 0.5 for v in results["0.5"]["subsets"].values())


def test_invalid_row_is_one_clear_error_and_skip_invalid_counts_it(tmp_path):
    rows = [json.loads(line) for line in open(ROOT / "assets/data/toy_preference/train.jsonl")][:40]
    rows[3]["rejected"] = rows[3]["rejected"] + [{"role": "user", "content": "oops"}]  # last turn not assistant
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [sys.executable, TRAIN, "--train_set_path", str(data), "--eval_holdout_size", "10", "--max_steps", "2",
            "--output_path", str(tmp_path / "out")]
    failed = run(base)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert "row 3 (last_not_assistant)" in failed.stderr and "--skip_invalid" in failed.stderr
    check_ok(run(base + ["--skip_invalid"]))
    stats = json.loads((tmp_path / "out" / "metrics.json").read_text())["examples"]
    assert stats["train"]["read"] == 40 and stats["train"]["invalid"] == {"last_not_assistant": 1}
    assert stats["train"]["held_out_for_eval"] == 10
    assert stats["train"]["used"] == 29 and stats["eval"]["used"] == 10


def test_unreachable_hub_name_is_one_line_naming_the_flag(tmp_path):
    proc = run([sys.executable, EVAL, "--reward_name_or_path", "no-such-org/no-such-model",
                "--record_dir", str(tmp_path / "r.txt")], env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--reward_name_or_path" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed launcher not installed")
def test_zero3_two_ranks_on_cpu_saves_a_complete_checkpoint(tmp_path):
    out = tmp_path / "z3"
    proc = run([*two_ranks("deepspeed"), TRAIN, "--deepspeed", "deepspeed_configs/deepspeed_3.json",
                "--output_path", str(out), "--max_steps", "6"], env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "Checkpoint verified" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 6
    # Every weight is whole (ZeRO-3 shards gathered) and matches the base model's shapes.
    weights = load_file(str(out / "last_checkpoint" / "model.safetensors"))
    base = load_file(str(Path(DEFAULT_MODEL) / "model.safetensors"))
    for name, tensor in base.items():
        if name != "lm_head.weight":
            assert weights[name].shape == tensor.shape, name
    assert weights["score.weight"].shape == (1, 64)
    assert not (out / "checkpoint-6").exists()  # no optimizer-state dump unless asked for


def test_two_ranks_train_loss_is_every_ranks_mean_whatever_the_logging_steps(tmp_path):
    """transformers gathers the loss across ranks only at a log; the last step is always logged
    (StopOnNonFiniteLoss), so a run that logs once, at its end, reports the same train_loss as one that logs (and
    gathers) every step. Before, the steps after the last log counted rank 0's loss alone."""
    losses = {}
    for logging_steps in (1, 100):
        out = tmp_path / f"log{logging_steps}"
        check_ok(run([*two_ranks("torchrun"), TRAIN, "--output_path", str(out), "--max_steps", "4",
                      "--logging_steps", str(logging_steps)], env_extra={"OMP_NUM_THREADS": "1"}))
        losses[logging_steps] = json.loads((out / "metrics.json").read_text())["train_loss"]
    assert losses[100] == pytest.approx(losses[1], rel=1e-5)


def test_two_ranks_log_every_ranks_pairs(tmp_path):
    """The logged accuracy, margin, rewards and token counts of two ranks of 16 pairs are those of one rank of the
    same 32 pairs (they used to be rank 0's half); metrics.json's train_tokens too. Without length grouping, whose
    groups depend on the world size, both runs take the same pairs at each step."""
    def logs(proc) -> list[dict]:
        return [ast.literal_eval(line) for line in re.findall(r"\{'loss'.*?\}", proc.stdout)]

    runs = {}
    for ranks, launcher, batch in ((1, [sys.executable], "32"), (2, two_ranks("torchrun"), "16")):
        out = tmp_path / f"ranks{ranks}"
        proc = run([*launcher, TRAIN, "--output_path", str(out), "--max_steps", "3", "--logging_steps", "1",
                    "--per_device_train_batch_size", batch, "--group_by_length", "false"],
                   env_extra={"OMP_NUM_THREADS": "1"})
        check_ok(proc)
        runs[ranks] = logs(proc), json.loads((out / "metrics.json").read_text())["train_tokens"]
    (one, one_tokens), (two, two_tokens) = runs[1], runs[2]
    assert len(one) == len(two) == 3 and one_tokens == two_tokens and one_tokens["real"] > 0
    for a, b in zip(one, two):
        assert (a["accuracy"], a["num_tokens"], a["computed_tokens"]) == (b["accuracy"], b["num_tokens"],
                                                                          b["computed_tokens"])
        for key in ("margin", "rewards/mean", "rewards/min", "rewards/max"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-3, abs=1e-5), key
    assert one[-1]["num_tokens"] == one_tokens["real"]  # the run so far


def test_lora_under_zero3_with_gradient_checkpointing_on_two_ranks(tmp_path):
    """LoRA under ZeRO-3 with gradient checkpointing (reentrant, as wrap_with_lora sets it: non-reentrant
    recomputation meets ZeRO-3's partitioned frozen weights) trains on two CPU ranks, and the merged checkpoint
    reloads to the trained rewards."""
    out = tmp_path / "z3lora"
    proc = run([*two_ranks("deepspeed"), TRAIN, "--deepspeed", "deepspeed_configs/deepspeed_3.json",
                "--output_path", str(out), "--max_steps", "4", "--use_peft", "--gradient_checkpointing", "true"],
               env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "Checkpoint verified" in proc.stdout and "LoRA r=16" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 4 and metrics["lora"]["lora_r"] == 16
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert load_file(str(out / "last_checkpoint" / "model.safetensors"))["score.weight"].shape == (1, 64)
    # the merge loads the base model afresh: the kind is carried over to the merged checkpoint's config
    assert json.loads((out / "last_checkpoint" / "config.json").read_text())["rlhf_reward_kind"] == "bt"


def test_prior_sets_add_prior_score_and_leaderboard_score(trained, tmp_path):
    # One split per prior set, as allenai/preference-test-sets stores them (each with a 'subset' column of its own
    # and ids from 0): the split name is the subset, and the retired pku split is left out.
    from datasets import Dataset, DatasetDict

    toy = [json.loads(line) for line in open(ROOT / "assets/data/toy_preference/test.jsonl")][:10]
    as_prompt = [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1]["content"],
                  "rejected": r["rejected"][-1]["content"], "subset": "helpful-base", "id": i % 4}
                 for i, r in enumerate(toy)]
    DatasetDict({"anthropic_helpful": Dataset.from_list(as_prompt[:4]), "shp": Dataset.from_list(as_prompt[4:8]),
                 "pku_safer": Dataset.from_list(as_prompt[8:])}).save_to_disk(str(tmp_path / "prior"))
    out = tmp_path / "r.json"
    check_ok(run([sys.executable, EVAL, "--reward_name_or_path", str(trained / "last_checkpoint"),
                  "--data_set_name", REWARD_BENCH_SAMPLE, "--record_dir", str(tmp_path / "rec.txt"),
                  "--results_json", str(out), "--prior_sets_path", str(tmp_path / "prior")]))
    results = json.loads(out.read_text())
    prior = results["prior_sets"]
    assert set(prior["subsets"]) == {"anthropic_helpful", "shp"} and len(prior["per_example"]) == 8
    assert prior["score"] == pytest.approx(100 * (prior["subsets"]["anthropic_helpful"] + prior["subsets"]["shp"]) / 2)
    expected = (2 * sum(results["sections"].values()) + prior["score"]) / 9
    assert results["leaderboard_score"] == pytest.approx(expected, abs=1e-9)
    assert "Prior Sets" in (tmp_path / "rec.txt").read_text()


def test_held_out_pairs_are_truncated_never_dropped(tmp_path):
    """--overlength drop applies to training pairs only: the accuracy is on every held-out pair the user chose."""
    out = tmp_path / "out"
    check_ok(run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "2", "--max_length", "48",
                  "--overlength", "drop"]))
    examples = json.loads((out / "metrics.json").read_text())["examples"]
    assert examples["train"]["dropped_overlength"] > 0 and examples["train"]["used"] < 1600
    assert examples["eval"]["dropped_overlength"] == 0 and examples["eval"]["used"] == 200
    assert examples["eval"]["truncated"] == examples["eval"]["overlength"] > 0


def test_flag_out_of_range_is_one_line_before_any_work(tmp_path):
    """The limits themselves are unit-tested (tests/test_cli.py); here, that a script stops on one before any work."""
    proc = run([sys.executable, TRAIN, "--gradient_accumulation_steps", "0", "--output_path", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --gradient_accumulation_steps must be at least 1, got 0"
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_finished_run_is_not_overwritten(trained):
    before = (trained / "metrics.json").read_text()
    proc = run([sys.executable, TRAIN, "--output_path", str(trained), "--max_steps", "2"])
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr and "--overwrite_output_dir" in proc.stderr
    assert f"error: --output_path: {trained} holds" in proc.stderr  # the flag the user typed (upstream's name)
    assert (trained / "metrics.json").read_text() == before and not (trained / ".staging").exists()


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path):
    """kill -9 mid-training (at step 41 of 60: in the second epoch, 25 steps each), then
    --resume_from_checkpoint latest: the final weights equal an uninterrupted run's, exactly (CPU, fp32): the resumed
    epoch is drawn in its own order (transformers' length grouping would replay the first epoch's). Periodic
    checkpoints hold no pickled training arguments."""
    flags = ["--max_steps", "60", "--per_device_train_batch_size", "64", "--save_every_steps", "10",
             "--logging_steps", "100"]
    # One thread in all three runs: a different thread count may change float sums' order (it does on AVX-512/AMX).
    one_thread = {"OMP_NUM_THREADS": "1"}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **one_thread}
    killed = tmp_path / "killed"
    # The run kills itself at the end of step 41, after checkpoint-40 is written: a kill from outside, timed by
    # watching for the checkpoint, came late whenever the machine was loaded.
    kill_at_41 = tmp_path / "kill_at_41.py"
    kill_at_41.write_text(
        "import os, runpy, signal, sys\n"
        "from transformers.trainer_callback import CallbackHandler\n"
        "step_end = CallbackHandler.on_step_end\n"
        "def on_step_end(self, args, state, control):\n"
        "    if state.global_step == 41:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step_end(self, args, state, control)\n"
        "CallbackHandler.on_step_end = on_step_end\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, str(kill_at_41), TRAIN, "--output_path", str(killed), *flags], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists() and not (killed / "last_checkpoint").exists()
    assert json.loads((killed / "checkpoint-40" / "trainer_state.json").read_text())["epoch"] > 1
    assert not list(killed.glob("checkpoint-*/training_args.bin"))
    proc = run([sys.executable, TRAIN, "--output_path", str(killed), *flags, "--resume_from_checkpoint", "latest"],
               one_thread)
    check_ok(proc)
    assert "Taking over the stale lock" in proc.stdout and "Resuming from" in proc.stdout
    check_ok(run([sys.executable, TRAIN, "--output_path", str(tmp_path / "whole"), *flags], one_thread))
    resumed = load_file(killed / "last_checkpoint" / "model.safetensors")
    whole = load_file(tmp_path / "whole" / "last_checkpoint" / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    # transformers averages the loss over this process's steps only: not the run's train_loss
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["train_loss"] is None and metrics["resumed"]["at_step"] == 40
    assert metrics["resumed"]["from"].endswith("checkpoint-40")
    assert 0 < metrics["resumed"]["train_loss_of_these_steps"] < 1
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["train_loss"] > 0



def test_lora_run_saves_a_merged_plain_checkpoint_equal_to_the_adapter_model(tmp_path):
    """--use_peft: last_checkpoint/ is a plain sequence classifier (the adapter merged, the trained score head in
    place) whose rewards equal the base model with the saved adapter; 4-bit loading on a CPU is one line."""
    from peft import PeftModel

    out = tmp_path / "lora"
    proc = run([sys.executable, TRAIN, "--use_peft", "--lora_r", "8", "--output_path", str(out), "--max_steps", "30",
                "--learning_rate", "5e-3"])
    check_ok(proc)
    assert "LoRA r=8 alpha=32" in proc.stdout and "Checkpoint verified" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora"]["lora_r"] == 8 and metrics["eval_accuracy"] > 0.8
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not list((out / "last_checkpoint").glob("adapter*"))  # plain: no peft files in the checkpoint

    tokenizer = load_tokenizer(str(out / "last_checkpoint"), "m")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "last_checkpoint").eval()
    base = AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL, num_labels=1)
    base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    conversations = [[{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": text}]
                     for text in ("Mix flour, water and yeast, knead, let it rise and bake it.", "No. Go away.")]
    sequences = encode_conversations(tokenizer, conversations)
    merged_rewards = score_sequences(merged, tokenizer, sequences, batch_size=2)
    adapter_rewards = score_sequences(adapted, tokenizer, sequences, batch_size=2)
    assert merged_rewards == pytest.approx(adapter_rewards, abs=1e-4)
    assert merged_rewards[0] > merged_rewards[1]  # it learned the toy cue

    proc = run([sys.executable, TRAIN, "--use_peft", "--load_in_4bit", "--output_path", str(tmp_path / "q")])
    assert proc.returncode == 2 and "--load_in_4bit needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_margin_loss_widens_the_reward_gap_and_bad_values_are_named(tmp_path):
    """--loss_type margin with a margin of 4 on every pair trains a wider held-out reward gap than plain BT from the
    same seed (BT's gradient fades once a pair is separated; the margin's does not until the gap passes 4); the loss
    type is recorded; a row whose margin is not a number is one line naming it."""
    toy = ROOT / "assets" / "data" / "toy_preference"
    rows = [json.loads(line) for line in open(toy / "train.jsonl")]
    held_out = [json.loads(line) for line in open(toy / "test.jsonl")][:50]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({**row, "margin": 4.0}) for row in rows))
    gaps = {}
    for loss in ("bt", "margin"):
        out = tmp_path / loss
        check_ok(run([sys.executable, TRAIN, "--train_set_path", str(data), "--eval_set_path", str(toy),
                      "--loss_type", loss, "--output_path", str(out)]))
        assert json.loads((out / "metrics.json").read_text())["arguments"]["loss_type"] == loss
        chosen, rejected = reload_rewards(out / "last_checkpoint", [(r["chosen"], r["rejected"]) for r in held_out])
        gaps[loss] = float(np.mean(chosen) - np.mean(rejected))
    assert gaps["margin"] > gaps["bt"] + 1.0, gaps  # measured: 9.7 against 7.2

    data.write_text("\n".join(json.dumps({**row, "margin": None if i == 3 else 2.0}) for i, row in enumerate(rows)))
    proc = run([sys.executable, TRAIN, "--train_set_path", str(data), "--loss_type", "margin", "--output_path",
                str(tmp_path / "bad")])
    assert proc.returncode == 2 and "row 3 (bad_margin)" in proc.stderr and "Traceback" not in proc.stderr


def test_odin_quality_head_is_decorrelated_from_length(trained, tmp_path):
    """On the toy pairs the chosen answers are longer (43 tokens against 28): a plain BT reward correlates with
    response length; ODIN's quality head, exported alone as last_checkpoint/, does not (measured: 0.54 vs -0.02)."""
    out = tmp_path / "odin"
    check_ok(run([sys.executable, TRAIN, "--loss_type", "odin", "--output_path", str(out)]))
    assert (out / "two_heads" / "model.safetensors").exists()
    config = json.loads((out / "last_checkpoint" / "config.json").read_text())
    assert len(config["id2label"]) == 1  # one output: the quality head
    held_out = [json.loads(line) for line in open(ROOT / "assets" / "data" / "toy_preference" / "test.jsonl")]
    pairs = [(h["chosen"], h["rejected"]) for h in held_out]
    tokenizer = load_tokenizer(str(out / "last_checkpoint"), "m")
    lengths = [len(tokenizer(p[side][-1]["content"], add_special_tokens=False)["input_ids"])
               for side in (0, 1) for p in pairs]
    correlation = {}
    for name, checkpoint in (("bt", trained / "last_checkpoint"), ("odin", out / "last_checkpoint")):
        chosen, rejected = reload_rewards(checkpoint, pairs)
        correlation[name] = float(np.corrcoef(chosen + rejected, lengths)[0, 1])
    assert correlation["bt"] > 0.3 and abs(correlation["odin"]) < correlation["bt"] - 0.2, correlation


def test_scaled_loss_applies_each_pairs_weight(tmp_path):
    """--loss_type scaled: with every weight 0 nothing is learned (held-out accuracy stays where the untrained head
    puts it), with weight 1 it learns as plain BT does."""
    rows = [json.loads(line) for line in open(ROOT / "assets" / "data" / "toy_preference" / "train.jsonl")][:400]
    accuracy = {}
    for weight in (0.0, 1.0):
        data = tmp_path / f"w{weight}.jsonl"
        data.write_text("\n".join(json.dumps({**row, "weight": weight}) for row in rows))
        out = tmp_path / f"run{weight}"
        check_ok(run([sys.executable, TRAIN, "--train_set_path", str(data), "--eval_holdout_size", "100",
                      "--loss_type", "scaled", "--output_path", str(out), "--max_steps", "30"]))
        accuracy[weight] = json.loads((out / "metrics.json").read_text())["eval_accuracy"]
    assert accuracy[1.0] > 0.9 and accuracy[0.0] < 0.75, accuracy


def test_padding_free_and_prefix_sharing_train_to_the_padded_losses(tmp_path):
    """The same 8 steps padded, padding-free and prefix-sharing (the default): losses agree to float tolerance, no
    pad token is computed without padding, and the shared contexts are computed once."""
    runs = {"padded": ("--padding_free", "false"), "packed": ("--prefix_sharing", "false"), "prefix": ()}
    metrics = {}
    for name, flags in runs.items():
        out = tmp_path / name
        check_ok(run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "8", "--logging_steps", "1",
                      "--group_by_length", "false", *flags]))
        metrics[name] = json.loads((out / "metrics.json").read_text())
    tokens = {name: m["train_tokens"] for name, m in metrics.items()}
    assert tokens["padded"]["real"] == tokens["packed"]["real"] == tokens["prefix"]["real"] > 0
    assert tokens["padded"]["padding"] > 0 and tokens["packed"]["padding"] == tokens["prefix"]["padding"] == 0
    assert tokens["packed"]["computed"] == tokens["packed"]["real"] > tokens["prefix"]["computed"]
    assert (tokens["prefix"]["padding_free"], tokens["prefix"]["prefix_sharing"]) == (True, True)
    for name in ("packed", "prefix"):
        assert metrics[name]["train_loss"] == pytest.approx(metrics["padded"]["train_loss"], rel=1e-4)
        assert metrics[name]["eval_loss"] == pytest.approx(metrics["padded"]["eval_loss"], rel=1e-3, abs=1e-5)


def test_token_budget_batches_stay_within_the_budget(tmp_path):
    out = tmp_path / "budget"
    proc = run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "4", "--max_tokens_per_batch", "300",
                "--logging_steps", "1"])
    check_ok(proc)
    assert "Token-budget batches:" in proc.stdout and "--per_device_train_batch_size is not used" in proc.stdout
    history = json.loads((out / "metrics.json").read_text())["train_tokens"]
    assert 0 < history["computed"] <= 4 * 300 and history["padding"] == 0


@pytest.mark.parametrize("flags", [("--loss_type", "odin"), ("--center_rewards_coefficient", "1.0")])
def test_held_out_loss_is_plain_bt_whatever_the_training_loss(tmp_path, flags):
    """eval_loss is mean(-log sigmoid(r_c - r_r)) over the held-out pairs, without ODIN's terms or the centering
    penalty: recomputed here from the saved checkpoint's rewards (ODIN: the quality head, exported alone), as are
    the accuracy, the mean margin and the rewards' mean and standard deviation."""
    out = tmp_path / "run"
    check_ok(run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "10", *flags]))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in open(ROOT / "assets/data/toy_preference/test.jsonl")]
    assert metrics["examples"]["eval"]["used"] == len(rows) == 200 and metrics["examples"]["eval"]["truncated"] == 0
    chosen, rejected = (torch.tensor(side, dtype=torch.float64) for side in
                        reload_rewards(str(out / "last_checkpoint"), [(r["chosen"], r["rejected"]) for r in rows]))
    plain = -torch.nn.functional.logsigmoid(chosen - rejected).mean().item()
    assert metrics["eval_loss"] == pytest.approx(plain, abs=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx((chosen > rejected).double().mean().item(), abs=1e-9)
    both = torch.cat([chosen, rejected])  # the rewards' scale, for an RL loop that normalizes by it
    assert [metrics["eval_margin"], metrics["eval_reward_mean"], metrics["eval_reward_std"]] == pytest.approx(
        [(chosen - rejected).mean().item(), both.mean().item(), both.std(correction=1).item()], abs=1e-5)
    config = json.loads((out / "last_checkpoint" / "config.json").read_text())  # OpenRLHF normalizes by them
    assert (config["mean"], config["std"]) == (metrics["eval_reward_mean"], metrics["eval_reward_std"])
    # OpenRLHF's reward model reads the base model under model. and the score head (its value_head_prefix)
    names = set(load_file(str(out / "last_checkpoint" / "model.safetensors")))
    assert "score.weight" in names and all(name.startswith("model.") for name in names - {"score.weight"})
    if "--center_rewards_coefficient" in flags:  # the penalty the training loss adds is far above the tolerance
        assert ((chosen + rejected) ** 2).mean().item() > 1e-2


def test_a_test_split_alone_is_trained_on_and_never_evaluated_on(tmp_path):
    """Data whose only split is 'test' trains on it: --eval_holdout_size pairs are held out of it, as with no test
    split (it used to be trained and evaluated on the same 400 pairs)."""
    data = tmp_path / "onlytest"
    data.mkdir()
    lines = open(ROOT / "assets/data/toy_preference/train.jsonl").readlines()[:400]
    (data / "test.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    proc = run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "3", "--train_set_path", str(data),
                "--eval_holdout_size", "100"])
    check_ok(proc)
    assert "Held out 100 of the train set's pairs for evaluation (--eval_holdout_size; its 'test' split is the train " \
           "set)" in proc.stdout
    examples = json.loads((out / "metrics.json").read_text())["examples"]
    assert examples["train"]["read"] == 400 and examples["train"]["used"] == 300
    assert examples["eval"]["used"] == 100 and examples["eval"]["source"] == "held out of --train_set_path"


def test_deepspeed_without_a_launcher_runs_as_one_process_on_cpu(tmp_path):
    """Plain `python train.py --deepspeed ...` (no deepspeed/torchrun launcher, no mpi4py): a world of one, ZeRO-3."""
    out = tmp_path / "z3"
    proc = run([sys.executable, TRAIN, "--deepspeed", "deepspeed_configs/deepspeed_3.json", "--output_path", str(out),
                "--max_steps", "2"], env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "Checkpoint verified" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["train_steps"] == 2
    assert metrics["arguments"]["deepspeed"] == "deepspeed_configs/deepspeed_3.json"
