"""Loading models: through an Auto class, aligned with the tokenizer's pad token, refusing custom code unless
trusted, with one clear error when a model cannot be loaded."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from useful_code.cli import UserError, first_rank, load_error
from useful_code.hardware import default_device, resolve_attn_implementation, resolve_dtype
from useful_code.openrlhf_format import openrlhf_value_head
from useful_code.packing import enable_padding_free
from useful_code.templates import load_tokenizer

# A sequence classifier's output layer: a decoder's 'score', an encoder's 'classifier' (BERT, DeBERTa).
CLASSIFIER_HEADS = ("score", "classifier")
# The modules a sequence-classification head adds to a base model: the output layer, and an encoder's pooler.
# Training a reward model from a base model initialises them.
REWARD_HEAD_WEIGHTS = tuple(f"{name}." for name in CLASSIFIER_HEADS) + ("pooler.",)


# What a project trainer made, recorded in the checkpoint's config (every checkpoint-N too): a preference model and a
# math reward model are both plain causal LMs, whose architectures alone cannot tell them (or a base model) apart.
TRAINED_KIND = "rlhf_reward_kind"
# kind -> (what it is and which trainer made it, the scripts that score it)
TRAINED_KINDS = {
    "bt": ("Bradley-Terry reward model (bradley-terry-rm/train.py)", "useful_code/eval_reward_bench_bt.py"),
    "pm": ("pairwise preference model (pair-pm/train.py)",
           "useful_code/eval_reward_bench_pm.py or pair-pm/rank_responses.py"),
    "prm": ("math process reward model (math-rm/train.py --reward_type prm)",
            "math-rm/prm_evaluate.py or math-rm/orm_evaluate.py"),
    "orm": ("math outcome reward model (math-rm/train.py --reward_type orm)",
            "math-rm/orm_evaluate.py or math-rm/prm_evaluate.py"),
    "scalar_orm": ("scalar math outcome reward model (math-rm/scalar_orm_train.py)",
                   "useful_code/eval_reward_bench_bt.py")}
PM_KINDS, MATH_KINDS = ("pm",), ("prm", "orm")  # what the PM scorers and the math scorers read


def record_kind(model, kind: str) -> None:
    """Write kind (a key of TRAINED_KINDS) into the model's config, so its checkpoints say what they are."""
    setattr(model.config, TRAINED_KIND, kind)


def check_kind(config, accepted: tuple[str, ...], flag: str, name: str) -> None:
    """A checkpoint a project trainer recorded as another kind than accepted: one line naming both and the script
    that scores it. A checkpoint with no record (a hub model, a base model, one trained elsewhere) passes: its
    architecture is all there is to go by."""
    recorded = getattr(config, TRAINED_KIND, None)
    if recorded is not None and recorded not in accepted:
        what, scored_by = TRAINED_KINDS.get(recorded, (repr(recorded), "its own scripts"))
        wanted = " or ".join(TRAINED_KINDS[k][0].split(" (")[0] for k in accepted)
        raise UserError(f"{flag}: '{name}' is a {what}, not a {wanted}; score it with {scored_by}")


def classifier_head_name(model) -> Optional[str]:
    """The attribute of a sequence classifier (or its peft wrapper) holding its output layer, or None."""
    return next((name for name in CLASSIFIER_HEADS if hasattr(model, name)), None)


def _task_suffix(class_name: str) -> str:
    """'ForSequenceClassification' of 'AutoModelForSequenceClassification' or 'LlamaForSequenceClassification'."""
    return class_name[class_name.find("For"):] if "For" in class_name else ""


# What each Auto class loads, in this project's words (for the error on a checkpoint of another kind).
CHECKPOINT_KINDS = {
    "ForSequenceClassification": "sequence classifier (a BT reward model, an exported ArmoRM, a scalar ORM)",
    "ForCausalLM": "causal LM (a pairwise preference model, a math PRM or ORM)"}


@contextmanager
def _load_report_held():
    """Hold back transformers' load report (a table of missing and unused weights, logged as a warning on every
    load of a base model with a new head): load_model checks those weights itself and says what matters in one line.
    Yields whether a report was held; a load that fails lets it through, since it may explain the failure."""
    held = []

    def hold(record):
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(hold)
    try:
        yield held
    except BaseException:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)
        raise
    logger.removeFilter(hold)


def load_model(auto_class, name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
               trust_remote_code: bool = False, *, new_weights: tuple[str, ...] = (), pickled_weights: bool = False,
               kinds: tuple[str, ...] = (), **kwargs):
    """from_pretrained through an Auto class, checked: one clear error if the model cannot be loaded, if it was saved
    for another task (a BT checkpoint given to a PM script), if a weight the model needs is missing or of another
    shape (it would be random), or if it has only pickled weights and pickled_weights is off. new_weights are the
    name prefixes of a head the caller adds and trains (a score head on a base LM). The embeddings grow to fit a pad
    token the tokenizer added, and the config learns the pad id. kinds: the TRAINED_KINDS the caller reads (check_kind,
    before the weights load)."""
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(flag, "model", name, err) from None
    if kinds:
        check_kind(config, kinds, flag, name)
    custom = (getattr(config, "auto_map", None) or {}).get(auto_class.__name__)
    if custom and not trust_remote_code:
        # Without it transformers would build the backbone's stock class and silently drop the custom head.
        raise UserError(f"{flag}: '{name}' defines its own {auto_class.__name__} ({custom}); pass "
                        "--trust_remote_code to run that code")
    wanted, saved = _task_suffix(auto_class.__name__), [_task_suffix(a) for a in config.architectures or []]
    value_head = openrlhf_value_head(config) if auto_class is AutoModelForSequenceClassification else None
    head_renaming = rf"^{re.escape(value_head)}\." if value_head not in (None, "score") else None
    if value_head is not None:
        saved = [wanted]  # OpenRLHF's RewardModel is its model type's sequence classifier, saved under another name
    if head_renaming:
        kwargs["key_mapping"] = {head_renaming: "score."}
    if wanted and not new_weights and saved and wanted not in saved:
        raise UserError(f"{flag}: '{name}' was saved as {', '.join(config.architectures)}, not a ...{wanted} model; "
                        f"this script needs a {CHECKPOINT_KINDS.get(wanted, wanted)}, another kind of checkpoint")
    local = Path(name).expanduser()
    if not pickled_weights and local.is_dir() and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
        raise UserError(f"{flag}: '{name}' holds only pickled weights ({', '.join(p.name for p in local.glob('*.bin'))}"
                        "); pass --load_pickled_weights to read them with torch's weights-only loader, or convert "
                        "them to safetensors")
    try:
        with _load_report_held() as report:
            model, info = auto_class.from_pretrained(
                name, dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation, dtype),
                trust_remote_code=trust_remote_code, use_safetensors=None if pickled_weights else True,
                output_loading_info=True, **kwargs,
            )
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        # transformers rejects these loading options with a ValueError that would otherwise blame the model's flag
        if "attn_implementation" in reason:
            reason = reason.replace("`", "").rstrip(".")
            raise UserError(f"--attn_implementation {attn_implementation}: {reason}; use auto, sdpa, eager or "
                            "flash_attention_2") from None
        if "device_map" in reason:
            raise UserError(f"--device_map {kwargs.get('device_map')}: {reason}") from None
        raise load_error(flag, "model", name, err) from None
    except ImportError as err:  # transformers: flash_attention_2 (or a quantization) asked for without its package
        raise UserError(f"{flag}: '{name}' cannot be loaded with --attn_implementation {attn_implementation} here "
                        f"({str(err).splitlines()[0]}); use --attn_implementation auto or sdpa") from None
    except SafetensorError as err:
        raise UserError(f"{flag}: the weights of '{name}' cannot be read ({str(err).splitlines()[0]}); the file is "
                        "truncated or damaged") from None
    except RuntimeError as err:  # transformers: weights of another shape (num_labels, vocabulary, architecture)
        raise UserError(f"{flag}: '{name}' has weights of another shape than the model expects "
                        f"({str(err).splitlines()[0]}); check num_labels and the architecture") from None
    # A prefix names a module at any depth: "pooler." matches "bert.pooler.dense.weight".
    missing = [k for k in info["missing_keys"] if not any(f".{prefix}" in f".{k}" for prefix in new_weights)]
    if missing or info["mismatched_keys"]:
        problems = missing + [str(k) for k in info["mismatched_keys"]]
        raise UserError(f"{flag}: '{name}' lacks {len(problems)} weights the model needs, which would be random: "
                        f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}")
    if report and first_rank():  # what transformers' table said, in one line: nothing in it is wrong for this use
        new, unused = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        parts = [f"new head initialised: {', '.join(new)}" if new else "",
                 f"weights that {type(model).__name__} does not use: {', '.join(unused[:3])}"
                 f"{f' and {len(unused) - 3} more' if len(unused) > 3 else ''}" if unused else ""]
        print(f"{flag} {name}: " + "; ".join(part for part in parts if part))
    if head_renaming:
        # Saved again as a plain sequence classifier (score.*): transformers would write the head back under its old
        # name, which the saved ...ForSequenceClassification config does not name (and OpenRLHF reads the head's name
        # from config.value_head_prefix).
        model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                     if getattr(c, "source_patterns", None) != [head_renaming]]
        model.config.value_head_prefix = "score"
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
                      trust_remote_code: bool = False, num_labels: int = 1, **options):
    """A sequence classifier with one output (the reward; ODIN trains two), aligned with the tokenizer's pad token;
    options as load_model's (new_weights=REWARD_HEAD_WEIGHTS to train a new head on a base model)."""
    return load_model(AutoModelForSequenceClassification, name, flag, tokenizer, dtype, attn_implementation,
                      trust_remote_code, num_labels=num_labels, **options)


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off a model's dropout for training (TRL's RewardConfig default): its nn.Dropout layers, with TRL's own
    helper, and the attention dropout that Llama-style attention reads from a float attribute instead. Returns how
    many were on."""
    from trl.trainer.utils import disable_dropout_in_model

    active = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    # Llama, Qwen2, Mistral, ...: F.scaled_dot_product_attention(dropout_p=module.attention_dropout), no module
    attention = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)
                 and m.attention_dropout > 0]
    disable_dropout_in_model(model)
    for module in attention:
        module.attention_dropout = 0.0
    return len(active) + len(attention)


def load_preference_model(name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
                          trust_remote_code: bool = False, **options):
    """A causal LM as a pairwise preference model, aligned with the tokenizer's vocabulary and pad token."""
    return load_model(AutoModelForCausalLM, name, flag, tokenizer, dtype, attn_implementation, trust_remote_code,
                      **options)


def load_backbone(path: str, device: str, bf16: bool = True, attn_implementation: str = "auto",
                  trust_remote_code: bool = False, flag: str = "--model_path", **options):
    """A reward model's transformer without its head (AutoModel), in eval mode on device, and its tokenizer."""
    tokenizer = load_tokenizer(path, flag, trust_remote_code)
    dtype = resolve_dtype(bf16) if device != "cpu" else torch.float32
    model = load_model(AutoModel, path, flag, tokenizer, dtype, attn_implementation, trust_remote_code, **options)
    enable_padding_free(model)  # embeddings are computed from packed rows where the model allows it
    return model.to(device).eval(), tokenizer


def load_for_scoring(loader, name: str, flag: str, bf16: bool = True, attn_implementation: str = "auto",
                     trust_remote_code: bool = False, device: Optional[str] = None, device_map: Optional[str] = None,
                     **options):
    """(model in eval mode, tokenizer) for an eval script; loader is load_reward_model or load_preference_model;
    options as load_model's. The model goes to device (default: the GPU if there is one), or with device_map
    ('auto') is spread over the GPUs by Accelerate, for a model too large for one."""
    tokenizer = load_tokenizer(name, flag, trust_remote_code)
    if device_map:
        options["device_map"] = device_map
    model = loader(name, flag, tokenizer, resolve_dtype(bf16), attn_implementation, trust_remote_code, **options)
    enable_padding_free(model)  # scoring packs sequences without padding where the model allows it
    return (model if device_map else model.to(device or default_device())).eval(), tokenizer
