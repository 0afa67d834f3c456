"""The one config mechanism (useful_code/cli.py): YAML recipe first, flags over it, one-line errors. Tested with the
real recipes and the libraries' own argument classes (TRL's SFTConfig), as the training scripts use them."""

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional

import pytest
from trl import SFTConfig

from useful_code.cli import UserError, parse_args, read_config, split_config_path
from useful_code.defaults import DEFAULT_MODEL, REPO_ROOT
from useful_code.distributed import HardwareAwareArguments
from useful_code.hardware import bf16_available

PM_TINY = str(REPO_ROOT / "pair-pm" / "tiny.yaml")
ARMO_RECIPE = str(REPO_ROOT / "armo-rm" / "configs" / "llama3-8b.yaml")


@dataclass
class Script:
    model_name_or_path: str = DEFAULT_MODEL
    overlength: str = "error"
    skip_invalid: bool = False


@dataclass
class Config(HardwareAwareArguments, SFTConfig):
    pass


@dataclass
class Aliased:
    output_dir: Optional[str] = field(default="out", metadata={"aliases": ["--output_path"]})
    steps: int = 1


@pytest.fixture(autouse=True)
def same_environment():
    """Parsing training arguments may set up process state: leave the environment as it was."""
    saved = dict(os.environ)
    assert "LOCAL_RANK" not in saved
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("argv,config,rest", [
    (["a.yaml", "--x", "1"], "a.yaml", ["--x", "1"]),
    (["--local_rank=0", "a.yml", "--x", "1"], "a.yml", ["--local_rank=0", "--x", "1"]),
    (["--x", "1", "--config", "a.yaml"], "a.yaml", ["--x", "1"]),
    (["--config=a.yaml", "--x", "1"], "a.yaml", ["--x", "1"]),
    (["--chat_template", "t.yaml", "--x", "1"], None, ["--chat_template", "t.yaml", "--x", "1"]),  # a flag's value
    (["--x", "1"], None, ["--x", "1"]),
])
def test_split_config_path(argv, config, rest):
    assert split_config_path(argv) == (config, rest)


def test_yaml_then_cli_override(tmp_path):
    script, training, config = parse_args((Script, Config), None,
                                          argv=[PM_TINY, "--learning_rate", "0.5", "--output_dir", str(tmp_path)])
    assert config == PM_TINY
    assert training.learning_rate == 0.5  # CLI wins over the YAML's 1.0e-3
    assert training.output_dir == str(tmp_path)
    assert training.per_device_train_batch_size == 16 and training.per_device_eval_batch_size == 32
    assert training.max_length == 512 and training.num_train_epochs == 3 and training.seed == 42
    assert training.packing is False and training.use_cpu is True and training.bf16 is False  # CPU-only machine
    assert script.model_name_or_path == DEFAULT_MODEL  # not in tiny.yaml: the dataclass default
    assert script.overlength == "error" and script.skip_invalid is False


@pytest.mark.parametrize("flag,value", [("--gradient_checkpointing", True), ("--activation_checkpointing", True)])
def test_upstreams_gradient_checkpointing_flag_overrides_the_recipe(tmp_path, flag, value):
    _, training, _ = parse_args((Script, Config), None, argv=[PM_TINY, flag, "true", "--output_dir", str(tmp_path)])
    assert training.activation_checkpointing is value and training.gradient_checkpointing is value
    _, training, _ = parse_args((Script, Config), None, argv=[PM_TINY, "--output_dir", str(tmp_path)])
    assert training.activation_checkpointing is False  # tiny.yaml's gradient_checkpointing: false


def test_local_rank_before_yaml(tmp_path):
    _, training, _ = parse_args((Script, Config), None, argv=["--local_rank=0", PM_TINY, "--output_dir", str(tmp_path)])
    assert training.per_device_train_batch_size == 16 and training.learning_rate == 1e-3
    assert "LOCAL_RANK" not in os.environ


def test_default_config_applies_without_one(tmp_path):
    _, training, config = parse_args((Script, Config), PM_TINY, argv=["--output_dir", str(tmp_path),
                                                                      "--num_train_epochs", "1"])
    assert config == PM_TINY
    assert training.per_device_train_batch_size == 16 and training.learning_rate == 1e-3
    assert training.num_train_epochs == 1


def test_config_keys_may_be_flag_aliases(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_path: somewhere\nsteps: 3\n")
    args, _ = parse_args((Aliased,), None, argv=[str(recipe)])
    assert args.output_dir == "somewhere" and args.steps == 3
    args, _ = parse_args((Aliased,), None, argv=[str(recipe), "--output_path", "else"])
    assert args.output_dir == "else"


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rate: 1.0e-3\nno_such_setting: 3\n")
    with pytest.raises(UserError) as err:
        parse_args((Script, Config), None, argv=[str(recipe), "--output_dir", str(tmp_path)])
    assert str(recipe) in str(err.value) and "no_such_setting" in str(err.value)


def test_unknown_flag_is_a_user_error():
    with pytest.raises(UserError) as err:
        parse_args((Aliased,), None, argv=["--stepz", "3"])
    assert "--stepz" in str(err.value)


@pytest.mark.parametrize("content,message", [(None, "cannot read config"), ("[1, 2]", "must be a YAML mapping"),
                                             ("a: [1,", "not valid YAML")])
def test_unreadable_configs(tmp_path, content, message):
    recipe = tmp_path / "c.yaml"
    if content is not None:
        recipe.write_text(content)
    with pytest.raises(UserError) as err:
        parse_args((Aliased,), None, argv=[str(recipe)])
    assert message in str(err.value) and "c.yaml" in str(err.value)


def test_sections_take_shared_values_through_anchors():
    prepare = read_config(ARMO_RECIPE, "stage-1_prepare")
    train = read_config(ARMO_RECIPE, "stage-2_train")
    assert prepare["model_path"] == train["model_path"] == "sfairXC/FsfairX-LLaMA3-RM-v0.1"
    assert prepare["dataset_path"] == "RLHFlow/ArmoRM-Multi-Objective-Data-v0.1"
    assert train["n_steps"] == 2000 and train["batch_size"] == 1024 and "dataset_path" not in train
    assert read_config(ARMO_RECIPE, "interpret")["model_path"] == read_config(ARMO_RECIPE, "export")["output_path"]
    assert read_config(ARMO_RECIPE, "common")["model_path"] == prepare["model_path"]


def test_a_recipe_without_the_scripts_section_is_an_error(tmp_path):
    """Read as empty, the script would run on its defaults while the user believes the recipe applies."""
    with pytest.raises(UserError, match=r"llama3-8b.yaml has no section 'stage-3_train' for this script \(its "
                                        r"sections: common, stage-1_prepare, .*, interpret\)"):
        read_config(ARMO_RECIPE, "stage-3_train")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("export:\ninterpret:\n")  # present but empty: the defaults, as asked
    assert read_config(str(recipe), "export") == read_config(str(recipe), "interpret") == {}


SCRIPTS_WITH_RECIPES = ["bradley-terry-rm/train.py", "pair-pm/train.py", "math-rm/train.py", "armo-rm/export.py",
                        "armo-rm/interpret.py", "armo-rm/stage-1_prepare.py", "armo-rm/stage-1_train.py",
                        "armo-rm/stage-2_prepare.py", "armo-rm/stage-2_train.py"]


@pytest.mark.parametrize("script", SCRIPTS_WITH_RECIPES)
def test_a_copied_script_keeps_its_default_recipe_and_section(script, tmp_path, monkeypatch):
    """A researcher copies a script anywhere and changes one thing: its default recipe and its recipe section
    must not follow the copy's file name or folder."""
    import importlib.util
    import shutil

    copy = tmp_path / "my_experiment.py"
    shutil.copy(REPO_ROOT / script, copy)
    spec = importlib.util.spec_from_file_location("my_experiment", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    asked = {}

    def record(dataclass_types, default_config=None, section=None, argv=None):
        asked.update(default_config=default_config, section=section)
        raise KeyboardInterrupt  # stop main() at its first step

    monkeypatch.setattr(module, "parse_args", record)
    with pytest.raises(KeyboardInterrupt):
        module.main()
    assert asked["default_config"] == str(REPO_ROOT / Path(script).parent / (
        "configs/tiny.yaml" if script.startswith(("armo", "bradley")) else "tiny.yaml"))
    if script.startswith("armo-rm"):
        assert asked["section"] == Path(script).stem
        for recipe in ("tiny.yaml", "llama3-8b.yaml"):  # both recipes have the section (an error otherwise)
            read_config(str(REPO_ROOT / "armo-rm" / "configs" / recipe), asked["section"])
    else:
        assert asked["section"] is None


@dataclass
class Limited:
    batch_size: int = field(default=8, metadata={"min": 1})
    share: float = field(default=0.5, metadata={"min": 0, "max": 1})
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    optional: Optional[int] = field(default=None, metadata={"min": 1})
    temperature: float = field(default=1.0, metadata={"above": 0, "below": 10})


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "-1"], "--batch_size must be at least 1, got -1"),
    (["--share", "7"], "--share must be at most 1, got 7.0"),
    (["--share", "-0.5"], "--share must be at least 0, got -0.5"),
    (["--mode", "c"], "--mode must be one of a, b, got 'c'"),
    (["--temperature", "0"], "--temperature must be above 0, got 0.0"),
    (["--temperature", "10"], "--temperature must be below 10, got 10.0"),
])
def test_values_outside_their_limits_are_one_line(flags, message):
    with pytest.raises(UserError) as err:
        parse_args((Limited,), None, argv=flags)
    assert str(err.value) == message


def test_values_at_their_limits_pass():
    args, _ = parse_args((Limited,), None, argv=["--batch_size", "1", "--share", "1", "--mode", "b"])
    assert (args.batch_size, args.share, args.mode, args.optional) == (1, 1.0, "b", None)


@pytest.mark.parametrize("flags,message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--learning_rate=-1e-5"], "--learning_rate must be at least 0, got -1e-05"),
    (["--max_length", "0"], "--max_length must be at least 1, got 0"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be above 0 (or --max_steps set), got 0.0"),
    (["--weight_decay", "-1"], "--weight_decay must be at least 0, got -1.0"),
    (["--warmup_steps", "-2"], "Got warmup_steps = -2.0, Expected value warmup_steps >= 0"),  # transformers' own
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--adam_beta1", "1"], "--adam_beta1 must be below 1, got 1.0"),
    (["--logging_steps", "-1"], "--logging_steps must be above 0, got -1.0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be at least 0, got -1.0"),
    (["--bf16", "true", "--fp16", "true"], "--bf16 and --fp16 are both on"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 are both on"),  # bare, though SFTConfig's bf16 defaults to None
    (["--deepspeed", "missing.json"], "--deepspeed: missing.json: no such file"),  # before DeepSpeed starts
    (["--learning_rat", "1e-4"],  # not taken for --learning_rate
     "Some specified arguments are not used by the HfArgumentParser: ['--learning_rat', '1e-4']"),
])
def test_training_argument_limits(tmp_path, flags, message):
    with pytest.raises(UserError) as err:
        parse_args((Script, Config), None, argv=[PM_TINY, "--output_dir", str(tmp_path), *flags])
    assert str(err.value).startswith(message)


def test_zero_epochs_with_max_steps_is_allowed(tmp_path):
    _, training, _ = parse_args((Script, Config), None, argv=[PM_TINY, "--output_dir", str(tmp_path),
                                                              "--num_train_epochs", "0", "--max_steps", "5"])
    assert training.max_steps == 5


def test_a_bare_bool_flag_whose_default_is_none_means_true(tmp_path, capsys):
    # TRL's SFTConfig.bf16 defaults to None (bf16 where the GPU has it); transformers' parser wants a value for it.
    _, training, _ = parse_args((Script, Config), None, argv=[PM_TINY, "--output_dir", str(tmp_path), "--bf16"])
    assert training.bf16 is bf16_available()
    assert ("bf16 requested but this machine has no bf16-capable GPU" in capsys.readouterr().out) is not training.bf16


def test_a_wrong_type_is_one_line_without_usage():
    with pytest.raises(UserError) as err:
        parse_args((Limited,), None, argv=["--batch_size", "abc"])
    assert str(err.value) == "argument --batch_size/--batch-size: invalid int value: 'abc'"


def test_a_rejection_over_several_lines_is_one_whole_line():
    """transformers says what it found on the lines after the first (--load_best_model_at_end's strategies)."""
    @dataclass
    class Checked:
        steps: int = 1

        def __post_init__(self):
            raise ValueError("strategies must match, but found\n- Evaluation strategy: no\n- Save strategy: steps\n")

    with pytest.raises(UserError) as err:
        parse_args((Checked,), None, argv=[])
    assert str(err.value) == "strategies must match, but found - Evaluation strategy: no - Save strategy: steps"


@pytest.mark.parametrize("content,message", [
    ("batch_size: 2.5\n", "argument --batch_size/--batch-size: invalid int value: '2.5'"),
    ("batch_size: true\n", "argument --batch_size/--batch-size: invalid int value: 'True'"),
    ("share: [0.5]\n", "share takes one number, got list [0.5]"),
    ("share: .nan\n", "--share must be a finite number, got nan"),
])
def test_config_values_are_checked_as_flags_are(tmp_path, content, message):
    """A recipe's number goes through the field's own type, as on the command line; a list is no number; NaN is
    within no limit."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_args((Limited,), None, argv=[str(recipe)])


def test_typed_config_values_keep_their_meaning(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 3\nshare: 1\nmode: b\noptional: 4\n")
    args, _ = parse_args((Limited,), None, argv=[str(recipe)])
    assert (args.batch_size, args.share, args.mode, args.optional) == (3, 1.0, "b", 4)
    # the real recipes: booleans, floats in YAML's exponent form, lists and mappings of the library's own fields
    recipe.write_text("learning_rate: 1.0e-5\nbf16: false\nmax_steps: 3\nweight_decay: 0\n"
                      "lr_scheduler_kwargs: {num_cycles: 2}\n")
    _, training, _ = parse_args((Script, Config), None, argv=[str(recipe), "--output_dir", str(tmp_path)])
    assert (training.learning_rate, training.bf16, training.max_steps, training.weight_decay) == (1e-5, False, 3, 0.0)
    assert training.lr_scheduler_kwargs == {"num_cycles": 2}


def test_nan_on_the_command_line_is_out_of_every_range():
    with pytest.raises(UserError, match="--share must be a finite number, got nan"):
        parse_args((Limited,), None, argv=["--share", "nan"])


def test_every_help_text_survives_argparse_formatting():
    """argparse %-formats each flag's help (for %(default)s): a lone % in a help text makes `--help` crash. Every
    "help" string of every dataclass field in the project's scripts and library is checked, statically."""
    import ast
    from collections import defaultdict

    checked = 0
    for path in sorted(REPO_ROOT.glob("*/**/*.py")):
        if path.parts[len(REPO_ROOT.parts)] in (".venv", "tests", "outputs"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Dict):
                continue
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "help" and isinstance(value, ast.Constant):
                    try:
                        value.value % defaultdict(str)  # argparse's own formatting (adjacent literals are one)
                    except ValueError as err:
                        pytest.fail(f"{path.relative_to(REPO_ROOT)} line {value.lineno}: help text: {err}")
                    checked += 1
    assert checked > 200



def test_help_shows_the_description_and_every_default_from_the_recipe(tmp_path, capsys):
    """Flags without help text show their default too (argparse shows none there), the recipe's value where it
    gives one; the description comes first as written, and the recipe is named last."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overlength: drop\n")
    with pytest.raises(SystemExit):
        parse_args((Script,), str(recipe), argv=["--help"], description="Line one.\n\n    python x.py \\\n  --flag")
    text = capsys.readouterr().out
    assert "Line one.\n\n    python x.py \\\n  --flag\n" in text  # not re-wrapped
    flat = " ".join(text.split())
    assert "--overlength OVERLENGTH (default: drop)" in flat and "(default: False)" in flat
    assert flat.endswith(f"Defaults shown: the recipe {recipe}'s values. A recipe (YAML) may come first, or "
                         "--config PATH; every flag overrides it.")

@pytest.mark.parametrize("argv", [["--output_path", "a", "--output_dir", "b"],
                                  ["--output_dir=b", "--output_path", "a"]])
def test_two_spellings_that_disagree_are_one_line(argv):
    with pytest.raises(UserError) as err:
        parse_args((Aliased,), None, argv=argv)
    first, second = (argv[0], argv[1]) if "=" not in argv[0] else argv[0].split("=")
    assert str(err.value).startswith(f"{first} {second} and ")
    assert str(err.value).endswith("are two names of one setting and disagree: give one")
    args, _ = parse_args((Aliased,), None, argv=["--output_path", "a", "--output_dir", "a", "--steps", "2"])
    assert (args.output_dir, args.steps) == ("a", 2)  # the same value under both names is fine


def test_warmup_ratio_is_a_fraction(tmp_path):
    """Upstream's --warmup_ratio is transformers' --warmup_steps, where 1 or more would silently mean steps."""
    @dataclass
    class Warmup:
        warmup_steps: float = field(default=0, metadata={"aliases": ["--warmup_ratio"]})

    assert parse_args((Warmup,), None, argv=["--warmup_ratio", "0.1"])[0].warmup_steps == 0.1
    assert parse_args((Warmup,), None, argv=["--warmup_steps", "5"])[0].warmup_steps == 5
    with pytest.raises(UserError, match=r"^--warmup_ratio is a fraction of the training steps: at least 0 and below 1 "
                                        r"\(--warmup_steps N for N steps\), got 1.5$"):
        parse_args((Warmup,), None, argv=["--warmup_ratio", "1.5"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("warmup_ratio: 3\n")
    with pytest.raises(UserError, match=rf"^--warmup_ratio is a fraction .*, got 3 \(recipe: {recipe}\)$"):
        parse_args((Warmup,), None, argv=[str(recipe)])


@pytest.mark.parametrize("script, argv, message", [
    ("armo-rm/interpret.py", ["--response", " "],
     "error: --response: an empty value; give one, or leave the flag out for its default"),
    # an empty path was the default for some scripts, the current directory or a KeyError for others
    ("useful_code/score_dataset.py", ["--output_path", ""],
     "error: --output_path: an empty value; give one, or leave the flag out for its default"),
    ("pair-pm/SSRM/pseudo_label.py", ["--output_path="],
     "error: --output_path: an empty value; give one, or leave the flag out for its default"),
    # NaN passes every comparison, and fields without limits were not checked at all (traced back in train())
    ("bradley-terry-rm/train.py", ["--num_train_epochs", "nan"], "error: --num_train_epochs must be a finite number, "
                                                                 "got nan"),
    ("useful_code/eval_reward_bench_pm.py", ["--temperature", "inf"],
     "error: --temperature must be a finite number, got inf"),
    ("math-rm/train.py", ["--dataset_num_proc", "-3"], "error: --dataset_num_proc must be at least 1, got -3"),
    ("bradley-terry-rm/train.py", ["--save_total_limit", "0"], "error: --save_total_limit must be at least 1, got 0"),
    ("armo-rm/stage-2_train.py", ["--dropout", "1"], "error: --dropout must be below 1, got 1.0"),
    ("armo-rm/stage-2_train.py", ["--temperature", "0"], "error: --temperature must be above 0, got 0.0"),
    ("armo-rm/stage-2_train.py", ["--corr_threshold", "2"], "error: --corr_threshold must be at most 1, got 2.0"),
    ("useful_code/serve_reward_model.py", ["--port", "0"], "error: --port must be at least 1, got 0"),
    ("bradley-terry-rm/train.py", ["--output_path", "{file}.out", "--loss_type", "odin", "--use_peft"],
     "error: --loss_type odin with --use_peft is not supported yet: train ODIN's heads in full"),  # said after the data
    # token-budget batches are shuffled: a sequential order asked for with them was silently not kept
    ("bradley-terry-rm/train.py", ["--output_path", "{file}.out", "--train_sampling_strategy", "sequential",
                                   "--group_by_length", "false", "--max_tokens_per_batch", "2048"],
     "error: --train_sampling_strategy sequential: token-budget batches (--max_tokens_per_batch) are drawn in a "
     "shuffled order; leave one of the two out"),
    ("pair-pm/prepare_model.py", ["--output_path", "{file}"], "error: --output_path: {file} is a file, not a directory"),
])
def test_script_errors_before_any_work_are_one_line(script, argv, message, monkeypatch, capsys, tmp_path):
    """Found by running every script with bad flags: each of these used to trace back or pass silently."""
    import importlib.util
    import sys

    from useful_code.cli import run_cli

    existing = tmp_path / "a_file"
    existing.write_text("x")
    spec = importlib.util.spec_from_file_location(Path(script).stem.replace("-", "_"), REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, *[a.format(file=existing) for a in argv]])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines()[-1] == message.format(file=existing)
    assert "Traceback" not in err


def test_a_real_model_on_the_tiny_recipe_is_noted(capsys):
    from useful_code.cli import note_tiny_recipe
    from useful_code.defaults import DEFAULT_MODEL

    note_tiny_recipe("a/tiny.yaml", "a/tiny.yaml", "meta-llama/Llama-3.1-8B", "a/llama.yaml")
    assert capsys.readouterr().out == ("note: these settings are the tiny model's (a/tiny.yaml); pass a model's "
                                       "recipe first, e.g. a/llama.yaml, for upstream's values\n")
    note_tiny_recipe(None, None, "meta-llama/Llama-3.1-8B", "a/llama.yaml")  # a script whose defaults are tiny
    assert "(the defaults)" in capsys.readouterr().out
    note_tiny_recipe("a/tiny.yaml", "a/tiny.yaml", DEFAULT_MODEL, "a/llama.yaml")  # the tiny model itself
    note_tiny_recipe("a/llama.yaml", "a/tiny.yaml", "meta-llama/Llama-3.1-8B", "a/llama.yaml")  # a recipe given
    assert capsys.readouterr().out == ""


def test_a_load_error_names_a_missing_directory_a_training_output_dir_or_the_reason(tmp_path):
    from useful_code.cli import load_error

    err = OSError("no tokenizer files\nmore detail")
    assert str(load_error("--m", "tokenizer", str(tmp_path / "nope"), err)) == \
        f"--m: no such directory '{tmp_path / 'nope'}'"
    assert str(load_error("--m", "tokenizer", str(tmp_path), err)) == \
        f"--m: the directory '{tmp_path}' holds no model (no config.json)"  # transformers: "no model_type key"
    (tmp_path / "config.json").write_text("{}")
    assert str(load_error("--m", "tokenizer", str(tmp_path), err)).startswith(
        f"--m: the directory '{tmp_path}' holds no tokenizer (none of tokenizer.json, tokenizer_config.json, ")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert str(load_error("--m", "tokenizer", str(tmp_path), err)) == \
        f"--m: could not load tokenizer from the directory '{tmp_path}' (no tokenizer files)"  # the reason, then
    (tmp_path / "config.json").unlink()
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "last_checkpoint").mkdir()
    (tmp_path / "last_checkpoint" / "config.json").write_text("{}")  # what every trainer writes
    assert str(load_error("--m", "tokenizer", str(tmp_path), err)) == \
        f"--m: '{tmp_path}' is a training run's output directory; its model is {tmp_path / 'last_checkpoint'}"
    (tmp_path / "last_checkpoint" / "adapter_config.json").write_text("{}")  # a --use_peft run's checkpoint-N
    assert str(load_error("--m", "model", str(tmp_path / "last_checkpoint"), err)).startswith(
        f"--m: '{tmp_path / 'last_checkpoint'}' holds a LoRA adapter, not a model (a --use_peft run's adapter/ or "
        "periodic checkpoint): the run's last_checkpoint/ is its model with the adapter merged")


def test_the_default_recipe_is_said_once_under_a_launcher(tmp_path, monkeypatch, capsys):
    """Every rank parses the same flags: the note naming the default recipe came once per rank."""
    from dataclasses import dataclass

    from useful_code.cli import parse_args

    @dataclass
    class Flags:
        x: int = 1

    recipe = tmp_path / "r.yaml"
    recipe.write_text("x: 2\n")
    for rank, said in (("0", True), ("1", False), (None, True)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        assert parse_args((Flags,), str(recipe), argv=[])[0].x == 2
        assert capsys.readouterr().out.startswith(f"Recipe: {recipe} (the default") is said, rank


def test_a_full_disk_and_a_lost_peer_rank_are_one_line(capsys):
    """A full disk at a save traced back on the writing rank (safetensors' own error type), and the other rank
    traced back in gloo ("Connection closed by peer") at the barrier it waited at."""
    import errno

    from useful_code.cli import run_cli

    def failing(err):
        def main():
            raise err
        return main

    cases = [(OSError(errno.ENOSPC, "No space left on device", "/out/last_checkpoint/model.safetensors"), 2,
              "error: cannot write /out/last_checkpoint/model.safetensors: No space left on device"),
             (OSError(errno.EROFS, "Read-only file system", "/out/metrics.json"), 2,
              "error: cannot write /out/metrics.json: Read-only file system"),
             (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 2,
              "error: cannot write an output: No space left on device (Error while serializing: I/O error: No space "
              "left on device (os error 28))"),
             (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:25486"), 1,
              "error: another process of this run stopped first (its error is above); this one lost its connection "
              "to it")]
    for err, status, line in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(failing(err))
        assert exit_info.value.code == status and capsys.readouterr().err.strip() == line
    with pytest.raises(FileNotFoundError):  # any other error keeps its traceback
        run_cli(failing(FileNotFoundError(errno.ENOENT, "No such file or directory", "x")))
