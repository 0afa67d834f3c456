"""Loading datasets from anywhere a user points (hub name, saved dataset, data directory, file) and the held-out
split every trainer uses."""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import logging
import lzma
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk
from datasets.data_files import DataFilesDict, get_data_patterns

from useful_code.cli import UserError, looks_like_local_path
from useful_code.formats import standardize_pairs

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz")  # those _OPENERS can read line by line
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

# Rules of one line of a JSON-lines file (a .json file holding an array is read as a whole).
LINE_RULES = {
    "invalid_utf8": "the file must be UTF-8 text",
    "not_json": "each line must be one complete JSON value",
    "not_an_object": "each record must be a JSON object ({...}), not an array or a scalar",
    "lone_surrogate": "text must be valid Unicode (no lone surrogate escapes such as \\ud800)",
    "mixed_types": "a field must have the same JSON type (string, list, ...) in every record, at every depth",
}


def _file_builder(path: Path) -> Optional[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _record_rule(value: Any) -> str:
    """'' for a JSON object of valid Unicode, else its rule in LINE_RULES."""
    if not isinstance(value, dict):
        return "not_an_object"
    return "lone_surrogate" if _has_lone_surrogate(value) else ""


def read_json_records(path: Path, flag: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """The records of a .json/.jsonl file (optionally compressed), read without Arrow, and the (0-based line, or
    array index for a file holding one JSON array; rule in LINE_RULES) of every entry that is not a record. Used
    when `datasets` cannot load the file, to say why."""
    opener = _OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise UserError(f"{flag}: {path}: cannot be read as a {path.suffix} file ({err})") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark that editors write, which Arrow skips too
    try:
        whole = json.loads(raw.decode("utf-8"))
        entries = whole if isinstance(whole, list) else [whole]
        checked = [(i, entry, _record_rule(entry)) for i, entry in enumerate(entries)]
    except (UnicodeDecodeError, json.JSONDecodeError):  # JSON lines
        checked = []
        for number, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                checked.append((number, None, "invalid_utf8"))
                continue
            except json.JSONDecodeError:
                checked.append((number, None, "not_json"))
                continue
            checked.append((number, entry, _record_rule(entry)))
    return _drop_mixed_types(checked)


_CONFLICT = "conflict"


def _json_type(value: Any):
    """A JSON value's type as Arrow sees it, nested: None (null fits any type), 'number' (ints and floats share one),
    'str', 'bool', ('list', element type) or ('dict', ((key, type), ...)); _CONFLICT for a list whose elements
    have no common type."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        element = None
        for item in value:
            element = _unify(element, _json_type(item))
        return _CONFLICT if element == _CONFLICT else ("list", element)
    if isinstance(value, dict):
        fields = tuple(sorted((k, _json_type(v)) for k, v in value.items()))
        return _CONFLICT if any(t == _CONFLICT for _, t in fields) else ("dict", fields)
    return type(value).__name__


def _unify(a, b):
    """The type both a and b fit (a missing dict key or a null fits anything), or _CONFLICT."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if a == _CONFLICT or b == _CONFLICT or not (isinstance(a, tuple) and isinstance(b, tuple)) or a[0] != b[0]:
        return _CONFLICT
    if a[0] == "list":
        element = _unify(a[1], b[1])
        return _CONFLICT if element == _CONFLICT else ("list", element)
    fields = dict(a[1])
    for key, kind in b[1]:
        fields[key] = _unify(fields.get(key), kind)
        if fields[key] == _CONFLICT:
            return _CONFLICT
    return ("dict", tuple(sorted(fields.items())))


def _drop_mixed_types(checked: list) -> tuple[list[dict], list[tuple[int, str]]]:
    """Records and bad entries, where a record is bad too when one of its fields, at any depth, has a type that the
    same field of most records does not fit: Arrow gives each column one type, so such a record would make the
    whole file unreadable. Per field, the types are merged from the most common down, so a bad first row never
    decides."""
    per_field: dict[str, Counter] = {}
    for _, entry, rule in checked:
        for key, value in (entry.items() if not rule else ()):
            per_field.setdefault(key, Counter())[_json_type(value)] += 1
    schema = {}
    for key, counts in per_field.items():
        merged = None
        for kind, _ in counts.most_common():
            merged = _unify(merged, kind) if _unify(merged, kind) != _CONFLICT else merged
        schema[key] = merged
    records, bad = [], []
    for i, entry, rule in checked:
        if not rule and any(_unify(schema[k], _json_type(v)) != schema[k] for k, v in entry.items()):
            rule = "mixed_types"
        if rule:
            bad.append((i, rule))
        else:
            records.append(entry)
    return records, bad


def _load_json_file(local: Path, flag: str, skip_invalid: bool, load_error: Exception):
    """What `datasets` could not load, read line by line: bad lines are one error naming them and their rule, or
    with skip_invalid are dropped and counted; the records left become the 'train' split."""
    records, bad = read_json_records(local, flag)
    if bad and not skip_invalid:
        reasons = Counter(reason for _, reason in bad)
        first = ", ".join(f"line {i} ({reason})" for i, reason in bad[:5])
        raise UserError(f"{flag}: {local}: {len(bad)} lines are not records (first: {first}; 0-based). Rules: "
                        + "; ".join(f"{r}: {LINE_RULES[r]}" for r in reasons)
                        + ". Fix the file, or pass --skip_invalid to drop them with a count.")
    if bad:
        counts = ", ".join(f"{r}: {n}" for r, n in Counter(reason for _, reason in bad).most_common())
        print(f"[{flag.lstrip('-')}] dropped {len(bad)} lines of {local} that are not records (--skip_invalid): {counts}")
    if not records:
        raise UserError(f"{flag}: {local} holds no records")
    try:
        return DatasetDict(train=Dataset.from_list(records))
    except Exception as err:  # Arrow: the records do not share one schema
        raise UserError(f"{flag}: {local}: the records do not share one schema ({_first_line(err)}; "
                        f"loading failed with: {_first_line(load_error)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _load_data_directory(local: Path, flag: str, skip_invalid: bool) -> DatasetDict:
    """A directory of data files, split by the file-name patterns `datasets` uses (train*, test*, ...; all 'train'
    without them), each file read as a single file is, so its bad lines are named or dropped and counted. Files of
    two formats are an error: load_dataset would read one format and silently leave the other's files out."""
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(local)), base_path=str(local))
    except Exception as err:  # datasets: an empty directory, unreadable files
        raise UserError(f"{flag}: {local}: no data files in this directory ({_first_line(err)})") from None
    # A data file that no split takes (named neither train* nor test* beside ones that are) or of a format read
    # nowhere here would otherwise be left out without a word.
    taken = {Path(f).resolve() for files in found.values() for f in files}
    left_out = sorted(str(f.relative_to(local)) for f in local.rglob("*")
                      if f.is_file() and not any(part.startswith(".") for part in f.relative_to(local).parts)
                      and (_file_builder(f) or f.suffix.lower() in (".csv", ".tsv", ".arrow"))
                      and (f.resolve() not in taken or not _file_builder(f)))
    if left_out:
        raise UserError(f"{flag}: {local}: these data files would not be read: {', '.join(left_out[:5])} (only "
                        ".json/.jsonl/.parquet files, split by name: train*, test*, ...)")
    splits = {str(split): [Path(f) for f in files if _file_builder(Path(f))] for split, files in found.items()}
    builders = Counter(_file_builder(f) for files in splits.values() for f in files)
    if not builders:
        raise UserError(f"{flag}: {local}: no .json/.jsonl/.parquet data files (or a save_to_disk directory) here")
    if len(builders) > 1:
        counts = ", ".join(f"{n} {builder}" for builder, n in builders.most_common())
        raise UserError(f"{flag}: {local} mixes data file formats ({counts} files): keep one format per directory")
    loaded = {}
    for split, files in splits.items():
        parts = [load_dataset_dict(str(f), flag, skip_invalid=skip_invalid)["train"] for f in sorted(files)]
        try:
            loaded[split] = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        except Exception as err:  # Arrow: the files do not share one schema
            raise UserError(f"{flag}: {local}: the {split} files do not share one schema ({_first_line(err)})") \
                from None
    return DatasetDict(loaded)


@contextmanager
def _logger_silenced(name: str):
    """The named logger quiet for the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_dataset_dict(path: str, flag: str, split: Optional[str] = None, skip_invalid: bool = False):
    """Load a dataset from a hub name, a directory saved by `datasets`, a data directory, or a
    .json/.jsonl/.parquet file (optionally compressed). Returns a DatasetDict; a single file is split 'train'.
    A file that cannot be loaded is one error naming it and, for JSON, its bad lines and their rules (dropped and
    counted with skip_invalid); an empty file or directory is an error too."""
    local = Path(path).expanduser()
    if local.is_file():
        builder = _file_builder(local)
        if builder is None:
            raise UserError(f"{flag}: unsupported file type '{local.name}' (use .json, .jsonl or .parquet, optionally "
                            ".gz, .bz2 or .xz)")
        try:
            # datasets logs an unparseable JSON line as an ERROR before raising; the line reader below names it (or
            # drops it, counted), so the log line would only say the same thing first, or alarm a run that goes on.
            with _logger_silenced("datasets.packaged_modules.json.json"):
                loaded = load_dataset(builder, data_files={"train": str(local)})
            # Arrow's JSON reader keeps invalid UTF-8 bytes in strings, which fail only when a row is read:
            # a full validation finds them now, and the line reader below names their lines.
            loaded["train"].data.table.validate(full=True)
        except Exception as err:  # datasets raises many types here; each ends as one line for the user
            if builder != "json":
                raise UserError(f"{flag}: {local} cannot be read as {builder} ({_first_line(err)})") from None
            return _load_json_file(local, flag, skip_invalid, err)
        if len(loaded["train"]) == 0:
            raise UserError(f"{flag}: {local} holds no records")
        return loaded
    if local.is_dir():
        if not any((local / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return _load_data_directory(local, flag, skip_invalid)
        try:
            loaded = load_from_disk(str(local))
        except Exception as err:
            raise UserError(f"{flag}: {local}: this save_to_disk directory cannot be loaded ({_first_line(err)})") \
                from None
        return DatasetDict(train=loaded) if isinstance(loaded, Dataset) else loaded
    if looks_like_local_path(path) or _file_builder(local) is not None:
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


def split_name(dataset_dict, split: str, flag: str) -> str:
    """The name of the split pick_split returns: `split`, or the only one when the DatasetDict holds just one."""
    if split in dataset_dict:
        return split
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict))
    raise UserError(f"{flag}: no split '{split}' (available: {', '.join(dataset_dict)})")


def pick_split(dataset_dict, split: str, flag: str):
    """Return `split` from a DatasetDict, or its only split when it holds just one (a single local file)."""
    return dataset_dict[split_name(dataset_dict, split, flag)]


def load_split(path: str, split: str, flag: str, skip_invalid: bool = False):
    """One split of a dataset (a single local file is its own split)."""
    return pick_split(load_dataset_dict(path, flag, skip_invalid=skip_invalid), split, flag)


@dataclass
class HeldOutArguments:
    """The flags every trainer shares besides its data and model: where held-out pairs come from, what an invalid row
    does, how many held-out pairs verify the saved checkpoint, and how the model is loaded."""

    eval_set_path: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out standard-format pairs ('test' split, else its only split), all of them (upstream "
                  "took 500 random pairs of its train split). Default: the train data's 'test' split, else "
                  "--eval_holdout_size pairs held out of it (never overlapping the training pairs)."},
    )
    eval_holdout_size: int = field(default=500,
                                   metadata={"min": 1, "help": "Pairs held out of train data with no 'test' split."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    reload_check_pairs: int = field(default=16,
                                    metadata={"min": 1, "help": "Held-out pairs scored to verify the checkpoint."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, flash_attention_2 or eager."})
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "For a model without one (a base decoder, a BERT-style encoder): a Jinja file, or chatml, llama3 or "
                "plain. Saved with the checkpoint's tokenizer."})


def held_out_pairs(train, train_splits, eval_set_path: Optional[str], holdout_size: int, seed: int,
                   skip_invalid: bool, train_flag: str, train_split: str = "train"):
    """The pairs a trainer evaluates on, never overlapping its training pairs: --eval_set_path's test split, else the
    train data's 'test' split when the trainer does not train on it, else holdout_size pairs held out of the
    (validated) train pairs, seeded. train_split: the split the caller asked pick_split for (data whose only split
    is 'test' trains on it). Held-out pairs that are also training pairs are left out, counted; a held-out set that
    is all training pairs (upstream's recipes give the training data as --eval_set_path) is replaced by pairs held out
    of train. train=None (PM examples, which cannot be compared) skips that check. Returns (train, held-out
    standard-format pairs, stats of the held-out pairs)."""
    raw, source = held_out_source(train_splits, eval_set_path, train_split, train_flag, skip_invalid)
    if raw is None:
        return hold_out(train, holdout_size, seed, source, train_flag)
    held_out, stats = standardize_pairs(raw, skip_invalid, "eval set")
    if train is None:
        return train, held_out, {**stats, "source": source}
    seen = training_row_indices(held_out, train)
    if seen and len(seen) == len(held_out):
        return hold_out(train, holdout_size, seed, f"every pair of the {source} is a training pair", train_flag,
                        eval_set_given=True)
    if seen:
        held_out = held_out.select(sorted(set(range(len(held_out))) - set(seen)))
        print(f"Left {len(seen)} of the {stats['used']} pairs of the {source} out of the evaluation: they are "
              "training pairs too")
        stats = {**stats, "training_pairs_left_out": len(seen), "used": len(held_out)}
    return train, held_out, {**stats, "source": source}


def held_out_source(train_splits, eval_set_path: Optional[str], train_split: str, train_flag: str,
                    skip_invalid: bool):
    """Where every trainer's held-out rows come from: (raw rows, their source) for --eval_set_path's test split (else
    its only split), else the train data's 'test' split when the run does not train on it; else (None, why rows
    are to be held out of the train set): no 'test' split, or the training rows are the test split, which
    evaluating on would score training rows."""
    if eval_set_path:
        return load_split(eval_set_path, "test", "--eval_set_path", skip_invalid), eval_set_path
    if "test" in train_splits and split_name(train_splits, train_split, train_flag) != "test":
        return train_splits["test"], f"test split of {train_flag}"
    return None, "its 'test' split is the train set" if "test" in train_splits else "no 'test' split"


def hold_out(train, holdout_size: int, seed: int, why: str, train_flag: str, eval_set_given: bool = False,
             key_columns: tuple = ("chosen", "rejected"), unit: str = "pairs"):
    """holdout_size rows of train, seeded, for evaluation, and the rest to train on. Held-out rows equal to a training
    row in key_columns (data that repeats its rows) are left out, counted. eval_set_given: an --eval_set_path was
    given and held only training rows; unit names the rows in messages. Returns (train, held out, stats)."""
    if len(train) < 2 * holdout_size:
        raise UserError(
            f"{train_flag} has {len(train)} valid {unit} and {why}: too few to hold out "
            f"--eval_holdout_size={holdout_size}; pass {'other ' + unit + ' as ' if eval_set_given else ''}"
            "--eval_set_path or a smaller --eval_holdout_size")
    split = train.train_test_split(test_size=holdout_size, seed=seed)
    print(f"Held out {holdout_size} of the train set's {unit} for evaluation (--eval_holdout_size; {why})")
    stats = {"read": holdout_size, "source": f"held out of {train_flag}"}
    # Data that repeats a row (real sets do) would otherwise put copies on both sides and score training rows.
    seen = training_row_indices(split["test"], split["train"], key_columns)
    if len(seen) == holdout_size:
        raise UserError(f"{train_flag}: every held-out {unit[:-1]} is also a training {unit[:-1]} (the data repeats "
                        f"its {unit}): remove the repeats, or pass other {unit} as --eval_set_path")
    if seen:
        print(f"Left {len(seen)} of the {holdout_size} held-out {unit} out of the evaluation: the data repeats them, "
              f"and a copy is a training {unit[:-1]}")
        stats[f"training_{unit}_left_out"] = len(seen)
    held_out = split["test"].select(sorted(set(range(holdout_size)) - set(seen))) if seen else split["test"]
    return split["train"], held_out, {**stats, "used": len(held_out)}


def training_row_indices(held_out, train, key_columns: tuple = ("chosen", "rejected")) -> list[int]:
    """Indices of the held-out rows equal to a row of train in key_columns (for standard-format pairs: the same
    chosen and rejected conversations)."""
    def keys(dataset):
        for batch in dataset.select_columns(list(key_columns)).iter(batch_size=4096):
            for values in zip(*(batch[column] for column in key_columns)):
                yield json.dumps(values, sort_keys=True)

    wanted = {}
    for i, key in enumerate(keys(held_out)):
        wanted.setdefault(key, []).append(i)
    found = set()
    for key in keys(train):
        found.update(wanted.get(key, ()))
    return sorted(found)
