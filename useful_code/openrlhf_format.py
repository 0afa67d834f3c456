"""Reward models trained by OpenRLHF (`openrlhf.cli.train_rm`): recognised by the class name its trainer saves,
loaded as the sequence classifier they are, and read where OpenRLHF's trainer read them."""

from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig

# The class OpenRLHF's get_llm_for_sequence_regression builds for a reward model: a base model under the usual
# prefix (model.*) and a bias-free linear head of one output named by config.value_head_prefix ("score" by default),
# which is LlamaForSequenceClassification's (Qwen's, Mistral's, Gemma's) layout. Its "CriticModel" is no reward model.
OPENRLHF_REWARD_ARCHITECTURE = "RewardModel"

# Marks a chat template already made to end as OpenRLHF's trainer ended a sequence, so that it is wrapped once.
_READING_MARK = "{#- read as OpenRLHF's reward trainer read it -#}"


def openrlhf_value_head(config) -> Optional[str]:
    """The name of the reward head of a checkpoint OpenRLHF's reward trainer saved (its config, a dict or a
    PretrainedConfig), or None for any other checkpoint."""
    values = config if isinstance(config, dict) else config.to_dict()
    if values.get("architectures") != [OPENRLHF_REWARD_ARCHITECTURE]:
        return None
    return values.get("value_head_prefix") or "score"


def is_openrlhf_reward_model(name: str) -> bool:
    """Whether the model at name (a directory or a hub name) is a reward model saved by OpenRLHF; False when it has no
    readable config (a tokenizer-only directory). The raw config is read: no model class, no custom code."""
    try:
        values, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError):
        return False
    return openrlhf_value_head(values) is not None


def read_as_openrlhf(tokenizer) -> None:
    """Make the tokenizer's chat template end a whole conversation as OpenRLHF's reward dataset ends each sequence
    before its model reads the reward at the last token (openrlhf/datasets/reward_dataset.py): trailing newlines
    removed, then ' ' + EOS unless the text already ends with EOS (Llama 3's '<|eot_id|>' does; ChatML's
    '<|im_end|>\\n' with another EOS does not). A generation prompt is left as it was. The template, not the callers,
    carries the rule, so that evaluation, serving and dataset scoring all read where training read, and a checkpoint
    trained further from it saves the same template. OpenRLHF tokenizes without special tokens, so the only BOS is
    the one the template writes: a tokenizer that adds its own stops doing so."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or _READING_MARK in template:
        return
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        tokenizer.add_bos_token = False  # a fast tokenizer rewrites its post-processor without the BOS
    tokenizer.chat_template = (
        _READING_MARK + "{% set rendered %}" + template + "{% endset %}"
        "{%- if add_generation_prompt -%}{{ rendered }}{%- else -%}"
        "{%- set text = rendered.rstrip('\\n') -%}{{ text }}"
        "{%- if eos_token and not text.endswith(eos_token) %} {{ eos_token }}{% endif -%}{%- endif -%}")
