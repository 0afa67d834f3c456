"""The command line every script shares: user errors as one line, and flags over a YAML config.

One config mechanism for every model family: a YAML recipe (the first argument, or --config PATH, else the
script's default) sets any field of the script's argument classes (its own dataclasses, TrainingArguments, TRL's
SFTConfig), and every flag overrides it. `--help` shows the values the config gives.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import yaml
from tqdm import tqdm

from useful_code.defaults import DEFAULT_MODEL

CONFIG_SUFFIXES = (".yaml", ".yml")


class UserError(Exception):
    """A mistake in the user's input or flags: reported as one line, without a traceback."""


class ModelOutputError(UserError):
    """The model, not the input, gave unusable outputs (NaN or infinite): one line for a script, like a UserError;
    a server answers it with a 5xx, not a 4xx."""


def looks_like_local_path(name: str) -> bool:
    """Whether a model or dataset name is meant as a local path (./x, ../x, /x, ~/x) rather than a hub name."""
    return name.startswith((".", "/", "~"))


# The files a tokenizer is loaded from (fast, SentencePiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_error(flag: str, what: str, name: str, err: Exception) -> UserError:
    """The one line for a model, tokenizer or config that from_pretrained could not load. A local path that does not
    exist is said to be missing: transformers would call it an invalid hub name."""
    if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        return UserError(f"{flag}: no such directory '{name}'")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if os.path.isdir(os.path.expanduser(name)):  # a local directory: the reason is all there is to say
        trained = os.path.join(name, "last_checkpoint")
        if os.path.isfile(os.path.expanduser(os.path.join(trained, "config.json"))):  # a trainer's output_dir
            return UserError(f"{flag}: '{name}' is a training run's output directory; its model is {trained}")
        if os.path.isfile(os.path.expanduser(os.path.join(name, "adapter_config.json"))):  # --use_peft checkpoint-N
            return UserError(f"{flag}: '{name}' holds a LoRA adapter, not a model (a --use_peft run's adapter/ or "
                             "periodic checkpoint): the run's last_checkpoint/ is its model with the adapter merged; "
                             "merge this one with peft (PeftModel.from_pretrained(base, dir).merge_and_unload())")
        has_tokenizer = any(os.path.isfile(os.path.expanduser(os.path.join(name, f))) for f in TOKENIZER_FILES)
        if not os.path.isfile(os.path.expanduser(os.path.join(name, "config.json"))) \
                and (what != "tokenizer" or not has_tokenizer):  # transformers: "should have a model_type key"
            return UserError(f"{flag}: the directory '{name}' holds no model (no config.json)")
        if what == "tokenizer" and not has_tokenizer:  # transformers: "Couldn't instantiate the backend tokenizer"
            return UserError(f"{flag}: the directory '{name}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
                             "; save the model's tokenizer beside it (tokenizer.save_pretrained)")
        return UserError(f"{flag}: could not load {what} from the directory '{name}' ({reason})")
    return UserError(f"{flag}: could not load {what} '{name}' ({reason}); pass a local model directory with {flag}")


def first_rank() -> bool:
    """Whether this process is a launcher's first rank, or runs without a launcher: a note every rank would say
    alike (the recipe, a dtype fallback, a model's new head) is said there only."""
    return os.environ.get("RANK", "0") == "0"


# An output that cannot be written: a full disk (safetensors says it in its own error type), a quota, a read-only one
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# A rank whose peer exited first (gloo): the peer's own line says why; this one's traceback says nothing more
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError becomes one clear line on stderr and exit status 2, as does an output the
    disk cannot take (full, over quota, read-only). A rank that lost its connection to a rank that stopped first
    says so in one line, the other rank's line being the reason."""
    try:
        main()
    except UserError as err:
        report_error(err)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        report_error(f"cannot write {err.filename or 'an output'}: {err.strerror}")
        sys.exit(2)
    except Exception as err:
        text = str(err)
        if "No space left on device" in text:  # safetensors' SafetensorError, raised from its Rust writer
            report_error(f"cannot write an output: No space left on device ({text.splitlines()[0]})")
            sys.exit(2)
        if any(marker in text for marker in _PEER_GONE):
            report_error("another process of this run stopped first (its error is above); this one lost its "
                         "connection to it")
            sys.exit(1)
        raise


def report_error(err) -> None:
    """A user error's one line on stderr, flushed."""
    # tqdm.write: an error raised mid-loop (a diverged run) gets its own line, not the end of a progress bar's.
    tqdm.write(f"error: {err}", file=sys.stderr)
    sys.stderr.flush()


def note_tiny_recipe(config: Optional[str], default_config: Optional[str], model: str, recipe: str) -> None:
    """A note when another model than the embedded tiny one runs on the tiny model's settings (what a run without a
    recipe gets): a learning rate or a step count chosen for a 2-layer model would be far off for it, silently."""
    if config == default_config and model != DEFAULT_MODEL:
        print(f"note: these settings are the tiny model's ({config or 'the defaults'}); pass a model's recipe first, "
              f"e.g. {recipe}, for upstream's values")


def split_config_path(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """Find the config in argv: `--config PATH`, `--config=PATH`, or a positional .yaml/.yml path (launchers such
    as deepspeed put `--local_rank=N` before it). Returns (path or None, the other arguments)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    for i, arg in enumerate(argv):
        is_flag_value = i > 0 and argv[i - 1].startswith("--") and "=" not in argv[i - 1]
        if arg.endswith(CONFIG_SUFFIXES) and not is_flag_value:
            return arg, argv[:i] + argv[i + 1:]
    return None, argv


def read_config(path: str, section: Optional[str] = None) -> dict:
    """The YAML mapping at path; with section, only that top-level key's mapping (configs shared by several
    scripts keep one section per script, and may share values through YAML anchors). A recipe without the section
    is an error: read as empty, its script would run on defaults while the user believes the recipe applies."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UserError(f"config {path} must be a YAML mapping of field: value")
    if section is not None:
        if section not in config:
            raise UserError(f"config {path} has no section '{section}' for this script (its sections: "
                            f"{', '.join(map(str, config)) or 'none'}); add one, empty for the defaults")
        config = config[section] or {}
        if not isinstance(config, dict):
            raise UserError(f"config {path}: section '{section}' must be a mapping of field: value")
    return config


def parse_args(dataclass_types: Sequence[type], default_config: Optional[str] = None,
               section: Optional[str] = None, argv: Optional[Sequence[str]] = None,
               description: Optional[str] = None) -> tuple:
    """Parse flags over a YAML config into one instance of each dataclass type.

    The config is argv's (see split_config_path), else default_config, else none. Returns the instances followed by
    the config path used. An unknown field, an unknown flag or a value the dataclass rejects is a UserError.
    --help starts with `description` (default: the script's docstring)."""
    config_path, argv = split_config_path(sys.argv[1:] if argv is None else argv)
    if config_path is None and default_config and "--help" not in argv and "-h" not in argv and first_rank():
        print(f"Recipe: {default_config} (the default; give a recipe first, or --config PATH, to change it)")
    config_path = config_path or default_config
    if description is None:
        description = getattr(sys.modules.get("__main__"), "__doc__", None)
    parser = limits_aware_parser(dataclass_types, description)
    if config_path:
        parser.epilog = (f"Defaults shown: the recipe {config_path}'s values. A recipe (YAML) may come first, or "
                         f"--config PATH; every flag overrides it.")
    check_spellings(parser, argv)
    check_no_empty_values(argv)
    if config_path:
        # A config may use a flag's alias (upstream's --output_path for output_dir) as its key, like the command line.
        dests = {opt.lstrip("-"): action.dest for action in parser._actions for opt in action.option_strings}
        config = read_config(config_path, section)
        for key, value in config.items():
            check_alias_limits(f"--{key}", value, f" (recipe: {config_path})")
        config = {dests.get(key, key): value for key, value in config.items()}
        unknown = parser.set_defaults_with_config(**typed_config_values(parser, config, config_path))
        if unknown:
            raise UserError(f"config {config_path}: unknown field(s) {', '.join(unknown[::2])}")
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # unknown flags, and values a dataclass's __post_init__ rejects
        # one line: transformers' messages may go on to say what they found on the next lines
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise UserError(message + (f" (recipe: {config_path})" if config_path else "")) from None
    for arguments in parsed:
        check_limits(arguments)
    return (*parsed, config_path)


LIMIT_KEYS = ("min", "max", "above", "below", "choices")  # min/max inclusive, above/below exclusive

# An alias whose meaning is narrower than its field's: upstream's --warmup_ratio is transformers' --warmup_steps, where
# a value of 1 or more would silently mean steps.
ALIAS_LIMITS = {"warmup_ratio": (0.0, 1.0, "a fraction of the training steps: at least 0 and below 1 (--warmup_steps "
                                           "N for N steps)")}


def check_alias_limits(option: str, value, where: str = "") -> None:
    """A value given under an alias with its own range (ALIAS_LIMITS): one line when outside it."""
    limits = ALIAS_LIMITS.get(option.lstrip("-").replace("-", "_"))
    if limits is None:
        return
    low, high, meaning = limits
    try:
        number = float(value)
    except (TypeError, ValueError):
        return  # argparse reports a value that is no number
    if not low <= number < high:
        raise UserError(f"{option} is {meaning}, got {value}{where}")


def check_spellings(parser, argv: Sequence[str]) -> None:
    """Two spellings of one flag (upstream's --output_path and transformers' --output_dir) given with different
    values: one line, where argparse would silently keep the last. Values under an alias with its own range are
    checked (ALIAS_LIMITS)."""
    dests = {opt: action.dest for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    given = {}  # dest -> (option, value) as first given
    for i, token in enumerate(argv):
        option, has_value, value = token.partition("=")
        if option not in dests:
            continue
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        check_alias_limits(option, value)
        first = given.setdefault(dests[option], (option, value))
        if first[0] != option and first[1] != value:
            raise UserError(f"{first[0]} {first[1]} and {option} {value} are two names of one setting and disagree: "
                            "give one")


def typed_config_values(parser, config: dict, config_path: str) -> dict:
    """Config values checked as flags are: argparse converts a string default with the field's type, so a number or
    boolean goes in as its text (a 2.5 where an int belongs is then the same one-line error as on the command line);
    a list or mapping only where the field takes several values or a mapping."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for key, value in config.items():
        action = actions.get(key)
        if action is not None and action.nargs is None and action.type is not None:
            if isinstance(value, (bool, int, float)):
                value = str(value)
            elif isinstance(value, (list, dict)) and action.type in (int, float):
                raise UserError(f"config {config_path}: {key} takes one number, got {type(value).__name__} {value!r}")
        typed[key] = value
    return typed


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: a script's docstring as written, and every flag's default."""

    def _get_help_string(self, action):
        return super()._get_help_string(action) if action.option_strings else action.help  # positionals: no flag


def limits_aware_parser(dataclass_types, description: Optional[str] = None):
    """TRL's parser (YAML defaults) that leaves our limit metadata to check_limits: argparse would reject the keys
    (and its own `choices` check never sees values from a config)."""
    from trl import TrlParser  # here, not at the top: reward_bench.py's pure arithmetic imports UserError only

    class Parser(TrlParser):
        def error(self, message):  # argparse's own errors (a wrong type, a missing value): one line, no usage dump
            raise UserError(message)

        @staticmethod
        def _parse_dataclass_field(parser, field):
            if any(key in field.metadata for key in LIMIT_KEYS):
                field = copy.copy(field)
                field.metadata = {k: v for k, v in field.metadata.items() if k not in LIMIT_KEYS}
            TrlParser._parse_dataclass_field(parser, field)
            action = next(a for a in reversed(parser._actions) if a.dest == field.name)
            if not (action.help or "").strip():  # argparse shows no default for a flag without help text
                action.help = "(default: %(default)s)"
            # transformers gives a bool field defaulting to None (TRL's SFTConfig.bf16) no bare form: `--bf16` alone
            # would be "expected one argument", where every other bool flag takes it as true.
            if field.type == Optional[bool] and field.default is None:
                action.nargs, action.const = "?", True

    # No abbreviations: a misspelt flag that is a prefix of another (--learning_rat) would be taken as that one.
    return Parser(dataclass_types, allow_abbrev=False, description=description, formatter_class=HelpFormatter)


# Limits of the library classes' fields (TrainingArguments and TRL's configs), which cannot carry our metadata.
# A field named "seed" anywhere gets numpy's range, which every seed here reaches.
INHERITED_LIMITS = {"per_device_train_batch_size": {"min": 1}, "per_device_eval_batch_size": {"min": 1},
                    "gradient_accumulation_steps": {"min": 1}, "learning_rate": {"min": 0},
                    "max_length": {"min": 1}, "weight_decay": {"min": 0}, "max_grad_norm": {"min": 0},
                    "adam_beta1": {"min": 0, "below": 1}, "adam_beta2": {"min": 0, "below": 1},
                    "adam_epsilon": {"min": 0}, "logging_steps": {"above": 0}, "seed": {"min": 0, "max": 2**32 - 1},
                    "data_seed": {"min": 0, "max": 2**32 - 1}, "num_train_epochs": {"min": 0},
                    "warmup_steps": {"min": 0}, "neftune_noise_alpha": {"min": 0}, "dataloader_num_workers": {"min": 0},
                    # transformers keeps every checkpoint for a limit <= 0, as for none (the default)
                    "save_total_limit": {"min": 1}, "dataset_num_proc": {"min": 1}, "pad_to_multiple_of": {"min": 1}}


def check_no_empty_values(argv: Sequence[str]) -> None:
    """A flag given an empty value ('--output_dir ""', '--x='): one line. Read as the flag's default by some
    scripts, as the current directory or a missing file by others, it failed late or silently."""
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg and not arg.split("=", 1)[1].strip():
            raise UserError(f"{arg.split('=', 1)[0]}: an empty value; give one, or leave the flag out for its default")
        if not arg.strip() and i > 0 and argv[i - 1].startswith("--") and "=" not in argv[i - 1]:
            raise UserError(f"{argv[i - 1]}: an empty value; give one, or leave the flag out for its default")


def check_limits(arguments) -> None:
    """Check each field against its limits (field metadata "min", "max", "above", "below", "choices", or
    INHERITED_LIMITS) before any work starts: a value outside them is a UserError naming the flag and what it
    allows."""
    for f in dataclasses.fields(arguments):
        limits = {**INHERITED_LIMITS.get(f.name, {}), **{k: f.metadata[k] for k in LIMIT_KEYS if k in f.metadata}}
        value = getattr(arguments, f.name)
        if isinstance(value, float) and not math.isfinite(value):  # every number: NaN passes every comparison
            raise UserError(f"--{f.name} must be a finite number, got {value}")
        if value is None or not limits:
            continue
        if "choices" in limits and value not in limits["choices"]:
            raise UserError(f"--{f.name} must be one of {', '.join(map(str, limits['choices']))}, got {value!r}")
        if "min" in limits and value < limits["min"]:
            raise UserError(f"--{f.name} must be at least {limits['min']}, got {value}")
        if "max" in limits and value > limits["max"]:
            raise UserError(f"--{f.name} must be at most {limits['max']}, got {value}")
        if "above" in limits and value <= limits["above"]:
            raise UserError(f"--{f.name} must be above {limits['above']}, got {value}")
        if "below" in limits and value >= limits["below"]:
            raise UserError(f"--{f.name} must be below {limits['below']}, got {value}")
    epochs, steps = getattr(arguments, "num_train_epochs", None), getattr(arguments, "max_steps", None)
    if epochs is not None and steps is not None and epochs <= 0 and steps <= 0:
        raise UserError(f"--num_train_epochs must be above 0 (or --max_steps set), got {epochs}: nothing would train")
