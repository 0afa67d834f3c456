"""ArmoRM (armo-rm/) shared logic: the 19 attributes, batched embedding extraction, shard files, ridge probes,
the verbosity-penalty search and the reward transform matrix. Numbers that define the method (alpha grid,
penalty grid, correlation threshold) are upstream's and live here once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from useful_code import rm_utils

# Head order everywhere (RLHFlow/ArmoRM-Multi-Objective-Data-v0.1 columns).
ATTRIBUTES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)
VERBOSITY_INDEX = ATTRIBUTES.index("helpsteer-verbosity")
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
PENALTY_GRID = (0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
                0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
CORRELATION_THRESHOLD = 0.03
DEFAULT_MULTI_OBJECTIVE_DATA = str(rm_utils.ASSETS / "data" / "toy_multi_objective")


def dataset_name(path: str) -> str:
    """A file-name-safe name for a dataset given as a hub name or a path (its last component, no extension)."""
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


DATA_ROOT = "./armo_data"  # upstream hard-codes ~/data/ArmoRM; here every stage takes its paths as flags


@dataclass
class PrepareArguments:
    """Flags both prepare stages share: upstream's model, sharding and device, plus batching and the output."""

    model_path: str = field(default=rm_utils.DEFAULT_MODEL, metadata={"help": "Reward model (its transformer is used)."})
    n_shards: int = field(default=1)
    shard_idx: int = field(default=1, metadata={"help": "1-based, as upstream."})
    device: int = field(default=0, metadata={"help": "GPU index (the CPU when there is no GPU)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Default: ./armo_data/embeddings/<model>."})
    batch_size: int = field(default=16)
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    bf16: bool = field(default=True)
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)


def embeddings_prefix(output_dir, model_path: str, dataset_path: str, suffix: str = "") -> str:
    """Where a prepare stage writes (and a train stage reads) embedding shards:
    <output_dir or ./armo_data/embeddings/<model>>/<dataset><suffix>."""
    directory = output_dir or f"{DATA_ROOT}/embeddings/{dataset_name(model_path)}"
    return f"{directory}/{dataset_name(dataset_path)}{suffix}"


def validate_conversations(dataset, skip_invalid: bool, name: str):
    """Check every 'messages' conversation (roles alternate, ends with the assistant, no empty content): an invalid
    row is an error naming it, or with skip_invalid is dropped and counted. Returns (dataset, stats)."""

    def reason(messages) -> dict:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in messages)
        return {"invalid_reason": rm_utils.validate_pair(messages, messages) if ok else "not_a_message_list"}

    if "messages" not in dataset.column_names:
        raise rm_utils.UserError(f"{name}: needs a 'messages' column (a conversation ending with the assistant's turn)")
    marked = dataset.map(reason, input_columns="messages", desc=f"validating {name}")
    return rm_utils.enforce_validity(marked, rm_utils.INVALID_REASONS, skip_invalid, name)


def encode_truncated(tokenizer, conversations: list[list[dict]], max_length: int) -> tuple[list[list[int]], int]:
    """Templated token ids cut to their last max_length tokens (where the embedding is read), keeping the BOS;
    returns them and how many were cut."""
    keep_first = rm_utils.tokenizer_adds_bos(tokenizer)
    sequences = rm_utils.encode_conversations(tokenizer, conversations)
    cut = sum(len(s) > max_length for s in sequences)
    return [rm_utils.truncate_left(s, max_length, keep_first) for s in sequences], cut


# ------------------------------------------------------------------------------------------ embeddings


def gating_pattern(tokenizer) -> list[int]:
    """Token ids that end a user turn and open the assistant's, read off the chat template: from the last
    non-whitespace token of a rendered context to the end of the generation prompt. For Llama-3 this is
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n and for Gemma-2 <end_of_turn>\\n<start_of_turn>model\\n,
    upstream's hard-coded patterns; its first token is where the prompt embedding is read."""
    probe = [[{"role": "user", "content": "Hello"}]]
    context = rm_utils.encode_conversations(tokenizer, probe)[0]
    with_header = tokenizer(rm_utils.render_conversations(tokenizer, probe, add_generation_prompt=True),
                            add_special_tokens=True)["input_ids"][0]
    if with_header[:len(context)] != context or len(with_header) == len(context):
        raise rm_utils.UserError("the chat template's generation prompt does not extend the rendered context, so the "
                                 "start of the assistant turn cannot be located")
    gate = len(context) - 1
    while gate > 0 and not tokenizer.decode([context[gate]]).strip():
        gate -= 1
    return context[gate:] + with_header[len(context):]


@torch.no_grad()
def embed(model, tokenizer, sequences: list[list[int]], batch_size: int, gating_pattern_ids=None,
          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final-layer hidden state at each sequence's last token, and (with gating_pattern_ids) at its gating
    position; batched by length (longest first) with right padding. Returns CPU tensors in the model's dtype."""
    from useful_code.modeling_armo_rm import find_gating_positions

    device = next(model.parameters()).device
    hidden_size = model.config.hidden_size
    last = torch.zeros(len(sequences), hidden_size, dtype=model.dtype)
    gated = torch.zeros(len(sequences), hidden_size, dtype=model.dtype) if gating_pattern_ids else None
    for chunk in rm_utils.length_sorted_batches(sequences, batch_size, "embedding", progress):
        batch = tokenizer.pad({"input_ids": [sequences[i] for i in chunk]}, padding=True, return_tensors="pt")
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        rows = torch.arange(len(chunk), device=device)
        last[chunk] = hidden[rows, mask.sum(-1) - 1].cpu()
        if gated is not None:
            gated[chunk] = hidden[rows, find_gating_positions(input_ids, gating_pattern_ids)].cpu()
    return last, gated


def load_backbone(path: str, device: str, bf16: bool = True, attn_implementation: str = "auto",
                  trust_remote_code: bool = False):
    """The reward model's transformer without its head (AutoModel), in eval mode, and its tokenizer."""
    from transformers import AutoModel

    tokenizer = rm_utils.load_tokenizer(path, "--model_path", trust_remote_code)
    dtype = rm_utils.resolve_dtype(bf16) if device != "cpu" else torch.float32
    model = rm_utils.load_model(AutoModel, path, "--model_path", tokenizer, dtype, attn_implementation,
                                trust_remote_code)
    return model.to(device).eval(), tokenizer


def resolve_device(device: int) -> str:
    """Upstream's integer --device as a torch device: cuda:N when a GPU is present, else the CPU."""
    return f"cuda:{device}" if torch.cuda.is_available() and device >= 0 else "cpu"


# ---------------------------------------------------------------------------------------------- shards


def shard_rows(n_rows: int, n_shards: int, shard_idx: int) -> range:
    """Rows of shard shard_idx (1-based, as upstream) of n_shards: contiguous, so shards merge back in order."""
    if not 1 <= shard_idx <= n_shards:
        raise rm_utils.UserError(f"--shard_idx must be between 1 and --n_shards={n_shards}, got {shard_idx}")
    bounds = np.linspace(0, n_rows, n_shards + 1).astype(int)
    return range(bounds[shard_idx - 1], bounds[shard_idx])


def shard_path(prefix: str, shard_idx: int, n_shards: int) -> Path:
    """<prefix>-00001-of-00004.safetensors"""
    return Path(f"{prefix}-{shard_idx:05d}-of-{n_shards:05d}.safetensors")


def save_shard(prefix: str, shard_idx: int, n_shards: int, tensors: dict, metadata: dict) -> Path:
    """Write one shard's tensors (safetensors) with JSON metadata (what produced it, row ids' source)."""
    from safetensors.torch import save_file

    path = shard_path(prefix, shard_idx, n_shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"json": json.dumps(metadata)})
    return path


def load_shards(prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge every shard of a prefix back into one set of tensors in row order. All shards of one run
    (same n_shards) must be present; a missing, duplicated or foreign shard is an error."""
    from safetensors import safe_open

    files = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}-*-of-*.safetensors"))
    pattern = re.compile(re.escape(Path(prefix).name) + r"-(\d{5})-of-(\d{5})\.safetensors$")
    found = {}
    for f in files:
        match = pattern.match(f.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = f
    if not found:
        raise rm_utils.UserError(f"no embedding shards found at {prefix}-*-of-*.safetensors; run the prepare stage")
    if len(found) > 1:
        raise rm_utils.UserError(f"shards of different runs at {prefix} (n_shards {sorted(found)}); remove the stale ones")
    n_shards, shards = next(iter(found.items()))
    missing = sorted(set(range(1, n_shards + 1)) - set(shards))
    if missing:
        raise rm_utils.UserError(f"{prefix}: shards {missing} of {n_shards} are missing")
    parts, metadata = [], None
    for idx in range(1, n_shards + 1):
        with safe_open(str(shards[idx]), framework="pt") as f:
            parts.append({k: f.get_tensor(k) for k in f.keys()})
            metadata = metadata or json.loads(f.metadata()["json"])
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if "row_ids" in merged:
        order = torch.argsort(merged["row_ids"])
        merged = {k: v[order] for k, v in merged.items()}
        expected = torch.arange(len(order))
        if not torch.equal(merged["row_ids"], expected):
            raise rm_utils.UserError(f"{prefix}: shards do not cover rows 0..{len(order) - 1} exactly once")
    return merged, {**metadata, "n_shards": n_shards}


# ------------------------------------------------------------------------------------------ probes


def fit_ridge_probes(embeddings: np.ndarray, labels: np.ndarray, alphas=RIDGE_ALPHAS, val_fraction: float = 0.2,
                     seed: int = 42) -> dict:
    """Per attribute: ridge regression without intercept on the rows where that label is present, each alpha
    fit on the train split and scored by validation MSE; the best alpha's weights are kept (fit on the train
    split, as upstream). Returns {'weight': [K, D], 'alpha', 'val_mse', 'n_train', 'n_val'} (lists per attribute);
    an attribute with no labels gets zero weights and alpha None (with no validation labels, val_mse is NaN and the
    first alpha is kept)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error
    from sklearn.model_selection import train_test_split

    import warnings

    from scipy.linalg import LinAlgWarning

    rows = np.arange(len(embeddings))
    train_rows, val_rows = train_test_split(rows, test_size=val_fraction, random_state=seed)
    n_attr = labels.shape[1]
    result = {"weight": np.zeros((n_attr, embeddings.shape[1]), dtype=np.float32),
              "alpha": [None] * n_attr, "val_mse": [None] * n_attr, "n_train": [0] * n_attr, "n_val": [0] * n_attr}
    for k in range(n_attr):
        tr = train_rows[~np.isnan(labels[train_rows, k])]
        va = val_rows[~np.isnan(labels[val_rows, k])]
        result["n_train"][k], result["n_val"][k] = len(tr), len(va)
        if len(tr) == 0:
            continue
        best = None
        for alpha in alphas:
            with warnings.catch_warnings():
                # The grid's smallest alphas are near-singular on low-rank embeddings; validation MSE decides.
                warnings.simplefilter("ignore", LinAlgWarning)
                model = Ridge(alpha=alpha, fit_intercept=False).fit(embeddings[tr], labels[tr, k])
            mse = mean_squared_error(labels[va, k], model.predict(embeddings[va])) if len(va) else float("nan")
            if best is None or mse < best[1]:
                best = (alpha, mse, model.coef_)
        result["alpha"][k], result["val_mse"][k] = best[0], float(best[1])
        result["weight"][k] = best[2]
    return result


def verbosity_penalties(rewards: np.ndarray, verbosity_index: int = VERBOSITY_INDEX, grid=PENALTY_GRID,
                        threshold: float = CORRELATION_THRESHOLD) -> dict:
    """Upstream's verbosity debiasing: for each attribute k, the smallest penalty p in the grid for which the
    Spearman correlation between r_k - p * r_verbosity and r_verbosity is at most the threshold. An attribute
    that never gets there keeps penalty 1.0 (upstream's rule) and is listed; the verbosity attribute itself gets
    1.0, which removes it. rewards: [n, K]. Returns {'penalty', 'corr', 'not_reached'}."""
    from scipy.stats import spearmanr

    n_attr = rewards.shape[1]
    verbosity = rewards[:, verbosity_index]
    penalty, corr = np.ones(n_attr), np.ones(n_attr)
    remaining = [k for k in range(n_attr) if k != verbosity_index]
    for p in sorted(grid):
        for k in list(remaining):
            rho = spearmanr(rewards[:, k] - p * verbosity, verbosity).statistic
            if rho <= threshold:
                penalty[k], corr[k] = p, rho
                remaining.remove(k)
            else:
                corr[k] = min(corr[k], rho)
        if not remaining:
            break
    return {"penalty": penalty, "corr": corr, "not_reached": remaining}


def transform_matrix(penalty: np.ndarray, verbosity_index: int = VERBOSITY_INDEX) -> np.ndarray:
    """T with (r @ T)_k = r_k - penalty_k * r_verbosity: the identity with the penalties subtracted from the
    verbosity row."""
    matrix = np.eye(len(penalty))
    matrix[verbosity_index] -= penalty
    return matrix
