"""A BERT-style encoder as a reward model: trained from a base (masked-LM) checkpoint with a chat template given by
flag, evaluated and served; truncation keeps its [CLS] token, where the classifier reads."""

import json
import sys

import pytest
from transformers import BertConfig, BertForMaskedLM

from helpers import ROOT, character_bert_tokenizer, check_ok, run
from useful_code.defaults import REWARD_BENCH_SAMPLE
from useful_code.reward_scorer import RewardScorer
from useful_code.scoring import score_sequences
from useful_code.templates import encode_conversations, load_tokenizer, truncate_all

pytestmark = pytest.mark.e2e  # subprocesses: `make test-fast` skips this file


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny BERT (2 layers, hidden 64) saved as a masked LM: a base encoder with no chat template and no head."""
    out = tmp_path_factory.mktemp("bert")
    tokenizer = character_bert_tokenizer(out)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=1024)
    BertForMaskedLM(config).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    return out


def test_a_base_encoder_without_a_template_is_refused_with_the_flag_named(encoder):
    proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / "train.py"), "--model_name", str(encoder / "base"),
                "--output_path", str(encoder / "refused")])
    assert proc.returncode == 2 and "--chat_template" in proc.stderr and "Traceback" not in proc.stderr


def test_encoder_reward_model_trains_evaluates_and_serves(encoder):
    out = encoder / "rm"
    proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / "train.py"), "--model_name", str(encoder / "base"),
                "--chat_template", "plain", "--output_path", str(out), "--max_steps", "150", "--max_length", "512",
                "--skip_invalid"])  # one token per character: 28 pairs differ only before their last 512 characters
    check_ok(proc)
    # an encoder reads its [CLS] token with attention both ways: it cannot pack, and says so once
    assert proc.stdout.count("note: padded batches, not padding-free: BertForSequenceClassification is not a causal "
                             "decoder") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_tokens"]["padding_free"] is False and metrics["train_tokens"]["padding"] > 0
    assert metrics["eval_accuracy"] > 0.65  # learns the toy cue (chance 0.5; measured 0.745 for this random encoder)
    checkpoint = out / "last_checkpoint"
    tokenizer = load_tokenizer(str(checkpoint), "m")  # the template travelled with the checkpoint
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template([conversation], tokenize=False)[0] == "User: hi\nAssistant: hello\n"

    sequences = encode_conversations(tokenizer, [conversation])
    assert sequences[0][0] == tokenizer.cls_token_id and sequences[0][-1] == tokenizer.sep_token_id
    cut, n_cut = truncate_all(tokenizer, sequences, 6)
    assert n_cut == 1 and cut[0][0] == tokenizer.cls_token_id and cut[0][1:] == sequences[0][-5:]

    proc = run([sys.executable, str(ROOT / "useful_code" / "eval_reward_bench_bt.py"), "--reward_name_or_path",
                str(checkpoint), "--data_set_name", REWARD_BENCH_SAMPLE, "--record_dir", str(out / "rec.txt"),
                "--results_json", str(out / "rb.json")])
    check_ok(proc)
    results = json.loads((out / "rb.json").read_text())
    scorer = RewardScorer.from_pretrained(str(checkpoint))
    assert scorer.kind == "bt"
    first = results["per_example"][0]
    row = json.loads(open(REWARD_BENCH_SAMPLE).readline())
    served = scorer.score(scorer.encode_conversations([[{"role": "user", "content": row["prompt"]},
                                                        {"role": "assistant", "content": row["chosen"]}]])[0])
    assert served["rewards"][0] == pytest.approx(first["chosen_reward"], abs=1e-4)
    direct = score_sequences(scorer.model, tokenizer, encode_conversations(tokenizer, [conversation]), batch_size=1)
    assert len(direct) == 1


def test_lora_on_an_encoder_trains_and_saves_its_new_pooler_in_full(encoder):
    """A masked-LM base has no pooler: the reward head's new pooler trains in full beside the classifier (as a LoRA
    target it would stay random, and the merged export would draw another), so the merged checkpoint verifies."""
    from safetensors import safe_open

    out = encoder / "lora"
    proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / "train.py"), "--model_name", str(encoder / "base"),
                "--chat_template", "plain", "--use_peft", "--output_path", str(out), "--max_steps", "4",
                "--max_length", "512", "--skip_invalid"])
    check_ok(proc)
    assert "Checkpoint verified: the reloaded rewards match the trained model" in proc.stdout
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    assert {"base_model.model.bert.pooler.dense.weight", "base_model.model.classifier.weight"} <= names
    assert not any("pooler" in name and "lora_" in name for name in names)
