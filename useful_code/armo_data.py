"""ArmoRM's data: the 19 attributes, and every file the four stages and the export exchange (embedding shards,
regression weights, the gating head), named in this one place.

Upstream hard-codes ~/data/ArmoRM; here every location is a flag, defaulting under ./armo_data.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from useful_code.output_files import atomic_save_file
from useful_code.cli import UserError
from useful_code.formats import enforce_validity, map_rows

# Head order everywhere (RLHFlow/ArmoRM-Multi-Objective-Data-v0.1 columns).
ATTRIBUTES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)
VERBOSITY_INDEX = ATTRIBUTES.index("helpsteer-verbosity")
LABEL_RULES = {"bad_attribute_label": "each attribute label must be a finite number, or null where the attribute "
                                       "is not rated (not a string, a boolean or an infinity)"}
DATA_ROOT = "./armo_data"
HEAD_WEIGHTS = "armo_head.safetensors"  # stage-2_train.py writes, export.py reads: regression, transform, gating
HEAD_SUMMARY = "armo_head.json"  # attributes, penalties, gating hyper-parameters, validation accuracy


def validate_attribute_labels(dataset, skip_invalid: bool, name: str):
    """Check the ATTRIBUTES columns of every row against LABEL_RULES (NaN counts as not rated, as null does): a row
    that breaks them is an error naming it and the attribute, or with skip_invalid is dropped and counted; checked
    before any embedding is computed. Returns (dataset, stats)."""
    def bad(value) -> bool:
        if value is None:
            return False
        return not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and (math.isfinite(value) or math.isnan(value)))

    def reason(*labels) -> dict:
        broken = next((a for a, v in zip(ATTRIBUTES, labels) if bad(v)), None)
        return {"invalid_reason": "bad_attribute_label" if broken else "", "invalid_where": broken or ""}

    marked = map_rows(dataset, reason, list(ATTRIBUTES), desc=f"checking {name}'s attribute labels")
    return enforce_validity(marked, LABEL_RULES, skip_invalid, name)


def dataset_name(path: str) -> str:
    """A file-name-safe name for a dataset given as a hub name or a path (its last component, no extension)."""
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def embeddings_prefix(embeddings_dir: Optional[str], model_path: str, dataset_path: str, split: Optional[str] = None,
                      source: Optional[str] = None) -> str:
    """Where a prepare stage writes (and a train stage reads) embedding shards:
    <embeddings_dir or ./armo_data/embeddings/<model>>/<dataset>[-<source>][-<split>] (stage 1 has no split)."""
    directory = embeddings_dir or f"{DATA_ROOT}/embeddings/{dataset_name(model_path)}"
    suffix = (f"-{source}" if source else "") + (f"-{split}" if split else "")
    return f"{directory}/{dataset_name(dataset_path)}{suffix}"


def regression_weights_path(weights_dir: Optional[str], model_path: str, dataset_path: str) -> Path:
    """Stage 1's probes, a .json beside: <weights_dir or ./armo_data/regression_weights>/<model>_<dataset>.safetensors."""
    directory = Path(weights_dir or f"{DATA_ROOT}/regression_weights")
    return directory / f"{dataset_name(model_path)}_{dataset_name(dataset_path)}.safetensors"


def load_regression_weights(path: str, flag: str = "--regression_weights", model_path: Optional[str] = None
                            ) -> torch.Tensor:
    """Stage 1's regression layer, `weight` [len(ATTRIBUTES), hidden] in fp32. A missing or unreadable file, one of
    another shape, or (given model_path) one fitted on another backbone's embeddings is a UserError naming the path:
    the file is stage-1_train.py's safetensors output (upstream's pickled .pt weights are not read, as pickles can
    run code)."""
    hint = "run armo-rm/stage-1_train.py to write it (pickled .pt weights, as upstream's stage 1 saves, are not read)"
    if not Path(path).is_file():
        raise UserError(f"{flag}: no regression weights file at {path}; {hint}")
    try:
        with safe_open(path, framework="pt") as f:
            weight = f.get_tensor("weight") if "weight" in f.keys() else None
            summary = json.loads((f.metadata() or {}).get("json", "{}"))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{flag}: {path} is not a safetensors file ({str(err).splitlines()[0]}); {hint}") from None
    if weight is None or weight.dim() != 2 or weight.shape[0] != len(ATTRIBUTES):
        found = "no 'weight' tensor" if weight is None else f"'weight' of shape {list(weight.shape)}"
        raise UserError(f"{flag}: {path} has {found}, not the [{len(ATTRIBUTES)}, hidden] regression layer; {hint}")
    if model_path is not None:
        check_same_backbone(summary.get("backbone"), model_path, f"{flag} {path}")
    return weight.float()


def check_same_backbone(recorded: Optional[str], model_path: str, what: str) -> None:
    """What an earlier stage wrote (embeddings, the gating head) belongs to the backbone it recorded: another
    --model_path is a UserError. The default folders are named after the backbone's last path component, and every
    checkpoint this toolkit trains is called last_checkpoint, so two backbones easily share one folder."""
    if recorded is not None and _resolved(recorded) != _resolved(model_path):
        raise UserError(f"{what} was made with the backbone {recorded}, not --model_path {model_path}: pass that "
                        "backbone, or run the earlier stages again with this one")


def gating_head_dir(head_dir: Optional[str], model_path: str) -> Path:
    """Stage 2's output directory (HEAD_WEIGHTS, HEAD_SUMMARY, reward_bench.json):
    <head_dir or ./armo_data/gating_network/<model>>."""
    return Path(head_dir or f"{DATA_ROOT}/gating_network/{dataset_name(model_path)}")


def shard_rows(n_rows: int, n_shards: int, shard_idx: int) -> range:
    """Rows of shard shard_idx (1-based, as upstream) of n_shards: contiguous, so shards merge back in order."""
    if not 1 <= shard_idx <= n_shards:
        raise UserError(f"--shard_idx must be between 1 and --n_shards={n_shards}, got {shard_idx}")
    if n_shards > n_rows:  # an empty shard has nothing to embed
        raise UserError(f"--n_shards {n_shards} is more than the {n_rows} valid rows: use at most {n_rows} shards")
    bounds = np.linspace(0, n_rows, n_shards + 1).astype(int)
    return range(bounds[shard_idx - 1], bounds[shard_idx])


def shard_path(prefix: str, shard_idx: int, n_shards: int) -> Path:
    """<prefix>-00001-of-00004.safetensors"""
    return Path(f"{prefix}-{shard_idx:05d}-of-{n_shards:05d}.safetensors")


def save_shard(prefix: str, shard_idx: int, n_shards: int, tensors: dict, metadata: dict) -> Path:
    """Write one shard's tensors (safetensors) with JSON metadata (what produced it, row ids' source)."""
    path = shard_path(prefix, shard_idx, n_shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(tensors, path, metadata={"json": json.dumps(metadata)})
    return path


def _shard_files(prefix: str) -> list[Path]:
    return sorted(Path(prefix).parent.glob(f"{Path(prefix).name}-*-of-*.safetensors"))


def has_shards(prefix: str) -> bool:
    """Whether any embedding shard of this prefix exists."""
    return bool(_shard_files(prefix))


SHARD_IDENTITY = ("model_path", "dataset_path", "split", "gating_pattern", "attributes")  # one run's shards share them
SHARD_COUNTS = ("not_embedded", "truncated")  # each shard's own count: summed
SHARD_ROW_LISTS = ("ids", "subsets")  # one value per row of the shard, in its row order


def load_shards(prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge every shard of a prefix back into one set of tensors in row order. All shards of one run
    (same n_shards) must be present; a missing, duplicated or foreign shard is an error."""
    files = _shard_files(prefix)
    pattern = re.compile(re.escape(Path(prefix).name) + r"-(\d{5})-of-(\d{5})\.safetensors$")
    found = {}
    for f in files:
        match = pattern.match(f.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = f
    if not found:
        raise UserError(f"no embedding shards found at {prefix}-*-of-*.safetensors; run the prepare stage")
    if len(found) > 1:
        raise UserError(f"shards of different runs at {prefix} (n_shards {sorted(found)}); remove the stale ones")
    n_shards, shards = next(iter(found.items()))
    missing = sorted(set(range(1, n_shards + 1)) - set(shards))
    if missing:
        raise UserError(f"{prefix}: shards {missing} of {n_shards} are missing")
    parts, metas = [], []
    for idx in range(1, n_shards + 1):
        with safe_open(str(shards[idx]), framework="pt") as f:
            parts.append({k: f.get_tensor(k) for k in f.keys()})
            metas.append(json.loads(f.metadata()["json"]))
    for key in SHARD_IDENTITY:  # a shard prepared from another backbone or data would be merged silently
        values = {json.dumps(m.get(key) if key != "model_path" else _resolved(m.get(key))) for m in metas}
        if len(values) > 1:
            raise UserError(f"{prefix}: the shards were prepared with different {key} ({', '.join(sorted(values))}); "
                            "prepare them again with one")
    metadata = {**metas[0], **{key: sum(m[key] for m in metas) for key in SHARD_COUNTS if key in metas[0]}}
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if "row_ids" in merged:
        order = torch.argsort(merged["row_ids"])
        merged = {k: v[order] for k, v in merged.items()}
        expected = torch.arange(len(order))
        if not torch.equal(merged["row_ids"], expected):
            raise UserError(f"{prefix}: shards do not cover rows 0..{len(order) - 1} exactly once")
        for key in SHARD_ROW_LISTS:  # every shard's, in the merged row order (they were the first shard's alone)
            if metadata.get(key) is not None:
                joined = [value for m in metas for value in m[key]]
                metadata[key] = [joined[i] for i in order.tolist()]
    return merged, {**metadata, "n_shards": n_shards}


def _resolved(path: Optional[str]) -> Optional[str]:
    local = Path(path).expanduser() if path else None
    return str(local.resolve()) if local is not None and local.exists() else path
