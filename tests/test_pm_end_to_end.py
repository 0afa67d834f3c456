"""End to end for the pairwise preference model: standard pairs -> PM data -> train -> save -> reload -> RewardBench
eval -> tournament ranking; ZeRO-3 on two CPU ranks; errors a user can make."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import BIN, ROOT, check_ok, run, two_ranks
from useful_code.defaults import REPO_ROOT, REWARD_BENCH_SAMPLE
from useful_code.pm_data import build_pm_prompt
from useful_code.reward_bench import section_scores
from useful_code.templates import load_tokenizer

pytestmark = pytest.mark.e2e  # subprocesses and DeepSpeed ranks: `make test-fast` skips this file

PROCESS = str(ROOT / "pair-pm" / "process_pair_data.py")
TRAIN = str(ROOT / "pair-pm" / "train.py")
EVAL = str(ROOT / "useful_code" / "eval_reward_bench_pm.py")
RANK = str(ROOT / "pair-pm" / "rank_responses.py")
TOY = str(ROOT / "assets" / "data" / "toy_preference")


def upstream_style_prob_chosen(model, tokenizer, context, chosen, rejected):
    """P(chosen preferred), one sequence per forward, both orders averaged: upstream's loop, written out here
    independently of the batched scorer."""
    id_a, id_b = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))
    probs = []
    for chosen_position in (0, 1):
        a, b = (chosen, rejected) if chosen_position == 0 else (rejected, chosen)
        prompt = build_pm_prompt(context, a, b)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1, [id_a, id_b]]
        probs.append(torch.softmax(logits.float(), -1)[chosen_position].item())
    return float(np.mean(probs))


@pytest.fixture(scope="module")
def pm_run(tmp_path_factory):
    """Convert the toy pairs, train 120 steps with plain python, evaluate on the RewardBench sample."""
    out = tmp_path_factory.mktemp("pm")
    check_ok(run([sys.executable, PROCESS, "--dataset_path", TOY, "--output_path", str(out / "pm.jsonl")]))
    check_ok(run([sys.executable, TRAIN, "pair-pm/tiny.yaml", "--dataset_path", str(out / "pm.jsonl"),
                  "--eval_set_path", TOY, "--output_dir", str(out), "--max_steps", "120", "--learning_rate", "2e-3"]))
    check_ok(run([sys.executable, EVAL, "--reward_name_or_path", str(out / "last_checkpoint"),
                  "--data_set_name", REWARD_BENCH_SAMPLE, "--record_dir", str(out / "record.txt"),
                  "--results_json", str(out / "rb.json"), "--batch_size", "16"]))
    return out


def test_converted_data_is_upstream_layout_and_balanced(pm_run):
    rows = [json.loads(line) for line in open(pm_run / "pm.jsonl")]
    assert len(rows) == 1600 and set(rows[0]) == {"messages"}
    labels = [r["messages"][1]["content"] for r in rows]
    assert labels.count("A") == labels.count("B") == 800
    prompts = [r["messages"][0]["content"] for r in rows]
    assert all(r["messages"][0]["role"] == "user" for r in rows)
    starts = [p.startswith("[CONTEXT] \n\n<turn> user\n ") for p in prompts]
    with_system = [p.startswith("[CONTEXT] \n\n<turn> system\n ") for p in prompts]
    toy = [json.loads(line) for line in open(f"{TOY}/train.jsonl")]
    assert sum(with_system) == sum(r["chosen"][0]["role"] == "system" for r in toy) > 0
    assert all(a or b for a, b in zip(starts, with_system))


def test_training_learns_both_orders_and_checkpoint_reloads(pm_run):
    metrics = json.loads((pm_run / "metrics.json").read_text())
    assert metrics["train_steps"] == 120
    assert metrics["eval_pairs"] == 200
    assert metrics["eval_accuracy_chosen_as_A"] >= 0.9 and metrics["eval_accuracy_chosen_as_B"] >= 0.9
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["reload_max_abs_diff"] < 1e-4
    assert metrics["examples"]["train"] == {"format": "pm", "read": 1600, "invalid": {}, "used": 1600,
                                            "dropped_overlength": 0, "special_token_in_content": 0}
    checkpoint = pm_run / "last_checkpoint"
    assert (checkpoint / "model.safetensors").exists() and not list(checkpoint.glob("*.bin"))
    tokenizer = load_tokenizer(str(checkpoint), "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert config["rlhf_reward_kind"] == "pm"  # a math reward model is a causal LM too: the config tells them apart


def test_rewardbench_eval_matches_an_unbatched_upstream_style_computation(pm_run):
    results = json.loads((pm_run / "rb.json").read_text())
    rows = results["per_example"]
    assert len(rows) == 69 and len(results["subsets"]) == 23 and not results["missing_subsets"]
    assert all(r["chosen_reward"] + r["rejected_reward"] == pytest.approx(1.0) for r in rows)
    assert all(r["correct"] == float(r["chosen_reward"] > 0.5) for r in rows)
    assert results["sections"] == section_scores(results["subsets"])
    checkpoint = str(pm_run / "last_checkpoint")
    tokenizer = load_tokenizer(checkpoint, "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    sample = [json.loads(line) for line in open(REWARD_BENCH_SAMPLE)][:5]
    for example in sample:
        expected = upstream_style_prob_chosen(model, tokenizer, [{"role": "user", "content": example["prompt"]}],
                                              example["chosen"], example["rejected"])
        row = next(r for r in rows if r["id"] == example["id"])
        assert row["chosen_reward"] == pytest.approx(expected, abs=1e-4)
    lines = (pm_run / "record.txt").read_text().splitlines()
    assert lines[0] == checkpoint and lines[1] == f"Chat\t{round(results['sections']['Chat'], 2)}"


def test_rank_responses_picks_the_helpful_answer_with_n_minus_1_matches(pm_run, tmp_path):
    out = tmp_path / "ranked.jsonl"
    check_ok(run([sys.executable, RANK, "--reward_name_or_path", str(pm_run / "last_checkpoint"),
                  "--input_path", "assets/data/toy_ranking.jsonl", "--output_path", str(out)]))
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 20
    assert all(len(r["matches"]) == len(r["responses"]) - 1 for r in rows)
    assert all(r["best_response"] == r["responses"][r["best_index"]] for r in rows)
    assert sum(r["best_index"] == r["helpful_index"] for r in rows) >= 18
    # Data-parallel on two ranks: the same winners and match probabilities, one output written by the first rank.
    split = tmp_path / "ranked_2.jsonl"
    check_ok(run([*two_ranks("torchrun"), RANK, "--reward_name_or_path",
                  str(pm_run / "last_checkpoint"), "--input_path", "assets/data/toy_ranking.jsonl", "--output_path",
                  str(split)], env_extra={"OMP_NUM_THREADS": "1"}))
    split_rows = [json.loads(line) for line in open(split)]
    assert [r["best_index"] for r in split_rows] == [r["best_index"] for r in rows]
    for one, two in zip(rows, split_rows):
        assert [m[:2] for m in two["matches"]] == [m[:2] for m in one["matches"]]
        assert [m[2] for m in two["matches"]] == pytest.approx([m[2] for m in one["matches"]], abs=1e-5)
    # Padded batches (--max_tokens_per_batch 0) instead of packed rows: the same winners and probabilities.
    padded = tmp_path / "ranked_padded.jsonl"
    check_ok(run([sys.executable, RANK, "--reward_name_or_path", str(pm_run / "last_checkpoint"), "--input_path",
                  "assets/data/toy_ranking.jsonl", "--output_path", str(padded), "--max_tokens_per_batch", "0"]))
    for one, other in zip(rows, [json.loads(line) for line in open(padded)]):
        assert other["best_index"] == one["best_index"] and [m[:2] for m in other["matches"]] == \
            [m[:2] for m in one["matches"]]
        assert [m[2] for m in other["matches"]] == pytest.approx([m[2] for m in one["matches"]], abs=1e-5)


def test_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "[CONTEXT] x [RESPONSE A] a [RESPONSE B] b \n"},
                          {"role": "assistant", "content": "A"}]}] * 3
    rows[2] = {"messages": [rows[0]["messages"][0], {"role": "assistant", "content": "C"}]}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run([sys.executable, TRAIN, "--dataset_path", str(bad), "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "row 2 (bad_label)" in proc.stderr
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1.0e-5\nno_such_field: 3\n")
    proc = run([sys.executable, TRAIN, str(config)])
    assert proc.returncode == 2 and "no_such_field" in proc.stderr and "Traceback" not in proc.stderr
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    proc = run([sys.executable, TRAIN, "--dataset_path", str(good), "--max_length", "8",
                "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "longer than max_length=8" in proc.stderr and "--overlength drop" in proc.stderr
    assert "(first: 50 tokens, beginning 'user [CONTEXT] x [RESPONSE A] a" in proc.stderr


def test_packing_trains_and_the_checkpoint_verifies(tmp_path):
    proc = run([sys.executable, TRAIN, "--packing", "true", "--max_steps", "4", "--eval_holdout_size", "20",
                "--output_dir", str(tmp_path)])
    check_ok(proc)
    assert "Checkpoint verified" in proc.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["train_steps"] == 4


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed launcher not installed")
def test_zero3_two_ranks_on_cpu_saves_a_complete_checkpoint(tmp_path):
    proc = run([*two_ranks("deepspeed"), TRAIN, "pair-pm/tiny.yaml",
                "--deepspeed", "deepspeed_configs/deepspeed_3.json", "--output_dir", str(tmp_path), "--max_steps", "6"],
               env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "Checkpoint verified" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 6
    weights = load_file(str(tmp_path / "last_checkpoint" / "model.safetensors"))
    base = load_file(str(REPO_ROOT / "assets" / "tiny-llama" / "model.safetensors"))
    assert set(weights) >= set(base) - {"lm_head.weight"}
    for name, tensor in base.items():
        if name in weights:
            assert weights[name].shape == tensor.shape, name


def test_resume_gives_the_uninterrupted_weights(pm_run, tmp_path):
    """A run stopped after its step-6 checkpoint, resumed with 'latest', ends with the uninterrupted run's weights
    (CPU, fp32: exactly). The kill itself is the BT trainer's test; both resume through the Trainer."""
    flags = ["pair-pm/tiny.yaml", "--dataset_path", str(pm_run / "pm.jsonl"), "--eval_set_path", TOY,
             "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "6"]
    check_ok(run([sys.executable, TRAIN, *flags, "--output_dir", str(tmp_path / "whole")]))
    # TRL's SFTTrainer drafts a model card into the output directory at each save ("fine-tuned from [None]"): gone
    first_run = tmp_path / "whole"
    assert not (first_run / "README.md").exists() and (first_run / "last_checkpoint" / "README.md").exists()
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    proc = run([sys.executable, TRAIN, *flags, "--output_dir", str(tmp_path / "resumed"),
                "--resume_from_checkpoint", "latest"])
    check_ok(proc)
    assert f"Resuming from {tmp_path / 'resumed' / 'checkpoint-6'}" in proc.stdout
    whole = load_file(tmp_path / "whole" / "last_checkpoint" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last_checkpoint" / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_training_leaves_curves_and_a_model_card(pm_run):
    assert (pm_run / "curves.png").read_bytes().startswith(b"\x89PNG")
    card = (pm_run / "last_checkpoint" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card


def test_lora_merged_checkpoint_is_a_plain_causal_lm_equal_to_the_adapter_model(pm_run, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    check_ok(run([sys.executable, TRAIN, "pair-pm/tiny.yaml", "--dataset_path", str(pm_run / "pm.jsonl"),
                  "--eval_set_path", TOY, "--output_dir", str(out), "--max_steps", "12", "--use_peft",
                  "--learning_rate", "5e-3"]))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    tokenizer = load_tokenizer(str(out / "last_checkpoint"), "m")
    merged = AutoModelForCausalLM.from_pretrained(out / "last_checkpoint").eval()
    base = AutoModelForCausalLM.from_pretrained(ROOT / "assets" / "tiny-llama")
    base.resize_token_embeddings(len(tokenizer))
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": build_pm_prompt(
        [{"role": "user", "content": "Hi"}], "Hello! How can I help?", "Go away.")}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4)


def test_rank_responses_checks_every_line_before_loading_the_model(tmp_path):
    # --reward_name_or_path holds a tokenizer and no model: each of these lines is refused first, naming its number
    # and rule (a special token's text needs the tokenizer).
    from useful_code.defaults import DEFAULT_MODEL

    load_tokenizer(DEFAULT_MODEL, "m").save_pretrained(tmp_path / "no_model")
    context = [{"role": "user", "content": "Name a colour."}]
    good = {"context": context, "responses": ["Red.", "Blue."]}
    for bad, expected in [
        ({"prompt": "q", "responses": ["a<|eot_id|>", "b"]}, "line 2: special_token_in_content"),
        # score_dataset's context columns are read too: this line is valid, and the model's absence is next
        ({"messages": context, "responses": ["a", "b"]}, "--reward_name_or_path"),
        ({"context": "hello there", "responses": ["a", "b"]}, "line 2: bad_prompt: needs 'prompt' (a non-empty "
                                                              "string or a message list) or 'context'"),
        ([1, 2], "line 2: not a JSON object (list)"),
        ({"prompt": ["x"], "responses": ["a", "b"]}, "line 2: bad_prompt"),
        ({"prompt": "q", "responses": ["a", 3]}, "line 2: not_a_response_list: responses must be a non-empty list of "
                                                 "strings"),
        ({"prompt": "q", "responses": ["a", " "]}, "line 2 response 1: empty_response: no response may be empty"),
        ({"context": context + [{"role": "assistant", "content": "Hm."}], "responses": ["a"]},
         "line 2: roles_not_alternating"),
    ]:
        path = tmp_path / "in.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        proc = run([sys.executable, RANK, "--reward_name_or_path", str(tmp_path / "no_model"), "--input_path",
                    str(path), "--output_path", str(tmp_path / "out.jsonl"),
                    "--local_rank=0"])  # as the deepspeed launcher passes it
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        where = "" if expected.startswith("--") else "--input_path "
        assert last.startswith(f"error: {where}{expected}"), proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_nan_checkpoint_stops_ranking_with_one_line(tmp_path):
    from useful_code.defaults import DEFAULT_MODEL
    from useful_code.modeling import load_preference_model

    tokenizer = load_tokenizer(DEFAULT_MODEL, "m")
    model = load_preference_model(DEFAULT_MODEL, "m", tokenizer, torch.float32)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_pm")
    tokenizer.save_pretrained(tmp_path / "nan_pm")
    out = tmp_path / "ranked.jsonl"
    proc = run([sys.executable, RANK, "--reward_name_or_path", str(tmp_path / "nan_pm"), "--input_path",
                "assets/data/toy_ranking.jsonl", "--output_path", str(out)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the preference model gave non-finite (NaN or infinite) A/B logits or probabilities for 80 of 80 "
        "scored sequences (first: pair 0 of 40 (0-based), prompt ")
    assert not out.exists()  # before the fix: NaN written into the JSON and exit 0


def test_process_pair_data_refuses_its_input_spelled_another_way(tmp_path):
    check_ok(run([sys.executable, PROCESS, "--dataset_path", TOY, "--output_path", str(tmp_path / "pm_dir")]))
    proc = run([sys.executable, PROCESS, "--dataset_path", str(tmp_path / "pm_dir"), "--output_path",
                f"{tmp_path}/./pm_dir/"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --output_path: {tmp_path}/./pm_dir/ is an input of this "
                                                    f"run ({tmp_path / 'pm_dir'}); give a new directory")


def test_process_pair_data_with_every_row_invalid_says_so_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "no markers", "rejected": "none either"}\n')
    proc = run([sys.executable, PROCESS, "--dataset_path", str(bad), "--output_path", str(tmp_path / "out.jsonl"),
                "--skip_invalid"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}: 1 read, all invalid (unparseable_hh: 1)" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "error: no valid pairs to write"
    assert not (tmp_path / "out.jsonl").exists()
