"""Loading datasets from anywhere a user points (hub name, saved dataset, data directory, file) and the held-out
split every trainer uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from useful_code.cli import UserError
from useful_code.formats import standardize_pairs

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _file_builder(path: Path) -> Optional[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def load_dataset_dict(path: str, flag: str, split: Optional[str] = None):
    """Load a dataset from a hub name, a directory saved by `datasets`, a data directory, or a
    .json/.jsonl/.parquet file (optionally compressed). Returns a DatasetDict; a single file is split 'train'."""
    local = Path(path).expanduser()
    if local.is_file():
        builder = _file_builder(local)
        if builder is None:
            raise UserError(f"{flag}: unsupported file type '{local.name}' (use .json, .jsonl or .parquet, optionally .gz)")
        return load_dataset(builder, data_files={"train": str(local)})
    if local.is_dir():
        if any((local / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = load_from_disk(str(local))
            return DatasetDict(train=loaded) if isinstance(loaded, Dataset) else loaded
        return load_dataset(str(local))
    if path.startswith((".", "/", "~")) or _file_builder(local) is not None:
        raise UserError(f"{flag}: no such file or directory '{path}'")
    try:
        loaded = load_dataset(path, split=split) if split else load_dataset(path)
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise UserError(
            f"{flag}: could not load dataset '{path}' from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"pass a local .json/.jsonl/.parquet file or a saved dataset directory with {flag}"
        ) from None
    return DatasetDict({split: loaded}) if split else loaded


def pick_split(dataset_dict, split: str, flag: str):
    """Return `split` from a DatasetDict, or its only split when it holds just one (a single local file)."""
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise UserError(f"{flag}: no split '{split}' (available: {', '.join(dataset_dict)})")


def load_split(path: str, split: str, flag: str):
    """One split of a dataset (a single local file is its own split)."""
    return pick_split(load_dataset_dict(path, flag), split, flag)


@dataclass
class HeldOutArguments:
    """The flags every trainer shares about its data checks: where held-out pairs come from, what an invalid row
    does, and how many held-out pairs verify the saved checkpoint."""

    eval_set_path: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out standard-format pairs ('test' split). Default: the train data's 'test' split, "
                  "else --eval_holdout_size pairs held out of it (never overlapping the training pairs)."},
    )
    eval_holdout_size: int = field(default=500,
                                   metadata={"min": 1, "help": "Pairs held out of train data with no 'test' split."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    reload_check_pairs: int = field(default=16,
                                    metadata={"min": 1, "help": "Held-out pairs scored to verify the checkpoint."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, flash_attention_2 or eager."})


def held_out_pairs(train, train_splits, eval_set_path: Optional[str], holdout_size: int, seed: int,
                   skip_invalid: bool, train_flag: str):
    """The pairs a trainer evaluates on, never overlapping its training pairs: --eval_set_path's test split, else the
    train data's 'test' split, else holdout_size pairs held out of the (validated) train pairs, seeded.
    Returns (train, held-out standard-format pairs, stats of the held-out pairs)."""
    if eval_set_path:
        raw, source = load_split(eval_set_path, "test", "--eval_set_path"), eval_set_path
    elif "test" in train_splits:
        raw, source = train_splits["test"], f"test split of {train_flag}"
    else:
        if len(train) < 2 * holdout_size:
            raise UserError(
                f"{train_flag} has {len(train)} valid pairs and no 'test' split: too few to hold out "
                f"--eval_holdout_size={holdout_size}; pass --eval_set_path or a smaller --eval_holdout_size")
        split = train.train_test_split(test_size=holdout_size, seed=seed)
        print(f"Held out {holdout_size} of the train set's pairs for evaluation (--eval_holdout_size)")
        return split["train"], split["test"], {"read": holdout_size, "source": f"held out of {train_flag}"}
    held_out, stats = standardize_pairs(raw, skip_invalid, "eval set")
    return train, held_out, {**stats, "source": source}
