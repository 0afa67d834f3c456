"""math-rm/scalar_orm_train.py's recipe: math-rm/llama-3.1-scalar-orm.yaml carries upstream's model, data and
hyper-parameters (upstream's math-rm/scalar_orm_train.py argument defaults and hard-coded TrainingArguments, written
out by hand below), read the way math-rm/train.py reads its recipes; the script's own defaults stay the tiny model's.
"""

import importlib.util
import json
import os
import re
import sys

import pytest

from helpers import ROOT, check_ok, run
from useful_code.cli import parse_args, read_config
from useful_code.hardware import bf16_available

RECIPE = ROOT / "math-rm" / "llama-3.1-scalar-orm.yaml"


@pytest.fixture(scope="module")
def scalar_orm():
    spec = importlib.util.spec_from_file_location("scalar_orm_train", ROOT / "math-rm" / "scalar_orm_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def same_environment(monkeypatch, tmp_path):
    """Parsing training arguments may set up process state: leave the environment as it was; a relative output
    directory lands in tmp_path."""
    saved = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved)


def parse(module, argv):
    return parse_args((module.ScriptArguments, module.ScalarORMTrainingArguments), None, argv=argv)


def value(enum_or_str):
    return getattr(enum_or_str, "value", enum_or_str)


def test_scalar_orm_recipe_gives_upstreams_values(scalar_orm):
    script, training, config = parse(scalar_orm, [str(RECIPE)])
    assert config == str(RECIPE)
    # upstream's ScriptArguments defaults
    assert script.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert script.train_set_path == "RLHFlow/Mistral-ORM-Data"
    assert script.eval_holdout_size == 500  # upstream's eval_dataset = ds.select(range(500))
    assert training.output_dir == "./models/llama3_orm"  # the recipe's key is upstream's output_path
    assert training.learning_rate == 1e-6 and training.weight_decay == 0.001
    assert training.per_device_train_batch_size == 8 and training.per_device_eval_batch_size == 4
    assert training.gradient_accumulation_steps == 2 and training.num_train_epochs == 1
    assert value(training.lr_scheduler_type) == "cosine" and training.max_length == 4096
    assert training.gradient_checkpointing is True and training.activation_checkpointing is True
    # save_every_steps 999999: no periodic saves; eval_every_steps 50
    assert value(training.save_strategy) == "no"
    assert value(training.eval_strategy) == "steps" and training.eval_steps == 50
    # upstream's hard-coded TrainingArguments: warmup_ratio 0.03, logging every step
    assert training.warmup_steps == 0.03 and training.logging_steps == 1
    assert training.max_grad_norm == 1.0 and training.seed == 42
    # upstream's paged_adamw_32bit needs bitsandbytes, which this project does not install: plain AdamW, as the BT
    # recipes do; upstream's bf16 is asked for and granted where the machine has it (fp32 on this CPU)
    assert value(training.optim) == "adamw_torch"
    raw = read_config(str(RECIPE))
    assert raw["bf16"] is True and "paged_adamw_32bit" in RECIPE.read_text()
    assert training.bf16 is bf16_available()


def test_flags_override_the_recipe_and_the_defaults_stay_tiny(scalar_orm):
    _, training, _ = parse(scalar_orm, [str(RECIPE), "--learning_rate", "2e-6", "--warmup_ratio", "0.1",
                                        "--output_path", "elsewhere"])
    assert training.learning_rate == 2e-6 and training.warmup_steps == 0.1 and training.output_dir == "elsewhere"
    assert training.per_device_train_batch_size == 8  # the rest still the recipe's
    _, training, _ = parse(scalar_orm, ["--config", str(RECIPE)])
    assert training.learning_rate == 1e-6

    # No recipe: the tiny model's values, unchanged (the project runs on a CPU with the tiny model by default).
    script, training, config = parse(scalar_orm, [])
    assert config is None
    assert script.model_name.endswith("tiny-llama") and script.train_set_path.endswith("toy_math/prm")
    assert training.learning_rate == 1e-3 and training.warmup_steps == 0 and training.weight_decay == 0
    assert value(training.lr_scheduler_type) == "linear" and training.max_length == 512
    assert training.per_device_train_batch_size == 16 and training.gradient_accumulation_steps == 1
    assert not training.gradient_checkpointing and training.bf16 is False
    assert value(training.eval_strategy) == "no"


@pytest.mark.e2e
def test_the_recipe_trains_with_the_tiny_model_standing_in(tmp_path):
    """The recipe's run on a CPU: the tiny model and the toy solutions stand in for Llama-3.1-8B and upstream's data;
    gradient checkpointing on, evaluation every 2 steps instead of 50."""
    out = tmp_path / "orm"
    proc = run([sys.executable, "math-rm/scalar_orm_train.py", str(RECIPE), "--model_name",
                str(ROOT / "assets" / "tiny-llama"),
                "--train_set_path", str(ROOT / "assets" / "data" / "toy_math" / "prm"),
                "--output_dir", str(out), "--max_steps", "3", "--eval_every_steps", "2", "--max_length", "256"],
               env_extra={"OMP_NUM_THREADS": "1"})
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"] == str(RECIPE) and metrics["train_steps"] == 3
    arguments = metrics["arguments"]
    assert arguments["learning_rate"] == 1e-6 and arguments["warmup_steps"] == 0.03
    assert arguments["lr_scheduler_type"] == "cosine" and arguments["optim"] == "adamw_torch"
    assert arguments["activation_checkpointing"] is True and arguments["gradient_accumulation_steps"] == 2
    # periodic evaluation: at step 2 (epoch 2 x 16 / 1000 rows) and, as transformers does, at the last step
    evaluations = re.findall(r"\{'eval_loss'[^}]*'epoch': '([0-9.]+)'\}", proc.stdout + proc.stderr)
    assert evaluations == ["0.032", "0.048"]
    assert metrics["examples"]["eval"]["used"] == 100 and metrics["reload_max_abs_diff"] < 1e-4


def test_solutions_cut_to_max_length_are_said_not_only_counted(scalar_orm, capsys):
    """The scalar ORM cuts over-long solutions from the left (no --overlength): the count reached metrics.json only,
    while the run printed an accuracy with status 0."""
    from useful_code.data import load_split
    from useful_code.defaults import DEFAULT_MODEL
    from useful_code.math_data import TOY_PRM
    from useful_code.templates import load_tokenizer

    rows = load_split(TOY_PRM, "test", "t").select(range(6))
    tokenizer = load_tokenizer(DEFAULT_MODEL, "m")
    dataset, stats = scalar_orm.solution_rows(rows, tokenizer, 8, False, "eval set")
    assert stats["truncated"] == 6 and {len(ids) for ids in dataset["input_ids"]} == {8}
    assert "[eval set] truncated 6 solutions longer than max_length=8 tokens from the left" in capsys.readouterr().out
    scalar_orm.solution_rows(rows, tokenizer, 4096, False, "eval set")
    assert "truncated" not in capsys.readouterr().out
