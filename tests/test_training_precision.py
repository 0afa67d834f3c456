"""Training precision with --bf16: the weights train in fp32 under the Trainer's bf16 autocast (mixed precision, as
TRL's RewardTrainer), bf16 only where something keeps fp32 master weights (DeepSpeed) or nothing updates them (LoRA's
frozen base); what LoRA trains is fp32; the reload check scores under the same autocast. bf16 is forced on here, on
the CPU: torch autocasts bf16 on a CPU, and accelerate's bf16 mixed precision uses it with use_cpu."""

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import ROOT
from useful_code import distributed
from useful_code.defaults import DEFAULT_MODEL
from useful_code.distributed import compute_dtype, precision_summary, weights_dtype
from useful_code.lora import LoraArguments, TaskType, wrap_with_lora
from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model
from useful_code.templates import load_tokenizer

TRAIN = ROOT / "bradley-terry-rm" / "train.py"


def run_args(**overrides):
    """The training arguments weights_dtype, compute_dtype and precision_summary read."""
    return SimpleNamespace(**{"bf16": True, "fp16": False, "deepspeed": None, **overrides})


def test_weights_are_fp32_unless_deepspeed_or_a_frozen_base_hold_them_in_bf16():
    assert weights_dtype(run_args()) == torch.float32  # the Trainer updates the weights in their own dtype
    assert weights_dtype(run_args(deepspeed="deepspeed_configs/deepspeed_3.json")) == torch.bfloat16
    assert weights_dtype(run_args(), frozen_base=True) == torch.bfloat16
    assert weights_dtype(run_args(bf16=False, deepspeed="ds.json"), frozen_base=True) == torch.float32
    assert compute_dtype(run_args()) == torch.bfloat16 and compute_dtype(run_args(bf16=False)) == torch.float32
    assert precision_summary(run_args(), torch.float32) == "weights=float32 compute=bf16 autocast"
    assert precision_summary(run_args(deepspeed="ds.json"), torch.bfloat16) == "weights=bfloat16 compute=bf16 DeepSpeed"
    assert precision_summary(run_args(), torch.bfloat16, frozen_base=True) == \
        "weights=bfloat16 (frozen base; trained parameters float32) compute=bf16 autocast"
    assert precision_summary(run_args(bf16=False), torch.float32) == "weights=float32 compute=fp32"


def bf16_base_model():
    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model_name")
    return load_reward_model(DEFAULT_MODEL, "--model_name", tokenizer, torch.bfloat16, new_weights=REWARD_HEAD_WEIGHTS)


def test_lora_trains_fp32_parameters_on_a_frozen_bf16_base():
    model = wrap_with_lora(bf16_base_model(), LoraArguments(use_peft=True, lora_r=4), TaskType.SEQ_CLS, run_args())
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("score" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable  # peft's head copy came in bf16
    assert frozen == {torch.bfloat16}


def test_lora_under_zero3_keeps_one_dtype_and_reentrant_checkpointing():
    """As TRL: adapters in the base's dtype (ZeRO-3 gathers one dtype; it keeps fp32 master weights itself),
    reentrant checkpointing on both of transformers' names for its kwargs, input embeddings' outputs requiring grad."""
    args = run_args(deepspeed="ds.json", deepspeed_plugin=SimpleNamespace(zero_stage=3), gradient_checkpointing=True,
                    activation_checkpointing_kwargs=None, gradient_checkpointing_kwargs=None)
    model = wrap_with_lora(bf16_base_model(), LoraArguments(use_peft=True, lora_r=4), TaskType.SEQ_CLS, args)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}
    assert args.gradient_checkpointing_kwargs is args.activation_checkpointing_kwargs  # TRL reads the old name
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad


@pytest.fixture
def bt_bf16(monkeypatch, tmp_path):
    """bradley-terry-rm/train.py in this process with bf16 on (this CPU counts as bf16-capable), and a run(flags)
    that trains and returns (the model as trained, its initial parameters, metrics.json, the output directory)."""
    monkeypatch.setattr(distributed, "bf16_available", lambda: True)
    spec = importlib.util.spec_from_file_location("bt_train_precision", TRAIN)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bt_train_precision", module)  # the Trainer pickles its arguments' class
    spec.loader.exec_module(module)
    loaded = []

    def load_and_keep(*args, **kwargs):
        model = module_load(*args, **kwargs)
        if not loaded:  # the model trained; later loads are the merge's base and the reload check's
            loaded.append((model, {name: p.detach().clone() for name, p in model.named_parameters()}))
        return model

    module_load = module.load_reward_model
    monkeypatch.setattr(module, "load_reward_model", load_and_keep)

    def run(*flags):
        out = tmp_path / "out"
        monkeypatch.setattr(sys, "argv", ["train.py", "--output_path", str(out), "--overwrite_output_dir",
                                          "--warmup_ratio", "0", "--logging_steps", "1", *flags])
        module.main()
        return (*loaded[0], json.loads((out / "metrics.json").read_text()), out)

    return run


def changed_share(model, initial, name: str) -> float:
    param = dict(model.named_parameters())[name]
    return (param.detach() != initial[name]).float().mean().item()


def test_bf16_training_updates_fp32_weights_and_the_reload_check_holds(bt_bf16):
    """At lr 2e-5 AdamW's first steps move each weight by about 2e-5; weights of std 0.02 held in bf16 (spacing
    ~1.2e-4 around 0.02) round nearly all of those moves away, and fp32 keeps every one."""
    model, initial, metrics, out = bt_bf16("--max_steps", "5", "--learning_rate", "2e-5")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    trained = [name for name in initial if ".layers." in name or name.startswith("score.")]
    assert trained and all(changed_share(model, initial, name) > 0.99 for name in trained), \
        {name: changed_share(model, initial, name) for name in trained}
    assert metrics["dtype"] == "weights=float32 compute=bf16 autocast"
    with safe_open(out / "last_checkpoint" / "model.safetensors", "pt") as saved:
        assert {saved.get_slice(key).get_dtype() for key in saved.keys()} == {"F32"}  # noqa: SIM118 (not iterable)
    # The reload check (in main) scored the reloaded fp32 checkpoint under the Trainer's bf16 autocast and held it
    # to the bf16 tolerance: under autocast every reward is a bf16 matmul output, and two forwards that batch the
    # same sequences differently may round it one bf16 step apart (2^-8 of it: more than the fp32 tolerance of 1e-3
    # from 0.25 up), while a lost head or lost shards move rewards by whole units.
    assert 0 <= metrics["reload_max_abs_diff"] <= 5e-2


def test_bf16_lora_trains_fp32_adapters_and_head_on_a_bf16_base(bt_bf16):
    model, initial, metrics, _ = bt_bf16("--max_steps", "3", "--learning_rate", "1e-3", "--use_peft",
                                         "--lora_r", "4")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    head = trainable["score.modules_to_save.default.weight"]  # peft's trained copy of the loaded head
    assert (head.detach() != initial["score.weight"].float()).float().mean().item() > 0.99
    assert metrics["dtype"] == "weights=bfloat16 (frozen base; trained parameters float32) compute=bf16 autocast"
    assert 0 <= metrics["reload_max_abs_diff"] <= 5e-2  # the merged bf16 checkpoint, scored under the same autocast
