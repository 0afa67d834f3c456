"""End to end for ArmoRM: the four stages on the bundled toy data with the tiny backbone, sharded prepare,
unembedded over-long pairs kept aligned, export round trip (exported score == stage-2 score), evaluation of the
export through the BT eval, interpretation, and the trust_remote_code guard."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import BIN, ROOT, Server, check_ok, run
from useful_code.armo_data import ATTRIBUTES, VERBOSITY_INDEX, load_shards
from useful_code.armo_fit import RIDGE_ALPHAS, verbosity_penalties
from useful_code.defaults import REWARD_BENCH_SAMPLE
from useful_code.reward_client import RewardClient
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer

pytestmark = pytest.mark.e2e  # subprocesses and DeepSpeed ranks: `make test-fast` skips this file

ARMO = ROOT / "armo-rm"
BENCH = REWARD_BENCH_SAMPLE


def stage(name, *flags):
    return [sys.executable, str(ARMO / name), *map(str, flags)]


@pytest.fixture(scope="module")
def armo(tmp_path_factory):
    """All stages with small settings; stage-1 prepare in 2 shards, the reference split cut at 120 tokens."""
    out = tmp_path_factory.mktemp("armo")
    emb = out / "emb"
    for shard in (2, 1):  # out of order on purpose
        check_ok(run(stage("stage-1_prepare.py", "--output_dir", emb, "--n_shards", 2, "--shard_idx", shard)))
    check_ok(run(stage("stage-1_train.py", "--embeddings_dir", emb, "--output_dir", out / "rw")))
    check_ok(run(stage("stage-2_prepare.py", "--output_dir", emb)))
    proc = run(stage("stage-2_prepare.py", "--output_dir", emb, "--dataset_split", "test", "--seq_len", 120))
    check_ok(proc)
    out.joinpath("prepare_test.log").write_text(proc.stdout)
    check_ok(run(stage("stage-2_prepare.py", "--output_dir", emb, "--dataset_path", BENCH)))
    check_ok(run(stage("stage-2_train.py", "--embeddings_dir", emb,
                       "--regression_weights", out / "rw" / "tiny-llama_toy_multi_objective.safetensors",
                       "--reference_split", "test", "--n_steps", 200, "--batch_size", 128, "--hidden_size", 32,
                       "--output_dir", out / "head", "--eval_reward_bench", "--reward_bench_dataset", BENCH,
                       "--reward_bench_split", "train")))
    proc = run(stage("export.py", "--head_dir", out / "head", "--output_path", out / "model"))
    check_ok(proc)
    assert "Checkpoint verified: the reloaded scores match stage 2's scores from embeddings" in proc.stdout
    return out


def test_stage1_merges_shards_in_row_order_and_fits_19_probes(armo):
    tensors, metadata = load_shards(str(armo / "emb" / "toy_multi_objective"))
    assert metadata["n_shards"] == 2 and torch.equal(tensors["row_ids"], torch.arange(600))
    assert tensors["labels"].shape == (600, 19) and tensors["embeddings"].shape == (600, 64)
    rows = [json.loads(line) for line in open(ROOT / "assets/data/toy_multi_objective/train.jsonl")]
    # Upstream's order: its stage-1 prepare runs ds.shuffle(seed=0) first, a numpy permutation of the rows.
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    expected = torch.tensor([[float("nan") if r[a] is None else r[a] for a in ATTRIBUTES] for r in rows])
    assert torch.equal(tensors["labels"].nan_to_num(-7), expected.nan_to_num(-7))  # labels stay with their rows
    weights = load_file(str(armo / "rw" / "tiny-llama_toy_multi_objective.safetensors"))["weight"]
    assert weights.shape == (19, 64) and torch.all(weights.abs().sum(1) > 0)
    summary = json.loads((armo / "rw" / "tiny-llama_toy_multi_objective.json").read_text())
    assert all(a in RIDGE_ALPHAS for a in summary["alpha"])
    labelled = (~torch.isnan(tensors["labels"])).sum(0).tolist()
    assert [t + v for t, v in zip(summary["n_train"], summary["n_val"])] == labelled
    assert (summary["arguments"]["seed"], summary["arguments"]["val_fraction"]) == (42, 0.2)  # they pick the alphas


def test_stage2_keeps_overlong_pairs_aligned_and_reports_them(armo):
    tensors, metadata = load_shards(str(armo / "emb" / "toy_preference-test"))
    assert len(tensors["embedded"]) == 200 and metadata["not_embedded"] == int((~tensors["embedded"]).sum()) > 0
    assert torch.all(tensors["embeddings"][~tensors["embedded"]] == 0)
    assert f"{metadata['not_embedded']} longer than --seq_len=120" in (armo / "prepare_test.log").read_text()
    bench, bench_meta = load_shards(str(armo / "emb" / "reward_bench_sample-train"))
    sample = [json.loads(line) for line in open(BENCH)]
    assert bench_meta["subsets"] == [r["subset"] for r in sample] and bench_meta["ids"] == [r["id"] for r in sample]
    # Chosen and rejected share the context, so their gating embeddings are the same (causal attention).
    assert torch.allclose(bench["prompt_embeddings"][:, 0], bench["prompt_embeddings"][:, 1], atol=1e-5)


def test_stage2_head_and_export_agree_with_the_bt_eval(armo, tmp_path):
    head = json.loads((armo / "head" / "armo_head.json").read_text())
    assert head["penalty"][VERBOSITY_INDEX] == 1.0 and len(head["penalty"]) == 19
    assert 0.0 <= head["val_accuracy"] <= 1.0 and head["val_pairs"] == 320
    config = json.loads((armo / "model" / "config.json").read_text())
    assert config["attribute_names"] == list(ATTRIBUTES) and config["num_objectives"] == 19
    assert (armo / "model" / "modeling_armo_rm.py").exists() and not list((armo / "model").glob("*.bin"))
    # The exported model, scored by the BT eval, gives the sections stage 2 computed from embeddings.
    results = tmp_path / "rb.json"
    check_ok(run([sys.executable, str(ROOT / "useful_code/eval_reward_bench_bt.py"), "--trust_remote_code",
                  "--reward_name_or_path", str(armo / "model"), "--data_set_name", BENCH,
                  "--record_dir", str(tmp_path / "rb.txt"), "--results_json", str(results)]))
    from_embeddings = json.loads((armo / "head" / "reward_bench.json").read_text())
    exported = json.loads(results.read_text())
    assert exported["sections"] == from_embeddings["sections"]
    for a, b in zip(exported["per_example"], from_embeddings["per_example"]):
        assert a["id"] == b["id"] and a["chosen_reward"] == pytest.approx(b["chosen_reward"], abs=1e-4)


def test_exported_model_outputs_and_interpretation(armo):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(armo / "model"), trust_remote_code=True).eval()
    tokenizer = load_tokenizer(str(armo / "model"), "m")
    messages = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix, rise, bake."}]
    ids = torch.tensor(encode_conversations(tokenizer, [messages]))
    result = model.explain(ids, top_k=3)
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.rewards.shape == (1, 19) and out.gating_output.shape == (1, 19) and out.logits.shape == (1, 1)
    # score = sum_k rewards_k * coefficient_k (upstream README's identity), and the top-K are the largest |coeff|.
    assert sum(result["rewards"][a] * result["coefficients"][a] for a in result["rewards"]) == pytest.approx(
        result["score"], abs=1e-5)
    coefficients = sorted(result["coefficients"].values(), key=abs, reverse=True)
    assert [c for _, c, _ in result["top"]] == pytest.approx(coefficients[:3])
    assert type(model).__name__ == "ArmoRMForSequenceClassification"  # the shipped code, not the stock Llama head


def test_an_eval_cut_past_the_gating_position_names_the_example(armo, tmp_path):
    """A --max_length that cuts a conversation's user turn off: the model's own forward raised, naming a batch row."""
    proc = run([sys.executable, str(ROOT / "useful_code/eval_reward_bench_bt.py"), "--trust_remote_code",
                "--reward_name_or_path", str(armo / "model"), "--data_set_name", BENCH, "--max_length", "20",
                "--record_dir", str(tmp_path / "r.txt")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first_id = json.loads(open(BENCH).readline())["id"]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: example {first_id} (chosen) does not hold the gating pattern")
    assert "after the cut from the left to max_length=20 tokens" in proc.stderr


def test_custom_code_needs_trust_remote_code(armo, tmp_path):
    proc = run([sys.executable, str(ROOT / "useful_code/eval_reward_bench_bt.py"), "--reward_name_or_path",
                str(armo / "model"), "--data_set_name", BENCH, "--record_dir", str(tmp_path / "r.txt")])
    assert proc.returncode == 2 and "--trust_remote_code" in proc.stderr and "Traceback" not in proc.stderr


def test_stage1_takes_upstreams_embeddings_prefix_too(armo, tmp_path):
    """Upstream's --embeddings_dir is the shards' path prefix (<dir>/<dataset>), this project's their folder: both
    read the same shards and fit the same probes."""
    check_ok(run(stage("stage-1_train.py", "--embeddings_dir", armo / "emb" / "toy_multi_objective", "--output_dir",
                       tmp_path / "rw")))
    name = "tiny-llama_toy_multi_objective.safetensors"
    assert torch.equal(load_file(tmp_path / "rw" / name)["weight"], load_file(armo / "rw" / name)["weight"])


def test_missing_shard_is_one_clear_error(tmp_path):
    emb = tmp_path / "emb"
    check_ok(run(stage("stage-1_prepare.py", "--output_dir", emb, "--n_shards", 3, "--shard_idx", 1)))
    proc = run(stage("stage-1_train.py", "--embeddings_dir", emb, "--output_dir", tmp_path / "rw"))
    assert proc.returncode == 2 and "shards [2, 3] of 3 are missing" in proc.stderr


def test_stage2_resume_gives_the_uninterrupted_head(armo, tmp_path):
    common = ["--embeddings_dir", armo / "emb", "--regression_weights", armo / "rw", "--reference_split", "test",
              "--n_steps", 30, "--batch_size", 64, "--hidden_size", 32, "--save_every_steps", 10]
    check_ok(run(stage("stage-2_train.py", *common, "--output_dir", tmp_path / "whole")))
    proc = run(stage("stage-2_train.py", *common, "--output_dir", tmp_path / "whole"))  # a finished run is kept
    assert proc.returncode == 2 and "holds a finished run (armo_head.json)" in proc.stderr
    (tmp_path / "resumed").mkdir()
    (tmp_path / "whole" / "checkpoint-10").rename(tmp_path / "resumed" / "checkpoint-10")  # a run stopped at 10
    # other settings would mix two runs in one head (--seed redraws the validation split): one line, nothing written
    other = [*common[:-1], 5, "--seed", 7, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest"]
    proc = run(stage("stage-2_train.py", *other))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"--resume_from_checkpoint {tmp_path / 'resumed' / 'checkpoint-10'} was saved by a run with other "
            "settings (--seed 0 -> 7): resume with the saved ones") in proc.stderr
    proc = run(stage("stage-2_train.py", *common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint",
                     "latest"))
    check_ok(proc)
    assert f"Resuming from {tmp_path / 'resumed' / 'checkpoint-10'}" in proc.stdout
    whole = load_file(tmp_path / "whole" / "armo_head.safetensors")
    resumed = load_file(tmp_path / "resumed" / "armo_head.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    for script in ("stage-1_prepare.py", "stage-2_prepare.py", "stage-1_train.py"):
        proc = run(stage(script, "--output_dir", tmp_path / "file" / "sub"))
        assert proc.returncode == 2 and "--output_dir: cannot write to" in proc.stderr, script
        assert "Traceback" not in proc.stderr
    proc = run(stage("export.py", "--output_path", tmp_path / "file"))
    assert proc.returncode == 2 and "the export is a model directory" in proc.stderr
    (tmp_path / "head").mkdir()
    torch.save({"gating.w": torch.zeros(2)}, tmp_path / "head" / "armo_head.safetensors")  # pickled, not safetensors
    (tmp_path / "head" / "armo_head.json").write_text("{}")
    line = error_line(run(stage("export.py", "--head_dir", tmp_path / "head", "--output_path", tmp_path / "m")))
    assert line.startswith(f"error: --head_dir: {tmp_path / 'head'}: ") and line.endswith(
        "; run armo-rm/stage-2_train.py first")


def test_served_armo_model_gives_the_eval_rewards_and_its_attributes(armo):
    conversations = [[{"role": "user", "content": "How do I grow tomatoes?"},
                      {"role": "assistant", "content": answer}]
                     for answer in ("Pick a sunny spot and plant them in rich soil.", "No idea, go away.")]
    with Server(armo / "model", trust_remote_code=True) as server:
        scored = RewardClient(server.url).score(conversations)
        assert RewardClient(server.url).info()["attributes"] == list(ATTRIBUTES)
        tokenizer, model = server.scorer.tokenizer, server.scorer.model
        expected = score_sequences(model, tokenizer, encode_conversations(tokenizer, conversations), batch_size=1)
        direct = model(input_ids=torch.tensor([encode_conversations(tokenizer, conversations[:1])[0]]))
    assert scored["rewards"] == pytest.approx(expected, abs=1e-5)
    assert len(scored["attribute_rewards"][0]) == len(scored["gating_weights"][0]) == len(ATTRIBUTES) == 19
    assert scored["attribute_rewards"][0] == pytest.approx(direct.rewards[0].tolist(), abs=1e-5)
    assert scored["gating_weights"][0] == pytest.approx(direct.gating_output[0].tolist(), abs=1e-5)


def error_line(proc) -> str:
    """The one line a user error prints (exit 2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_stage2_train_refuses_unusable_inputs_in_one_line(armo, tmp_path):
    # A split none of whose pairs was embedded (all longer than --seq_len) as the reference set, then as the
    # preference set: upstream's penalties would all silently be 1.0, and sklearn would raise on 0 pairs.
    emb = tmp_path / "emb"
    check_ok(run(stage("stage-2_prepare.py", "--output_dir", emb, "--dataset_split", "test", "--seq_len", 4)))
    for shard in (armo / "emb").glob("toy_preference-train-*"):
        (emb / shard.name).write_bytes(shard.read_bytes())
    common = ["--embeddings_dir", emb, "--regression_weights", armo / "rw", "--n_steps", 5, "--batch_size", 8,
              "--hidden_size", 8, "--output_dir", tmp_path / "head"]
    line = error_line(run(stage("stage-2_train.py", *common, "--reference_split", "test")))
    assert line.startswith("error: reference dataset ") and "toy_preference (test): none of its 200 pairs is " \
        "embedded (each is longer than the --seq_len stage-2_prepare.py was run with" in line
    line = error_line(run(stage("stage-2_train.py", *common, "--preference_split", "test", "--reference_split",
                                "train")))
    assert line.startswith("error: preference dataset ") and "toy_preference (test): none of its 200 pairs" in line
    torch.save({"weight": torch.zeros(19, 64)}, tmp_path / "upstream.pt")
    for flags, expected in [
        (["--regression_weights", tmp_path / "none.safetensors"],
         f"error: --regression_weights: no regression weights file at {tmp_path / 'none.safetensors'}; run "
         "armo-rm/stage-1_train.py"),
        (["--regression_weights", tmp_path / "upstream.pt"],
         f"error: --regression_weights: {tmp_path / 'upstream.pt'} is not a safetensors file"),
        (["--verbosity_dim", 19], "error: --verbosity_dim must be at most 18, got 19"),
        (["--verbosity_dim", -1], "error: --verbosity_dim must be at least 0, got -1"),
        (["--val_fraction", 1], "error: --val_fraction 1.0 splits 1600 embedded preference pairs into 0 train and "
                                "1600 validation rows; both need at least one"),
        (["--learning_rate", 1e30], "error: training diverged: the loss is nan at step "),
        # the one update, after the one checked loss: the validation scores are NaN (an accuracy 0 was published)
        (["--n_steps", 1, "--batch_size", 128, "--hidden_size", 32, "--learning_rate", 1e30],
         "error: training diverged: the trained gating network gives NaN or infinite scores on "),
    ]:
        line = error_line(run(stage("stage-2_train.py", *common, "--reference_split", "train", *flags)))
        assert line.startswith(expected), line
    assert not (tmp_path / "head" / "armo_head.json").exists()
    line = error_line(run(stage("stage-1_train.py", "--embeddings_dir", armo / "emb", "--output_dir", tmp_path / "rw",
                                "--val_fraction", 0)))
    assert line == ("error: --val_fraction 0.0 splits 600 embedding rows into 600 train and 0 validation rows; both "
                    "need at least one (the fraction must lie strictly between 0 and 1)")


def backbone_with_template(path, template):
    """A copy of the tiny backbone whose chat template is template (the weights are the same)."""
    from useful_code.defaults import DEFAULT_MODEL

    shutil.copytree(DEFAULT_MODEL, path)
    (path / "chat_template.jinja").write_text(template)
    return path


def test_an_export_with_another_backbone_than_the_heads_is_refused(armo, tmp_path):
    line = error_line(run(stage("export.py", "--model_path", backbone_with_template(tmp_path / "other", "{{ 'x' }}"),
                                "--head_dir", armo / "head", "--output_path", tmp_path / "model")))
    assert "was made with the backbone" in line and "not --model_path" in line and not (tmp_path / "model").exists()


def test_a_template_that_refuses_system_turns(armo, tmp_path):
    # Gemma-2's template raises "System role not supported"; the toy pairs have system turns (row 0 among them).
    from useful_code.defaults import DEFAULT_MODEL

    own = (ROOT / DEFAULT_MODEL / "chat_template.jinja").read_text()
    gemma_like = backbone_with_template(tmp_path / "no_system", "{% if messages[0]['role'] == 'system' %}{{ "
                                        "raise_exception('System role not supported') }}{% endif %}" + own)
    line = error_line(run(stage("stage-2_prepare.py", "--model_path", gemma_like, "--dataset_split", "test",
                                "--output_dir", tmp_path / "emb")))
    assert "15 of 200 rows are invalid (chat_template_rejects: 15); first: row 0 (chat_template_rejects)" in line
    assert "(it raised: 'System role not supported')" in line and "--skip_invalid" in line
    proc = run(stage("stage-2_prepare.py", "--model_path", gemma_like, "--dataset_split", "test", "--output_dir",
                     tmp_path / "emb", "--skip_invalid", "true"))
    check_ok(proc)
    assert "dropped 15 of 200 invalid rows (--skip_invalid): chat_template_rejects: 15" in proc.stdout
    assert "185 of 185 pairs embedded" in proc.stdout

    # The export check scores the toy pairs the template accepts (a system turn dropped when it refuses it). The
    # head was trained on the same weights under another path: recorded as this backbone's, as if trained on it.
    head = tmp_path / "head"
    shutil.copytree(armo / "head", head)
    summary = json.loads((head / "armo_head.json").read_text())
    summary["arguments"]["model_path"] = str(gemma_like)
    (head / "armo_head.json").write_text(json.dumps(summary))
    proc = run(stage("export.py", "--model_path", gemma_like, "--head_dir", head, "--output_path",
                     tmp_path / "model"))
    check_ok(proc)
    assert "Checkpoint verified: the reloaded scores match stage 2's scores from embeddings" in proc.stdout
    assert "on 16 inputs" in proc.stdout

    # A template that accepts no toy pair (only short replies, as gating_pattern's probes are; every toy pair's
    # chosen reply is longer): one line, and neither a model nor a staging directory is left.
    refusing = backbone_with_template(tmp_path / "user_only", "{% for m in messages %}{% if m['role'] == 'assistant' "
                                      "and m['content'] | length > 40 %}{{ raise_exception('No replies here') }}"
                                      "{% endif %}{% endfor %}" + own)
    summary["arguments"]["model_path"] = str(refusing)
    (head / "armo_head.json").write_text(json.dumps(summary))
    line = error_line(run(stage("export.py", "--model_path", refusing, "--head_dir", head, "--output_path",
                                tmp_path / "out" / "model")))
    assert line.startswith("error: export check: the chat template of --model_path accepts none of the toy pairs")
    assert "row 0: No replies here" in line
    assert list((tmp_path / "out").iterdir()) == []


def run_in(cwd, cmd):
    """helpers.run from another working directory: the scripts' default ./armo_data paths land under cwd."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_upstream_readme_commands_use_the_reference_train_split_they_embed(tmp_path):
    """Upstream's armo-rm/README.md commands, as written, with the tiny model and the toy data in place of the hub's
    backbone, multi-objective and preference data (the project's defaults). The reference dataset and RewardBench
    keep their hub names in stage-2_train.py: local files of the same names are embedded under them. The reference is
    embedded with stage-2_prepare's default split (train), as upstream's README does, and stage 2 must use it (the
    tiny recipe made it look for a test split), saying which split and file it used."""
    from useful_code.defaults import DEFAULT_MODEL, DEFAULT_MULTI_OBJECTIVE_DATA, DEFAULT_PREFERENCE_DATA

    model, mo, prefs = DEFAULT_MODEL, DEFAULT_MULTI_OBJECTIVE_DATA, DEFAULT_PREFERENCE_DATA
    uf = tmp_path / "UltraFeedback-preference-standard"  # train: the 200 toy test pairs; test: 40 toy train pairs
    uf.mkdir()
    shutil.copy(ROOT / prefs / "test.jsonl", uf / "train.jsonl")
    (uf / "test.jsonl").write_text("".join(open(ROOT / prefs / "train.jsonl").readlines()[:40]))
    shutil.copy(BENCH, tmp_path / "reward-bench.jsonl")
    for cmd in (
        ["stage-1_prepare.py", "--model_path", model, "--dataset_path", mo, "--n_shards", 1, "--shard_idx", 1,
         "--device", 0],
        ["stage-1_train.py", "--model_path", model, "--dataset_path", mo],
        ["stage-2_prepare.py", "--model_path", model, "--model_family", "llama3", "--dataset_path", prefs,
         "--dataset_split", "train", "--n_shards", 1, "--shard_idx", 1, "--device", 0],
        ["stage-2_prepare.py", "--model_path", model, "--model_family", "llama3", "--dataset_path", uf],
        ["stage-2_prepare.py", "--model_path", model, "--model_family", "llama3", "--dataset_path",
         tmp_path / "reward-bench.jsonl", "--dataset_split", "filtered"],
    ):
        check_ok(run_in(tmp_path, stage(*cmd)))
    emb = "armo_data/embeddings/tiny-llama"
    train = ["stage-2_train.py", "--model_path", model, "--model_family", "llama3", "--multi_objective_dataset", mo,
             "--preference_dataset", prefs, "--reference_dataset", "RLHFlow/UltraFeedback-preference-standard",
             "--eval_reward_bench", "--device", 0]
    weight = load_file(tmp_path / "armo_data/regression_weights/tiny-llama_toy_multi_objective.safetensors")["weight"]

    def expected_penalties(split):
        pairs, _ = load_shards(str(tmp_path / emb / f"UltraFeedback-preference-standard-{split}"))
        return verbosity_penalties((pairs["embeddings"].float() @ weight.T).reshape(-1, 19).numpy())["penalty"]

    proc = run_in(tmp_path, stage(*train))
    check_ok(proc)
    reference_line = ("Reference pairs (verbosity debiasing): RLHFlow/UltraFeedback-preference-standard, split train: "
                      f"{emb}/UltraFeedback-preference-standard-train-00001-of-00001.safetensors")
    assert proc.stdout.count("Reference pairs (verbosity debiasing)") == 1 and reference_line in proc.stdout
    assert (f"Preference pairs (gating network): {prefs}, split train: "
            f"{emb}/toy_preference-train-00001-of-00001.safetensors") in proc.stdout
    assert (f"RewardBench pairs (--eval_reward_bench): allenai/reward-bench, split filtered: "
            f"{emb}/reward-bench-filtered-00001-of-00001.safetensors") in proc.stdout
    assert "1600 of 1600 preference pairs embedded; 200 of 200 reference pairs" in proc.stdout
    head = json.loads((tmp_path / "armo_data/gating_network/tiny-llama/armo_head.json").read_text())
    assert head["penalty"] == pytest.approx(expected_penalties("train").tolist())
    assert head["arguments"]["reference_split"] is None and head["val_pairs"] == 320
    assert sum(head["reward_bench"]["sections"].values()) > 0

    # A test split embedded too changes nothing: the default stays train; --reference_split test picks it, and says so.
    check_ok(run_in(tmp_path, stage("stage-2_prepare.py", "--model_path", model, "--dataset_path", uf,
                                    "--dataset_split", "test")))
    assert not (expected_penalties("test") == expected_penalties("train")).all()  # the two splits are told apart
    for flags, split, n_pairs in (([], "train", 200), (["--reference_split", "test"], "test", 40)):
        out = tmp_path / f"head-{split}"  # a few steps: the penalties come before the gating network
        proc = run_in(tmp_path, stage(*train, *flags, "--output_dir", out, "--n_steps", 5))
        check_ok(proc)
        assert reference_line.replace("-train-", f"-{split}-").replace("split train", f"split {split}") in proc.stdout
        assert f"1600 of 1600 preference pairs embedded; {n_pairs} of {n_pairs} reference pairs" in proc.stdout
        penalty = json.loads((out / "armo_head.json").read_text())["penalty"]
        assert penalty == pytest.approx(expected_penalties(split).tolist())

    # A split that was not embedded: one line naming what is there and the flag that picks it.
    line = error_line(run_in(tmp_path, stage(*train, "--reference_split", "validation", "--output_dir",
                                             tmp_path / "head-none")))
    assert line == (f"error: no embedding shards found at ./{emb}/UltraFeedback-preference-standard-validation-*-of-*"
                    f".safetensors; run the prepare stage; {emb} holds UltraFeedback-preference-standard-test, "
                    "UltraFeedback-preference-standard-train: pick the split with --reference_split")
