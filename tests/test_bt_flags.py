"""bradley-terry-rm/train.py's flags: upstream's names beside transformers' own (periodic saves and evaluations),
packages a flag needs, LoRA target modules, and upstream's per-model script names."""

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch

from helpers import ROOT, check_ok, run
from useful_code.cli import UserError, parse_args
from useful_code.defaults import DEFAULT_MODEL

TRAIN = str(ROOT / "bradley-terry-rm" / "train.py")


@pytest.fixture(scope="module")
def bt():
    """train.py as a module (its folder's name has a hyphen: loaded by path)."""
    spec = importlib.util.spec_from_file_location("bt_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsed(bt, *flags):
    """(script arguments, training arguments, LoRA arguments, config path) of train.py for these flags."""
    return parse_args((bt.ScriptArguments, bt.RewardTrainingArguments, bt.LoraArguments), bt.DEFAULT_CONFIG,
                      argv=["--output_path", "/tmp/unused", *flags])


def training_args(bt, *flags):
    return parsed(bt, *flags)[1]


def schedule(args):
    return (str(getattr(args.save_strategy, "value", args.save_strategy)), args.save_steps,
            str(getattr(args.eval_strategy, "value", args.eval_strategy)), args.eval_steps)


def test_periodic_saves_and_evals_by_either_name(bt):
    assert schedule(training_args(bt)) == ("no", 500, "no", None)  # off unless asked for
    assert schedule(training_args(bt, "--save_every_steps", "7", "--eval_every_steps", "3")) == ("steps", 7, "steps", 3)
    # transformers' own flags are honoured, not overwritten
    assert schedule(training_args(bt, "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "epoch")) \
        == ("steps", 2, "epoch", None)
    # upstream's 999999 means never
    assert schedule(training_args(bt, "--save_every_steps", "999999", "--eval_every_steps", "999999")) == (
        "no", 500, "no", None)
    # a number of steps alone means every that many steps
    assert schedule(training_args(bt, "--save_steps", "5", "--eval_steps", "3")) == ("steps", 5, "steps", 3)
    # both kinds agreeing is fine
    assert schedule(training_args(bt, "--save_every_steps", "4", "--save_strategy", "steps", "--save_steps", "4"))[:2] \
        == ("steps", 4)


@pytest.mark.parametrize("flags,message", [
    (("--save_every_steps", "5", "--save_strategy", "epoch"),
     "--save_every_steps 5 (upstream's name for --save_strategy steps --save_steps 5) disagrees with --save_strategy "
     "epoch: give one or the other"),
    (("--eval_every_steps", "5", "--eval_steps", "4"),
     "--eval_every_steps 5 (upstream's name for --eval_strategy steps --eval_steps 5) disagrees with --eval_steps 4: "
     "give one or the other"),
    (("--save_every_steps", "999999", "--save_strategy", "steps"),
     "--save_every_steps 999999 (upstream's name for --save_strategy no) disagrees with --save_strategy steps: give "
     "one or the other"),
    (("--save_strategy", "no", "--save_steps", "5"),
     "--save_steps 5 does nothing with --save_strategy no: drop one of them"),
    (("--save_every_steps", "0"), "--save_every_steps must be at least 1, got 0"),
    (("--eval_every_steps", "-2"), "--eval_every_steps must be at least 1, got -2"),
    # transformers would save never, or evaluate at every step
    (("--save_steps", "0"), "--save_steps must be above 0 (a number of steps, or below 1 a fraction of them), got 0"),
    (("--eval_steps", "-2"), "--eval_steps must be above 0 (a number of steps, or below 1 a fraction of them), got -2"),
    (("--bf16_full_eval", "true"), "--bf16_full_eval is not supported: the Trainer would cast the trained model "
     "itself to half precision to evaluate it, and the final checkpoint would be saved so (evaluation runs in the "
     "training precision: --bf16 covers it)"),
    (("--fp16_full_eval", "true"), "--fp16_full_eval is not supported: the Trainer would cast the trained model "
     "itself to half precision to evaluate it, and the final checkpoint would be saved so (evaluation runs in the "
     "training precision: --bf16 covers it)"),
])
def test_disagreeing_or_out_of_range_periodic_flags_are_one_line(bt, flags, message):
    with pytest.raises(UserError) as err:
        training_args(bt, *flags)
    assert str(err.value) == message


def test_an_optimizer_or_reporter_without_its_package_is_one_line(bt):
    """At parse time, in every trainer's arguments (HardwareAwareArguments): BT's here, the others' below."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations
    from transformers.utils import is_bitsandbytes_available

    if is_bitsandbytes_available() or "wandb" in get_available_reporting_integrations():
        pytest.skip("bitsandbytes or wandb is installed here")
    training_args(bt, "--optim", "adamw_torch", "--report_to", "none")  # fine
    with pytest.raises(UserError, match=r"^--optim paged_adamw_32bit needs a package that is not installed \(.*"
                                        r"bitsandbytes.*\); or pass --optim adamw_torch$"):
        training_args(bt, "--optim", "paged_adamw_32bit")
    with pytest.raises(UserError, match=r"^--report_to wandb needs the wandb package, which is not installed: pip "
                                        r"install wandb, or pass --report_to none$"):
        training_args(bt, "--report_to", "wandb")
    with pytest.raises(UserError, match=r"^--report_to nosuch: not a reporter; pass none or one of .*wandb"):
        training_args(bt, "--report_to", "nosuch")
    trainers = {"pair-pm/train.py": "PreferenceModelConfig", "math-rm/train.py": "MathRewardConfig",
                "math-rm/scalar_orm_train.py": "ScalarORMTrainingArguments"}
    for script, arguments in trainers.items():
        spec = importlib.util.spec_from_file_location(f"trainer_{script.replace('/', '_')}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(UserError, match=r"^--optim paged_adamw_32bit needs a package"):
            parse_args((getattr(module, arguments),), None,
                       argv=["--output_dir", "/tmp/unused", "--optim", "paged_adamw_32bit"])


def test_lora_target_modules_must_name_modules_of_the_model():
    """In every trainer (wrap_with_lora checks first): a name peft would reject with a traceback, or silently skip in
    a list that matches in part."""
    from useful_code.lora import LoraArguments, TaskType, check_lora_targets, wrap_with_lora
    from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_preference_model, load_reward_model
    from useful_code.templates import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model_name")
    model = load_reward_model(DEFAULT_MODEL, "--model_name", tokenizer, torch.float32, new_weights=REWARD_HEAD_WEIGHTS)
    check_lora_targets(model, None)
    check_lora_targets(model, ["q_proj", "v_proj", "layers.0.mlp.up_proj"])  # last parts or a longer path
    linear = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    with pytest.raises(UserError) as err:
        check_lora_targets(model, ["q_proj", "foo", "score"])
    assert str(err.value) == (f"--lora_target_modules: foo, score is not a module of this model (the 'score' head "
                              f"trains in full); its linear layers are {linear}; leave the flag unset for all")
    # a block or a norm is a module, but not a layer LoRA adapts (peft's ValueError traceback before)
    with pytest.raises(UserError) as err:
        check_lora_targets(model, ["q_proj", "mlp", "input_layernorm"])
    assert str(err.value) == ("--lora_target_modules: mlp, input_layernorm names no layer LoRA can adapt (LlamaMLP, "
                              f"LlamaRMSNorm); its linear layers are {linear}; leave the flag unset for all")
    check_lora_targets(model, ["embed_tokens"])  # an embedding is adaptable
    causal_lm = load_preference_model(DEFAULT_MODEL, "--model_name", tokenizer, torch.float32)
    with pytest.raises(UserError, match=f"^--lora_target_modules: foo is not a module of this model; its linear "
                                        f"layers are {linear};"):  # not lm_head: an adapter there is refused
        wrap_with_lora(causal_lm, LoraArguments(use_peft=True, lora_target_modules=["foo"]), TaskType.CAUSAL_LM)
    with pytest.raises(UserError) as err:  # TRL's SFTTrainer refused it with a traceback, after loading the data
        check_lora_targets(causal_lm, ["q_proj", "lm_head"])
    assert str(err.value) == ("--lora_target_modules: lm_head is the model's output layer, which LoRA does not adapt "
                              f"here (TRL refuses it); its linear layers are {linear}; leave the flag unset for all")


def test_a_resume_with_other_lora_settings_is_one_line(tmp_path):
    """The Trainer fails on another rank or targets with a state-dict or optimizer traceback, on a LoRA checkpoint
    without --use_peft with "can't find a checkpoint index", and resumes another alpha without a word."""
    from useful_code.lora import LoraArguments, TaskType, check_resume_settings, wrap_with_lora
    from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model
    from useful_code.templates import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model_name")

    def model(**lora):
        base = load_reward_model(DEFAULT_MODEL, "--model_name", tokenizer, torch.float32,
                                 new_weights=REWARD_HEAD_WEIGHTS)
        return wrap_with_lora(base, LoraArguments(use_peft=True, **lora), TaskType.SEQ_CLS) if lora else base

    lora_checkpoint, full_checkpoint = tmp_path / "checkpoint-2", tmp_path / "full" / "checkpoint-2"
    model(lora_r=16).save_pretrained(lora_checkpoint)
    model().save_pretrained(full_checkpoint)
    check_resume_settings(model(lora_r=16), str(lora_checkpoint))  # the same settings
    check_resume_settings(model(), str(full_checkpoint))
    check_resume_settings(model(lora_r=4), None)  # not resuming
    with pytest.raises(UserError, match="a checkpoint of LoRA adapters: resume it with --use_peft"):
        check_resume_settings(model(), str(lora_checkpoint))
    with pytest.raises(UserError, match="a checkpoint of the whole model, not of LoRA adapters: resume it without "
                                        "--use_peft"):
        check_resume_settings(model(lora_r=16), str(full_checkpoint))
    with pytest.raises(UserError) as err:
        check_resume_settings(model(lora_r=8, lora_alpha=256, lora_target_modules=["q_proj"]), str(lora_checkpoint))
    message = str(err.value)
    assert message.startswith(f"--resume_from_checkpoint {lora_checkpoint}: its adapters were trained with other LoRA "
                              "settings: --lora_r 8 (the checkpoint: 16); --lora_alpha 256 (the checkpoint: 32); "
                              "--lora_target_modules ['q_proj'] (the checkpoint: ['model.layers.0.mlp.down_proj',")
    assert message.endswith("resume with the checkpoint's settings")


@pytest.mark.e2e
def test_checks_come_before_any_work(tmp_path):
    from transformers.utils import is_bitsandbytes_available

    if is_bitsandbytes_available():
        pytest.skip("bitsandbytes is installed here")
    proc = run([sys.executable, TRAIN, "--output_path", str(tmp_path / "o"), "--optim", "paged_adamw_32bit"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --optim paged_adamw_32bit needs a package")
    assert not (tmp_path / "o").exists()
    proc = run([sys.executable, TRAIN, "--output_path", str(tmp_path / "l"), "--use_peft", "--lora_target_modules",
                "foo", "--max_steps", "1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --lora_target_modules: foo is not a module")


@pytest.mark.e2e
def test_transformers_save_and_eval_flags_work_and_train_tokens_survive_a_resume(tmp_path):
    """--save_strategy steps --save_steps 2 --eval_strategy steps --eval_steps 2 give checkpoint-2 and evaluations at
    steps 2 and 4; a run resumed from checkpoint-2 reports the whole run's train_tokens, equal to the whole run's."""
    flags = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
             "--eval_steps", "2", "--logging_steps", "1"]
    whole = tmp_path / "whole"
    check_ok(run([sys.executable, TRAIN, "--output_path", str(whole), *flags], {"OMP_NUM_THREADS": "1"}))
    assert (whole / "checkpoint-2" / "trainer_state.json").exists()
    history = json.loads((whole / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [2, 4]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    proc = run([sys.executable, TRAIN, "--output_path", str(resumed), *flags, "--resume_from_checkpoint", "latest"],
               {"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    first_half = json.loads((whole / "checkpoint-2" / "train_tokens_rank0.json").read_text())
    tokens = {name: json.loads((out / "metrics.json").read_text())["train_tokens"] for name, out in
              (("whole", whole), ("resumed", resumed))}
    assert 0 < first_half["real"] < tokens["whole"]["real"]
    assert tokens["resumed"] == tokens["whole"]
    # each step's statistics are read from the device at its log (or a save): every step logged once, with its own
    # numbers, and the token counts a checkpoint holds are those of the steps before it
    steps = [entry for entry in history if "num_tokens" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    # logged: the run's counts so far
    assert [entry["num_tokens"] for entry in steps][1::2] == [first_half["real"], tokens["whole"]["real"]]
    assert steps[-1]["computed_tokens"] == tokens["whole"]["computed"]
    assert all(a["num_tokens"] < b["num_tokens"] for a, b in zip(steps, steps[1:]))
    for entry in steps:
        assert 0 <= entry["accuracy"] <= 1 and entry["rewards/min"] <= entry["rewards/mean"] <= entry["rewards/max"]


@pytest.mark.e2e
def test_upstream_script_names_run_train_py_with_their_recipe(tmp_path):
    proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / "gemma_2B_rm.py"), "--help"])
    check_ok(proc)
    text = " ".join(proc.stdout.split())
    assert "The initial learning rate for the optimizer. (default: 1e-05)" in text  # gemma-2b-it.yaml
    assert "(default: 32)" in text  # its gradient accumulation
    for script, lr in (("llama3_8B_rm.py", "2e-06"), ("mistral_7B_rm.py", "5e-06")):
        proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / script), "--help"])
        assert f"The initial learning rate for the optimizer. (default: {lr})" in " ".join(proc.stdout.split())

    # The recipe names google/gemma-2b-it and upstream's data: the tiny model and toy pairs stand in, on a CPU.
    out = tmp_path / "gemma"
    proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / "gemma_2B_rm.py"), "--model_name", DEFAULT_MODEL,
                "--train_set_path", str(ROOT / "assets" / "data" / "toy_preference"), "--output_path", str(out),
                "--max_steps", "2", "--max_length", "128", "--gradient_accumulation_steps", "2",
                "--per_device_eval_batch_size", "32"])
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"].endswith("bradley-terry-rm/configs/gemma-2b-it.yaml") and metrics["train_steps"] == 2
    assert metrics["arguments"]["learning_rate"] == 1e-5 and metrics["arguments"]["activation_checkpointing"] is True
    assert metrics["arguments"]["gradient_accumulation_steps"] == 2
    # a recipe on the command line wins over the script's
    proc = run([sys.executable, str(ROOT / "bradley-terry-rm" / "gemma_2B_rm.py"), "bradley-terry-rm/configs/tiny.yaml",
                "--help"])
    assert "(default: 0.001)" in " ".join(proc.stdout.split())


def test_odin_script_takes_upstreams_recipe_and_flag_names(bt):
    """Upstream's odin/README.md runs bradley-terry-rm/gemma_two_head.py with its own flag names."""
    wrapper = (ROOT / "bradley-terry-rm" / "gemma_two_head.py").read_text()
    assert 'run_with_recipe("gemma-two-head-odin.yaml")' in wrapper
    recipe = str(ROOT / "bradley-terry-rm" / "configs" / "gemma-two-head-odin.yaml")
    classes = (bt.ScriptArguments, bt.RewardTrainingArguments, bt.LoraArguments)
    script, args, _, _ = parse_args(classes, recipe, argv=[])
    assert (script.loss_type, script.odin_length_coefficient, script.odin_ortho_coefficient) == ("odin", 1.0, 0.0)
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2e-6, 16, 2)
    assert (script.model_name, args.max_length) == ("google/gemma-2b-it", 4096)
    assert args.output_dir == "./bt_models/gemma2b_rm"
    script, _, _, _ = parse_args(classes, recipe, argv=["--correlation_with_length", "0.5", "--ortho_reg", "0.25"])
    assert (script.odin_length_coefficient, script.odin_ortho_coefficient) == (0.5, 0.25)
    script = parse_args(classes, recipe, argv=["--ortho_reg", "2"])[0]
    assert (script.odin_length_coefficient, script.odin_ortho_coefficient) == (1.0, 2.0)
    assert parsed(bt, "--loss_type", "odin")[0].odin_length_coefficient == 1.0  # ODIN's default
    # upstream's plain BT scripts had no such flags: an ODIN coefficient on another loss would be ignored, so it is
    # refused (gemma_2B_rm.py --correlation_with_length 0.5 trained plain BT)
    assert parsed(bt)[0].odin_length_coefficient is None
    with pytest.raises(UserError, match=r"^--odin_length_coefficient \(--correlation_with_length\): an ODIN setting, "
                                        r"which applies only with --loss_type odin \(here: bt\)"):
        parsed(bt, "--correlation_with_length", "0.5")
    with pytest.raises(UserError, match=r"^--odin_ortho_coefficient \(--ortho_reg\): .* \(here: margin\)"):
        parsed(bt, "--loss_type", "margin", "--odin_ortho_coefficient", "1")


def test_settings_a_loss_would_ignore_are_one_line(bt):
    """Each was accepted and had no effect (the ODIN loss has no centering term; label smoothing applies to class
    labels), or made ODIN's terms vanish: its orthogonality term under ZeRO-3, its length correlation on one pair."""
    from types import SimpleNamespace

    with pytest.raises(UserError, match=r"^--center_rewards_coefficient does not apply to --loss_type odin"):
        parsed(bt, "--loss_type", "odin", "--center_rewards_coefficient", "0.01")
    with pytest.raises(UserError, match=r"^--label_smoothing_factor: not applied by the Bradley-Terry losses"):
        parsed(bt, "--label_smoothing_factor", "0.1")
    args = parsed(bt, "--loss_type", "odin")[0]

    def run_args(zero3, batch):
        return SimpleNamespace(deepspeed="ds.json" if zero3 is not None else None, per_device_train_batch_size=batch,
                               hf_deepspeed_config=SimpleNamespace(is_zero3=lambda: bool(zero3)))

    bt.check_odin_settings(args, run_args(None, 2))
    bt.check_odin_settings(args, run_args(False, 2))  # ZeRO-2: the head is whole
    with pytest.raises(UserError, match="--loss_type odin under ZeRO-3: its orthogonality term needs the head's whole "
                                        "weight"):
        bt.check_odin_settings(args, run_args(True, 2))
    bt.check_odin_settings(parsed(bt, "--loss_type", "odin", "--ortho_reg", "0")[0], run_args(True, 2))
    with pytest.raises(UserError, match="always \\+-1 for one pair"):
        bt.check_odin_settings(args, run_args(None, 1))
    bt.check_odin_settings(parsed(bt, "--loss_type", "odin", "--max_tokens_per_batch", "512")[0], run_args(None, 1))
    block = SimpleNamespace(classifier=torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    with pytest.raises(UserError, match="reward head is one linear layer .* SimpleNamespace's is Sequential"):
        bt.check_odin_head(block)
    bt.check_odin_head(SimpleNamespace(score=torch.nn.Linear(4, 2)))


def test_a_margin_column_the_loss_does_not_read_is_said(bt, tmp_path, capsys):
    """TRL's RewardTrainer applies a 'margin' column whenever the data has one; plain BT drops it, said once."""
    rows = [{"prompt": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i}", "margin": 1.0} for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = parsed(bt, "--train_set_path", str(path), "--eval_holdout_size", "5")[0]
    train, _, _ = bt.load_pairs(args, 0)
    assert "margin" not in train.column_names
    assert ("note: --loss_type bt does not use the train set's 'margin' column (--loss_type margin does)"
            in capsys.readouterr().out)
    train, _, _ = bt.load_pairs(parsed(bt, "--train_set_path", str(path), "--eval_holdout_size", "5",
                                       "--loss_type", "margin")[0], 0)
    assert train["margin"] == [1.0] * 15 and "does not use" not in capsys.readouterr().out


def test_deepspeed_without_a_launcher_is_a_world_of_one():
    """Plain `python train.py --deepspeed ...`: the variables DeepSpeed's MPI discovery would set for one process, so
    it needs no mpi4py; a launcher's own variables are left alone (the ZeRO-3 run itself: test_bt_end_to_end.py)."""
    from useful_code.distributed import set_single_process_env

    saved = dict(os.environ)  # restored whole: a leaked RANK/WORLD_SIZE would make later tests look distributed
    try:
        for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
        set_single_process_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
                os.environ["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
        assert 0 < int(os.environ["MASTER_PORT"]) < 65536
        os.environ.update(LOCAL_RANK="1", RANK="3", WORLD_SIZE="4", MASTER_PORT="29555")
        set_single_process_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("3", "4", "29555")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_deepspeed_config_that_contradicts_the_flags_is_one_line_before_any_work(tmp_path):
    """transformers and DeepSpeed find these only once training starts (a traceback on every rank), or, for a ZeRO-3
    config that gathers no weights at save, when the finished run's checkpoint is empty."""
    base = json.loads((ROOT / "deepspeed_configs" / "deepspeed_3.json").read_text())
    no_gather = json.loads(json.dumps(base))
    del no_gather["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    cases = {
        "batch": ({**base, "train_micro_batch_size_per_gpu": 4}, TRAIN, [],
                  "the config contradicts the run's flags: train_micro_batch_size_per_gpu is 4 there, 16 from "
                  "--per_device_train_batch_size; set these config values to \"auto\""),
        "bf16": ({**base, "bf16": {"enabled": True}, "gradient_accumulation_steps": 1}, TRAIN,
                 ["--gradient_accumulation_steps", "2"],
                 "gradient_accumulation_steps is 1 there, 2 from --gradient_accumulation_steps; bf16.enabled is True "
                 "there, False from --bf16 (this machine has no bf16-capable GPU: the run is fp32)"),
        "gather": (no_gather, str(ROOT / "pair-pm" / "train.py"), [],
                   "a ZeRO-3 config needs \"stage3_gather_16bit_weights_on_model_save\": true in zero_optimization"),
    }
    for name, (config, script, flags, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        out = tmp_path / f"out_{name}"
        proc = run([sys.executable, script, "--deepspeed", str(path), "--output_dir", str(out), *flags])
        assert proc.returncode == 2 and message in proc.stderr, (name, proc.stderr[-600:])
        assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.e2e
def test_dropout_is_off_in_training_unless_kept(tmp_path):
    """A base model with attention dropout trains without it (TRL's default), said once; --disable_dropout false
    keeps it (no note)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from useful_code.templates import load_tokenizer

    base = tmp_path / "dropout-llama"
    config = AutoConfig.from_pretrained(DEFAULT_MODEL, attention_dropout=0.2)
    AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, config=config).save_pretrained(base)
    load_tokenizer(DEFAULT_MODEL, "m").save_pretrained(base)
    flags = ["--model_name", str(base), "--max_steps", "1", "--max_length", "128"]
    proc = run([sys.executable, TRAIN, "--output_path", str(tmp_path / "off"), *flags], {"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert f"Dropout off in training: {config.num_hidden_layers} dropout layers of {base}" in proc.stdout
    proc = run([sys.executable, TRAIN, "--output_path", str(tmp_path / "kept"), *flags, "--disable_dropout", "false"],
               {"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    assert "Dropout off" not in proc.stdout
    assert json.loads((tmp_path / "kept" / "metrics.json").read_text())["arguments"]["disable_dropout"] is False


def test_lora_settings_without_use_peft_are_one_line():
    """They would be ignored and the whole model trained, without a word."""
    from useful_code.lora import LoraArguments

    with pytest.raises(UserError, match=r"^--lora_r, --lora_target_modules: LoRA settings, which apply only with "
                                        r"--use_peft \(without it the whole model trains\): pass --use_peft"):
        LoraArguments(lora_r=8, lora_target_modules=["q_proj"])
    assert LoraArguments(use_peft=True, lora_r=8).lora_r == 8 and not LoraArguments().use_peft


def test_logged_accuracy_margin_and_mean_are_over_the_windows_pairs(bt):
    """Token-budget batches hold different numbers of pairs: a window's accuracy is its share of pairs ranked right
    (17 of 35 here; the mean of the batch accuracies would be 0.4718), its min and max the window's extremes."""
    pairs = [7, 5, 7, 4, 6, 6]
    right = [2, 1, 3, 1, 5, 5]
    logs = bt.window_metrics({"accuracy": [r / n for r, n in zip(right, pairs)], "pairs": pairs,
                              "margin": [1.0, 2.0, 0.0, 0.0, 0.0, 0.0], "rewards/mean": [0.5] * 6,
                              "rewards/min": [-1.0, -3.0, -2.0, 0.0, 0.0, 0.0], "rewards/max": [1.0, 4.0, 2.0, 0, 0, 0],
                              "num_tokens": [100, 200, 300, 400, 500, 600]})
    assert logs == pytest.approx({"accuracy": 17 / 35, "margin": 17 / 35, "rewards/mean": 0.5, "rewards/min": -3.0,
                                  "rewards/max": 4.0, "num_tokens": 350.0}, rel=1e-12)


def test_prefix_sharing_by_default_on_a_cpu_only_and_when_asked_anywhere(bt):
    """Measured on an H200, plain padding-free beat prefix sharing (its tree mask keeps SDPA off the flash kernel):
    the default shares prefixes where the model will train on a CPU, not on a GPU; the flag decides either way."""
    import copy

    import torch

    from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model
    from useful_code.templates import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL, "--m")
    base = load_reward_model(DEFAULT_MODEL, "--m", tokenizer, torch.float32, new_weights=REWARD_HEAD_WEIGHTS)
    cases = {((), "cpu"): (True, True), ((), "cuda"): (True, False), (("--prefix_sharing", "true"), "cuda"):
             (True, True), (("--prefix_sharing", "false"), "cpu"): (True, False),
             (("--padding_free", "false"), "cpu"): (False, False)}
    for (flags, device), expected in cases.items():
        chosen = bt.choose_packing(copy.deepcopy(base), parsed(bt, *flags)[0], False, torch.device(device))
        assert chosen == expected, (flags, device)
    for flag, value in (("--prefix_sharing", "true"), ("--max_tokens_per_batch", "300")):
        with pytest.raises(UserError, match=f"^{flag} needs padding-free training: drop --padding_free false$"):
            parsed(bt, flag, value, "--padding_free", "false")


def test_train_sampling_strategy_is_honoured_or_refused_never_overwritten(bt):
    """transformers' --train_sampling_strategy beside the trainer's own batching (--group_by_length, on by default):
    before, __post_init__ overwrote it, so 'sequential' silently trained on shuffled length groups."""
    assert training_args(bt).train_sampling_strategy == "random" and training_args(bt).group_by_length
    assert training_args(bt, "--group_by_length", "false", "--train_sampling_strategy", "sequential") \
        .train_sampling_strategy == "sequential"
    assert training_args(bt, "--train_sampling_strategy", "group_by_length").group_by_length
    with pytest.raises(UserError, match="--train_sampling_strategy group_by_length and --group_by_length false "
                                        "disagree"):
        training_args(bt, "--group_by_length", "false", "--train_sampling_strategy", "group_by_length")
    with pytest.raises(UserError, match="--train_sampling_strategy sequential: give --group_by_length false"):
        training_args(bt, "--train_sampling_strategy", "sequential")
    with pytest.raises(UserError, match="--train_sampling_strategy batch_rebalance: not supported"):
        training_args(bt, "--train_sampling_strategy", "batch_rebalance")
