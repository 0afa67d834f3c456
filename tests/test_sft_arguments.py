"""The SFTConfig settings pair-pm/train.py and math-rm/train.py refuse or take (useful_code/sft_arguments.py), checked
on their own config classes with their recipes: each used to end in a traceback deep in TRL, to be ignored, or
(wrapped packing) to train on examples cut and mixed together."""

import importlib.util

import pytest

from useful_code.cli import UserError, parse_args
from useful_code.defaults import REPO_ROOT
from useful_code.lora import LoraArguments

TRAINERS = {"pair-pm/train.py": ("PreferenceModelConfig", "pair-pm/llama3-8b-it.yaml"),
            "math-rm/train.py": ("MathRewardConfig", "math-rm/llama-3.1-prm.yaml")}


def argument_classes(script: str) -> tuple:
    """The script's own argument classes, as its main() parses them."""
    spec = importlib.util.spec_from_file_location(f"sft_{script.replace('/', '_').replace('-', '_')}",
                                                  REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScriptArguments, getattr(module, TRAINERS[script][0]), LoraArguments


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def trainer(request):
    return request.param, argument_classes(request.param)


def parse(classes, *flags, recipe=None):
    """The SFTConfig subclass's instance."""
    argv = ([str(REPO_ROOT / recipe)] if recipe else []) + ["--output_dir", "/tmp/unused", *flags]
    return parse_args(classes, None, argv=argv)[1]


def value(enum_or_str):
    return getattr(enum_or_str, "value", enum_or_str)


@pytest.mark.parametrize("flags, message", [
    (("--eval_strategy", "steps"), "this trainer scores its held-out rows once, after training"),
    (("--eval_steps", "5"), "this trainer scores its held-out rows once, after training"),
    (("--eval_every_steps", "5"), "this trainer scores its held-out rows once, after training"),
    (("--load_best_model_at_end", "true"), "this trainer scores its held-out rows once, after training"),
    (("--save_strategy", "best"), "this trainer scores its held-out rows once, after training"),
    (("--max_length", "None"), "--max_length must be a number of tokens"),
    (("--packing", "true", "--packing_strategy", "wrapped"),
     "--packing_strategy wrapped cuts examples and lets them attend to each other: use bfd or bfd_split"),
    (("--padding_free", "true"), "--padding_free needs --packing true here"),
    (("--assistant_only_loss", "true"), "the loss is on the answer tokens alone already"),
    (("--save_steps", "0"), "--save_steps must be above 0"),
])
def test_settings_the_trainer_cannot_honour_are_one_line(trainer, flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(trainer[1], *flags)


def test_upstreams_save_flag_and_save_steps_alone_save_periodically_under_the_recipes(trainer):
    script, config = trainer
    recipe = TRAINERS[script][1]
    args = parse(config, recipe=recipe)
    assert value(args.save_strategy) == "no" and value(args.eval_strategy) == "no"  # off unless asked for
    for flags in (("--save_every_steps", "4"), ("--save_steps", "4")):
        args = parse(config, *flags, recipe=recipe)
        assert (value(args.save_strategy), args.save_steps) == ("steps", 4)
    args = parse(config, "--packing", "true", "--padding_free", "true", "--packing_strategy", "bfd_split")
    assert args.packing and args.padding_free
