"""Loading models: through an Auto class, aligned with the tokenizer's pad token, refusing custom code unless
trusted, with one clear error when a model cannot be loaded."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from useful_code.cli import UserError
from useful_code.hardware import default_device, resolve_attn_implementation, resolve_dtype
from useful_code.templates import load_tokenizer


def load_model(auto_class, name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
               trust_remote_code: bool = False, **kwargs):
    """from_pretrained through an Auto class, with one clear error if the model cannot be loaded; the embeddings
    grow to fit a pad token the tokenizer added, and the config learns the pad id."""
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        custom = (getattr(config, "auto_map", None) or {}).get(auto_class.__name__)
        if custom and not trust_remote_code:
            # Without it transformers would build the backbone's stock class and silently drop the custom head.
            raise UserError(f"{flag}: '{name}' defines its own {auto_class.__name__} ({custom}); pass "
                            "--trust_remote_code to run that code")
        model = auto_class.from_pretrained(
            name, dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation),
            trust_remote_code=trust_remote_code, **kwargs,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{flag}: could not load model '{name}' ({str(err).splitlines()[0]}); "
                        f"pass a local model directory with {flag}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
                      trust_remote_code: bool = False):
    """A sequence classifier with one output (the reward), aligned with the tokenizer's pad token."""
    return load_model(AutoModelForSequenceClassification, name, flag, tokenizer, dtype, attn_implementation,
                      trust_remote_code, num_labels=1)


def load_preference_model(name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
                          trust_remote_code: bool = False):
    """A causal LM as a pairwise preference model, aligned with the tokenizer's vocabulary and pad token."""
    return load_model(AutoModelForCausalLM, name, flag, tokenizer, dtype, attn_implementation, trust_remote_code)


def load_backbone(path: str, device: str, bf16: bool = True, attn_implementation: str = "auto",
                  trust_remote_code: bool = False, flag: str = "--model_path"):
    """A reward model's transformer without its head (AutoModel), in eval mode on device, and its tokenizer."""
    tokenizer = load_tokenizer(path, flag, trust_remote_code)
    dtype = resolve_dtype(bf16) if device != "cpu" else torch.float32
    model = load_model(AutoModel, path, flag, tokenizer, dtype, attn_implementation, trust_remote_code)
    return model.to(device).eval(), tokenizer


def load_for_scoring(loader, name: str, flag: str, bf16: bool = True, attn_implementation: str = "auto",
                     trust_remote_code: bool = False):
    """(model in eval mode on the GPU if there is one, tokenizer) for an eval script; loader is load_reward_model or
    load_preference_model."""
    tokenizer = load_tokenizer(name, flag, trust_remote_code)
    model = loader(name, flag, tokenizer, resolve_dtype(bf16), attn_implementation, trust_remote_code)
    return model.to(default_device()).eval(), tokenizer
