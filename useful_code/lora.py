"""LoRA and QLoRA through peft, with TRL's flag names: wrapping a model for training (the reward or answer head
trained in full), and merging a trained adapter into a plain checkpoint that loads with the Auto classes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training  # noqa: F401

from useful_code.checkpoints import ADAPTER_DIR, save_final_checkpoint
from useful_code.cli import UserError
from useful_code.distributed import outside_zero3
from useful_code.hardware import has_accelerator
from useful_code.modeling import CLASSIFIER_HEADS, REWARD_HEAD_WEIGHTS, TRAINED_KIND, classifier_head_name, record_kind


@dataclass
class LoraArguments:
    """trl.ModelConfig's LoRA/QLoRA flags (same names and defaults), for models too large to fine-tune in full."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (and the head in full)."})
    lora_r: int = field(default=16, metadata={"min": 1, "help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"min": 1, "help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"min": 0, "max": 1})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "Module names to adapt. Default: every linear layer but the head ('all-linear')."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base weights (bitsandbytes, GPU)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base weights (bitsandbytes, GPU)."})

    def __post_init__(self):
        # Without --use_peft the run trains in full: LoRA settings given then would be ignored without a word.
        given = [f"--{f.name}" for f in fields(self)
                 if f.name.startswith("lora_") and getattr(self, f.name) != f.default]
        if given and not self.use_peft:
            raise UserError(f"{', '.join(given)}: LoRA settings, which apply only with --use_peft (without it the "
                            "whole model trains): pass --use_peft, or drop them")


def quantization_options(args: LoraArguments, dtype: torch.dtype) -> dict:
    """from_pretrained options for 4- or 8-bit base weights; {} without them. One clear error where bitsandbytes
    or a GPU is missing, or without --use_peft (quantized weights cannot be trained in full)."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    flag = "--load_in_4bit" if args.load_in_4bit else "--load_in_8bit"
    if args.load_in_4bit and args.load_in_8bit:
        raise UserError("--load_in_4bit and --load_in_8bit exclude each other")
    if not args.use_peft:
        raise UserError(f"{flag} trains adapters on frozen quantized weights: pass --use_peft too")
    if not has_accelerator():
        raise UserError(f"{flag} needs a CUDA GPU (bitsandbytes); this machine has none: drop the flag")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from None
    if args.load_in_4bit:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config}


def check_lora_targets(model, targets: Optional[list[str]]) -> None:
    """Every --lora_target_modules name must name a module of the model (peft's rule: the full name or its last
    parts), not a sequence classifier's head, which trains in full: otherwise one line listing the model's linear
    layers (peft raises for no match at all and silently ignores a list that matches in part)."""
    if not targets:
        return
    head = classifier_head_name(model)
    # A causal LM's output layer (the PM's answer head): TRL's SFTTrainer refuses an adapter on it, with a traceback.
    output = model.get_output_embeddings() if head is None and hasattr(model, "get_output_embeddings") else None
    modules = [(name, module) for name, module in model.named_modules()
               if name and name.split(".")[0] != head and module is not output]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, torch.nn.Linear)})
    advice = f"its linear layers are {', '.join(linear)}; leave the flag unset for all"
    output_names = [name for name, module in model.named_modules() if output is not None and module is output]
    on_output = [t for t in targets if any(name == t or name.endswith(f".{t}") for name in output_names)]
    if on_output:
        raise UserError(f"--lora_target_modules: {', '.join(on_output)} is the model's output layer, which LoRA does "
                        f"not adapt here (TRL refuses it); {advice}")
    matched = {t: [m for name, m in modules if name == t or name.endswith(f".{t}")] for t in targets}
    unknown = [t for t, found in matched.items() if not found]
    if unknown:
        trained = f" (the '{head}' head trains in full)" if head else ""
        raise UserError(f"--lora_target_modules: {', '.join(unknown)} is not a module of this model{trained}; "
                        f"{advice}")
    # peft adapts these layer types only, and raises a traceback for a block or a norm named here
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    blocks = [t for t, found in matched.items()
              if not any(isinstance(m, adaptable) or type(m).__name__ == "Conv1D" for m in found)]
    if blocks:
        kinds = sorted({type(m).__name__ for t in blocks for m in matched[t]})
        raise UserError(f"--lora_target_modules: {', '.join(blocks)} names no layer LoRA can adapt "
                        f"({', '.join(kinds)}); {advice}")


def wrap_with_lora(model, args: LoraArguments, task_type: TaskType, training_args=None):
    """The model with LoRA adapters on its linear layers (check_lora_targets first); for a sequence classifier the
    head trains and is saved in full (peft's SEQ_CLS puts 'score'/'classifier' in modules_to_save; an encoder's
    pooler is added). Prints the
    trainable share. training_args (the run's TrainingArguments; None: a plain run without DeepSpeed or gradient
    checkpointing) decide the dtypes of what trains and the checkpointing set-up:

    - without DeepSpeed, every trainable parameter is fp32 (the base, loaded in bf16 with --bf16, stays frozen):
      the Trainer's AdamW updates what it is given in its dtype, and bf16 rounds away updates below ~2^-8 of a
      weight. peft already upcasts the LoRA A/B matrices (autocast_adapter_dtype); the head it copies into
      modules_to_save keeps the base's dtype, so it is cast here.
    - under DeepSpeed ZeRO-3 with an unquantized base, the adapters stay in the base's dtype
      (autocast_adapter_dtype=False, as TRL does): ZeRO-3 gathers parameters into buffers of one dtype and fails on
      bf16 base + fp32 adapters (DeepSpeed issue 8072); ZeRO keeps fp32 master weights of what trains anyway.
    - with gradient checkpointing: the embeddings' outputs require grad (enable_input_require_grads), without
      which reentrant checkpointing passes no gradient to the frozen base's adapters (TRL calls it for PEFT too,
      since transformers' own call has been skipped for PEFT models: transformers issue 42489); and under ZeRO-3
      checkpointing is reentrant, since non-reentrant recomputation sees ZeRO-3's partitioned frozen weights (shape
      [0]) and fails (TRL issue 2514, DeepSpeed issue 4332). Set on both of transformers' names for the kwargs:
      TRL's SFTTrainer reads and sets the old one, the Trainer reads the new one."""
    check_lora_targets(model, args.lora_target_modules)
    deepspeed = bool(getattr(training_args, "deepspeed", None))
    plugin = getattr(training_args, "deepspeed_plugin", None)
    zero3 = deepspeed and plugin is not None and plugin.zero_stage == 3
    checkpointing = bool(getattr(training_args, "gradient_checkpointing", False))
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized:  # QLoRA: upcasts every non-quantized weight to fp32 itself
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    # Every part of a new reward head trains in full, as peft trains 'score'/'classifier': an encoder's pooler (new
    # on a masked-LM base) adapted by LoRA instead would keep its random init, which the merged export redraws.
    head_parts = {prefix.rstrip(".") for prefix in REWARD_HEAD_WEIGHTS} - set(CLASSIFIER_HEADS)
    extra_head = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & head_parts) \
        if task_type == TaskType.SEQ_CLS else []
    config = LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules or "all-linear", modules_to_save=extra_head or None)
    model = get_peft_model(model, config, **({"autocast_adapter_dtype": False} if zero3 and not quantized else {}))
    if not deepspeed:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    if checkpointing:
        model.enable_input_require_grads()
        if zero3:
            kwargs = training_args.activation_checkpointing_kwargs or training_args.gradient_checkpointing_kwargs or {}
            if kwargs.get("use_reentrant") is False:
                print("note: LoRA with ZeRO-3 and gradient checkpointing needs reentrant checkpointing: "
                      "use_reentrant=False is overridden")
            kwargs["use_reentrant"] = True
            training_args.activation_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs = kwargs
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA r={args.lora_r} alpha={args.lora_alpha}: {trainable:,} of {total:,} parameters trainable "
          f"({100 * trainable / total:.2f}%)")
    return model


def check_resume_settings(model, resume: Optional[str]) -> None:
    """Resuming must keep the checkpoint's LoRA settings: a LoRA checkpoint resumed without --use_peft (or a full one
    with it), another rank or targets (a state-dict or optimizer traceback from the Trainer), or another alpha or
    dropout (no error at all: the adapter would train on at another scale, and metrics.json would record only the
    new one) is one line. model: the model about to train (a PeftModel with --use_peft)."""
    if not resume:
        return
    saved_path = os.path.join(resume, "adapter_config.json")
    live = model.peft_config["default"] if isinstance(model, PeftModel) else None
    if live is None or not os.path.isfile(saved_path):
        if live is not None:
            raise UserError(f"--resume_from_checkpoint {resume}: a checkpoint of the whole model, not of LoRA "
                            "adapters: resume it without --use_peft")
        if os.path.isfile(saved_path):
            raise UserError(f"--resume_from_checkpoint {resume}: a checkpoint of LoRA adapters: resume it with "
                            "--use_peft and the LoRA settings it was trained with")
        return
    with open(saved_path) as f:
        saved = json.load(f)
    flags = {"r": "--lora_r", "lora_alpha": "--lora_alpha", "lora_dropout": "--lora_dropout",
             "target_modules": "--lora_target_modules"}

    def comparable(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    changed = [f"{flag} {comparable(getattr(live, key))} (the checkpoint: {comparable(saved.get(key))})"
               for key, flag in flags.items() if comparable(getattr(live, key)) != comparable(saved.get(key))]
    if changed:
        raise UserError(f"--resume_from_checkpoint {resume}: its adapters were trained with other LoRA settings: "
                        f"{'; '.join(changed)}; resume with the checkpoint's settings")


def save_final_model(trainer, checkpoint_dir: str, use_peft: bool, load_base: Callable, tokenizer) -> None:
    """The trained model as a plain checkpoint at checkpoint_dir. With LoRA: the adapter (and head) as trained goes
    to ADAPTER_DIR beside it, then the main process merges it into the base model, loaded afresh by load_base()
    (unquantized, outside ZeRO-3), so evaluation and serving load it with the Auto classes."""
    if not use_peft:
        save_final_checkpoint(trainer, checkpoint_dir)
        return
    adapter_dir = os.path.join(os.path.dirname(checkpoint_dir), ADAPTER_DIR)
    save_final_checkpoint(trainer, adapter_dir)
    if trainer.args.process_index == 0:
        with outside_zero3():
            merged = PeftModel.from_pretrained(load_base(), adapter_dir).merge_and_unload()
        kind = getattr(trainer.model.config, TRAINED_KIND, None)  # the base model's config does not record it
        if kind is not None:
            record_kind(merged, kind)
        merged.save_pretrained(checkpoint_dir)
        tokenizer.save_pretrained(checkpoint_dir)
    trainer.accelerator.wait_for_everyone()
