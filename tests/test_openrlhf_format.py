"""A reward model trained by OpenRLHF (architectures ["RewardModel"], a base model and a bias-free value head named by
config.value_head_prefix) loads as a BT checkpoint and gives the rewards OpenRLHF's own reading gives: its trainer's
text (templated conversation, trailing newlines removed, ' ' + EOS unless it ends with EOS; no special tokens added),
the reward at the last token. The reference below is written from that description, independently of the project's
loading and scoring code."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaModel, LlamaPreTrainedModel

from useful_code.cli import UserError
from useful_code.defaults import DEFAULT_MODEL
from useful_code.modeling import load_reward_model
from useful_code.reward_scorer import RewardScorer, checkpoint_kind
from useful_code.serve_reward_model import reward_scale
from useful_code.templates import BUILTIN_CHAT_TEMPLATES, load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Simmer it 9 minutes.\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."}],
]


class RewardModel(LlamaPreTrainedModel):
    """OpenRLHF's reward model layout: the base model as `model`, a one-output linear head without bias under the
    configured prefix; the reward is the head's value at the last attended token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.head_name = getattr(config, "value_head_prefix", "score")
        setattr(self, self.head_name, nn.Linear(config.hidden_size, 1, bias=False))
        self.post_init()

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        values = getattr(self, self.head_name)(hidden).squeeze(-1)
        last = attention_mask.size(1) - 1 - attention_mask.long().fliplr().argmax(dim=1, keepdim=True)
        return values.gather(1, last).squeeze(1)


def openrlhf_text(tokenizer, conversation):
    text = tokenizer.apply_chat_template(conversation, tokenize=False).rstrip("\n")
    return text if text.endswith(tokenizer.eos_token) else text + " " + tokenizer.eos_token


def save_openrlhf_checkpoint(path, value_head_prefix, chat_template):
    """A checkpoint as OpenRLHF's reward trainer saves one (save_pretrained of its RewardModel, config with
    value_head_prefix, normalize_reward, mean and std), on the tiny model, with a seeded head."""
    from transformers import AutoTokenizer

    config = LlamaConfig.from_pretrained(DEFAULT_MODEL)
    config.value_head_prefix, config.normalize_reward, config.mean, config.std = value_head_prefix, False, 0.5, 2.0
    torch.manual_seed(0)
    model = RewardModel(config)
    base = AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL, num_labels=1)
    model.model.load_state_dict(base.model.state_dict())
    nn.init.normal_(getattr(model, value_head_prefix).weight, std=0.5)
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def reference_rewards(model, tokenizer, conversations):
    texts = [openrlhf_text(tokenizer, c) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        rewards = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in ids]
    return texts, ids, rewards


@pytest.mark.parametrize("value_head_prefix,template", [("value_head", "chatml"), ("score", "llama3")])
def test_openrlhf_checkpoint_scores_as_openrlhf_reads_it(tmp_path, value_head_prefix, template):
    """ChatML with the tiny tokenizer's EOS ('<|eot_id|>') gets ' <|eot_id|>' after '<|im_end|>' and no BOS (the
    template writes none); Llama 3's template ends with EOS and writes its BOS: nothing is added."""
    model, tokenizer = save_openrlhf_checkpoint(tmp_path, value_head_prefix, BUILTIN_CHAT_TEMPLATES[template])
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["RewardModel"]
    texts, ids, expected = reference_rewards(model, tokenizer, CONVERSATIONS)
    assert texts[0].endswith("<|im_end|> <|eot_id|>" if template == "chatml" else "Simmer it 9 minutes.<|eot_id|>")
    assert checkpoint_kind(str(tmp_path)) == "bt"
    scorer = RewardScorer.from_pretrained(str(tmp_path), bf16=False, device="cpu")
    sequences, cut = scorer.encode_conversations(CONVERSATIONS)
    assert (sequences, cut) == (ids, 0)
    assert scorer.score(sequences)["rewards"] == pytest.approx(expected, abs=1e-5)
    # OpenRLHF's remote-reward query: the same text, already templated, scored as it is
    queried, _ = scorer.encode_texts(texts)
    assert queried == ids
    assert reward_scale(scorer.kind, scorer.model.config.to_dict(), "m") == (0.5, 2.0)


def test_openrlhf_template_is_wrapped_once_and_saved(tmp_path, capsys):
    save_openrlhf_checkpoint(tmp_path / "rm", "value_head", BUILTIN_CHAT_TEMPLATES["chatml"])
    tokenizer = load_tokenizer(str(tmp_path / "rm"), "--model_name")
    assert "is a reward model trained by OpenRLHF" in capsys.readouterr().out
    prompt = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.save_pretrained(tmp_path / "again")  # a model trained further from it keeps its reading
    again = load_tokenizer(str(tmp_path / "again"), "--reward_name_or_path")
    assert again.chat_template == tokenizer.chat_template
    assert again.apply_chat_template(CONVERSATIONS[:1], tokenize=False)[0].endswith("<|im_end|> <|eot_id|>")
    assert again("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]


def test_openrlhf_critic_is_not_a_reward_model(tmp_path):
    save_openrlhf_checkpoint(tmp_path, "score", BUILTIN_CHAT_TEMPLATES["llama3"])
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["CriticModel"]}))
    tokenizer = load_tokenizer(str(tmp_path), "m")
    with pytest.raises(UserError, match=r"saved as CriticModel, not a \.\.\.ForSequenceClassification model"):
        load_reward_model(str(tmp_path), "--reward_name_or_path", tokenizer, torch.float32)


def test_openrlhf_checkpoint_saved_again_is_a_plain_sequence_classifier(tmp_path):
    """A model loaded from a renamed value head and saved (training further from it) writes score.weight, which its
    LlamaForSequenceClassification config names, and says so to OpenRLHF (value_head_prefix)."""
    original, _ = save_openrlhf_checkpoint(tmp_path / "rm", "value_head", BUILTIN_CHAT_TEMPLATES["chatml"])
    tokenizer = load_tokenizer(str(tmp_path / "rm"), "m")
    model = load_reward_model(str(tmp_path / "rm"), "m", tokenizer, torch.float32)
    model.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (config["architectures"], config["value_head_prefix"]) == (["LlamaForSequenceClassification"], "score")
    again = load_reward_model(str(tmp_path / "again"), "m", tokenizer, torch.float32)
    assert torch.equal(again.score.weight, original.value_head.weight)
