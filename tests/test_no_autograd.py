"""Every scoring forward runs without autograd. The rule checked: a module in eval mode never runs a forward with
grad enabled (training forwards run in train mode; every score, reload check, export check and benchmark runs in
eval mode), enforced by a global forward pre-hook. In process for the library's scoring functions; in one
subprocess for the scripts (training with its reload check, evals, ranking, the ArmoRM stages and export,
benchmarks)."""

import json
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import check_ok, run
from useful_code.armo_embeddings import embed, gating_pattern
from useful_code.defaults import DEFAULT_MODEL, REWARD_BENCH_SAMPLE
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer

# The guard, as source: installed in this process by the fixture and in the scripts' subprocess by the driver.
NO_GRAD_GUARD = '''
import torch
EVAL_FORWARDS = []
def no_grad_in_eval(module, args):
    if not module.training:
        EVAL_FORWARDS.append(type(module).__name__)
        if torch.is_grad_enabled():
            raise AssertionError(f"{type(module).__name__}.forward ran in eval mode with grad enabled")
'''


@pytest.fixture
def guard():
    """Install the global hook for one test; yield the names of the modules it saw run in eval mode."""
    namespace = {}
    exec(NO_GRAD_GUARD, namespace)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(namespace["no_grad_in_eval"])
    yield namespace["EVAL_FORWARDS"]
    handle.remove()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "m")


CONVERSATIONS = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
                 [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def test_the_guard_catches_a_forward_with_grad(guard, tok):
    model = AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL, num_labels=1).eval()
    with pytest.raises(AssertionError, match="eval mode with grad enabled"):
        model(input_ids=torch.tensor(encode_conversations(tok, CONVERSATIONS[:1])))


def test_library_scoring_runs_without_grad(guard, tok):
    sequences = encode_conversations(tok, CONVERSATIONS)
    reward_model = AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL, num_labels=1).eval()
    reward_model.config.pad_token_id = tok.pad_token_id
    assert len(score_sequences(reward_model, tok, sequences, batch_size=2)) == 2

    scorer = PairPreferenceScorer(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval(), tok)
    assert scorer.knockout(CONVERSATIONS[0][:1], ["a", "b", "c"]).winner in (0, 1, 2)

    backbone = AutoModel.from_pretrained(DEFAULT_MODEL).eval()
    last, gated = embed(backbone, tok, sequences, 2, gating_pattern(tok), progress=False)
    assert last.shape == gated.shape == (2, backbone.config.hidden_size)
    assert {"LlamaForSequenceClassification", "LlamaForCausalLM", "LlamaModel"} <= set(guard)  # all were checked


@pytest.mark.e2e
def test_scripts_score_without_grad(tmp_path):
    """Each script in turn in one interpreter (runpy, as `python script.py` runs it), under the guard."""
    bt, pm, emb, armo = tmp_path / "bt", tmp_path / "pm", tmp_path / "emb", tmp_path / "armo"
    rw = armo / "rw"  # stage-2 takes stage 1's output directory and finds the weights file in it
    eval_flags = ["--data_set_name", REWARD_BENCH_SAMPLE, "--record_dir", str(tmp_path / "rec.txt")]
    commands = [
        ["bradley-terry-rm/train.py", "--max_steps", "3", "--output_path", str(bt), "--reload_check_pairs", "4"],
        ["useful_code/eval_reward_bench_bt.py", "--reward_name_or_path", str(bt / "last_checkpoint"), *eval_flags],
        ["pair-pm/train.py", "--max_steps", "2", "--output_dir", str(pm), "--reload_check_pairs", "4"],
        ["useful_code/eval_reward_bench_pm.py", "--reward_name_or_path", str(pm / "last_checkpoint"), *eval_flags],
        ["pair-pm/rank_responses.py", "--reward_name_or_path", str(pm / "last_checkpoint"), "--input_path",
         "assets/data/toy_ranking.jsonl", "--output_path", str(tmp_path / "ranked.jsonl")],
        ["armo-rm/stage-1_prepare.py", "--output_dir", str(emb)],
        ["armo-rm/stage-1_train.py", "--embeddings_dir", str(emb), "--output_dir", str(rw)],
        ["armo-rm/stage-2_prepare.py", "--output_dir", str(emb)],
        ["armo-rm/stage-2_prepare.py", "--output_dir", str(emb), "--dataset_split", "test"],
        ["armo-rm/stage-2_train.py", "--embeddings_dir", str(emb), "--regression_weights", str(rw), "--n_steps", "5",
         "--output_dir", str(armo / "head")],
        ["armo-rm/export.py", "--head_dir", str(armo / "head"), "--output_path", str(armo / "model")],
        ["armo-rm/interpret.py", "--model_path", str(armo / "model"), "--trust_remote_code"],
        ["benchmarks/bench_eval_batching.py", "--data", "assets/data/toy_preference", "--pairs", "8", "--method",
         "packed", "--model_dir", str(bt / "last_checkpoint"), "--results", str(tmp_path / "bench.json")],
        ["benchmarks/bench_pm_eval_batching.py", "--data", "assets/data/toy_preference", "--pairs", "4"],
    ]
    driver = NO_GRAD_GUARD + f'''
import json, runpy, sys
torch.nn.modules.module.register_module_forward_pre_hook(no_grad_in_eval)
for argv in json.loads({json.dumps(json.dumps(commands))}):
    sys.argv = argv
    before = len(EVAL_FORWARDS)
    runpy.run_path(argv[0], run_name="__main__")
    print("DONE", argv[0], len(EVAL_FORWARDS) - before, flush=True)
'''
    # PYTHONPATH stands for the script's own folder, which `python benchmarks/x.py` puts first on the path.
    proc = run([sys.executable, "-c", driver], env_extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": "benchmarks"})
    check_ok(proc)
    done = [line.split() for line in proc.stdout.splitlines() if line.startswith("DONE ")]
    assert [d[1] for d in done] == [c[0] for c in commands]
    # Every script but stage-1_train (ridge on saved embeddings) scored with a model, and each forward was checked.
    assert all(int(d[2]) > 0 for d in done if d[1] != "armo-rm/stage-1_train.py"), done
    assert "Checkpoint verified" in proc.stdout  # the reload checks ran under the guard
