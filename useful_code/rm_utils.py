"""Shared preprocessing for every script: load preference data in any supported format, validate each row,
apply the chat template, truncate, pad, score, and the Bradley-Terry loss.

Every script imports this one module, so the rules below (what a valid pair is, how a conversation becomes
token ids, where a reward is read) are the same for training, evaluation and every model family.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
# Embedded defaults: used when no hub is reachable (CI, a fresh clone). Same loading code as a hub name.
DEFAULT_MODEL = str(ASSETS / "tiny-llama")
DEFAULT_PREFERENCE_DATA = str(ASSETS / "data" / "toy_preference")
REWARD_BENCH_SAMPLE = str(ASSETS / "data" / "reward_bench_sample.jsonl")

ROLES = ("system", "user", "assistant")

INVALID_REASONS = {
    "not_a_message_list": "chosen/rejected must be non-empty lists of {role, content} messages",
    "unknown_role": "every role must be 'system', 'user' or 'assistant'",
    "empty_content": "no message may have empty content",
    "roles_not_alternating": "roles must alternate user/assistant, starting with user (one leading system message allowed)",
    "last_not_assistant": "the last message must be the assistant's",
    "context_mismatch": "chosen and rejected must share the same context (every message but the last)",
    "unparseable_hh": "HH-RLHF text must be a sequence of '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns",
}


class UserError(Exception):
    """A mistake in the user's input or flags: reported as one line, without a traceback."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------- loading


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
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

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


# ------------------------------------------------------------------------------- formats and validation

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_conversation(text: str) -> Optional[list[dict]]:
    """Parse an Anthropic HH-RLHF string ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages; None if the
    text does not start with a turn marker."""
    if not isinstance(text, str):
        return None
    pieces = _HH_TURN.split(text)
    # split() yields [prefix, speaker, content, speaker, content, ...]; a valid text has no prefix.
    if len(pieces) < 3 or pieces[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(pieces[1::2], pieces[2::2])]


def detect_format(column_names: Iterable[str], example: dict) -> str:
    """Name the input format: 'messages' (standard), 'prompt' (RewardBench style) or 'hh' (raw HH-RLHF)."""
    columns = set(column_names)
    if not {"chosen", "rejected"} <= columns:
        raise UserError(f"preference data needs 'chosen' and 'rejected' columns (found: {', '.join(sorted(columns))})")
    if isinstance(example["chosen"], list):
        return "messages"
    if "prompt" in columns:
        return "prompt"
    return "hh"


def _clean_messages(messages: Any) -> Optional[list[dict]]:
    if not isinstance(messages, list) or not messages:
        return None
    cleaned = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content")
        if not isinstance(content, str):
            return None
        cleaned.append({"role": message["role"], "content": content})
    return cleaned


def to_standard_pair(row: dict, fmt: str) -> tuple[list[dict], list[dict], str]:
    """Convert one row to (chosen messages, rejected messages, invalid reason or '')."""
    if fmt == "hh":
        chosen, rejected = parse_hh_conversation(row["chosen"]), parse_hh_conversation(row["rejected"])
        if chosen is None or rejected is None:
            return [], [], "unparseable_hh"
    elif fmt == "prompt":
        prompt = row["prompt"]
        context = _clean_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if context is None or not all(isinstance(row[k], str) for k in ("chosen", "rejected")):
            return [], [], "not_a_message_list"
        chosen = context + [{"role": "assistant", "content": row["chosen"]}]
        rejected = context + [{"role": "assistant", "content": row["rejected"]}]
    else:
        chosen, rejected = _clean_messages(row["chosen"]), _clean_messages(row["rejected"])
        if chosen is None or rejected is None:
            return [], [], "not_a_message_list"
    return chosen, rejected, validate_pair(chosen, rejected)


def validate_pair(chosen: list[dict], rejected: list[dict]) -> str:
    """Return '' for a valid pair, else the first broken rule's key in INVALID_REASONS."""
    for messages in (chosen, rejected):
        if any(m["role"] not in ROLES for m in messages):
            return "unknown_role"
    for messages in (chosen, rejected):
        if any(not m["content"].strip() for m in messages):
            return "empty_content"
    for messages in (chosen, rejected):
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        if not turns or not all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
            return "roles_not_alternating"
        if turns[-1]["role"] != "assistant":
            return "last_not_assistant"
    if chosen[:-1] != rejected[:-1]:
        return "context_mismatch"
    return ""


def standardize_pairs(dataset, skip_invalid: bool, name: str):
    """Convert a preference dataset to the standard format (chosen/rejected message lists) and validate
    every row. An invalid row is an error naming its index and rule, unless skip_invalid, in which case it
    is dropped and counted. Returns (dataset, stats) with stats = {'read', 'invalid': {reason: n}, 'used'}."""
    fmt = detect_format(dataset.column_names, dataset[0]) if len(dataset) else "messages"
    source_columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]

    def convert(row):
        chosen, rejected, reason = to_standard_pair(row, fmt)
        return {"chosen": chosen, "rejected": rejected, "invalid_reason": reason}

    converted = dataset.map(convert, remove_columns=source_columns, desc=f"validating {name}")
    converted, stats = enforce_validity(converted, INVALID_REASONS, skip_invalid, name)
    return converted, {"format": fmt, **stats}


def enforce_validity(dataset, rules: dict[str, str], skip_invalid: bool, name: str):
    """Act on an 'invalid_reason' column ('' = valid, else a key of rules): fail naming the first invalid rows
    and their rules, or, with skip_invalid, drop them and print the count per reason. The column is removed.
    Returns (dataset, stats) with stats = {'read', 'invalid': {reason: n}, 'used'}."""
    reasons = dataset["invalid_reason"]
    invalid = Counter(r for r in reasons if r)
    stats = {"read": len(dataset), "invalid": dict(invalid)}
    if invalid and not skip_invalid:
        first = [(i, r) for i, r in enumerate(reasons) if r][:5]
        examples = ", ".join(f"row {i} ({r})" for i, r in first)
        broken = "; ".join(f"{r}: {rules[r]}" for r in invalid)
        raise UserError(
            f"{name}: {sum(invalid.values())} of {len(dataset)} rows are invalid ({_summary(invalid)}); "
            f"first: {examples} (0-based). Rules: {broken}. "
            f"Fix the data, or pass --skip_invalid to drop them with a count."
        )
    if invalid:
        dataset = dataset.filter(lambda reason: not reason, input_columns="invalid_reason")
        print(f"[{name}] dropped {sum(invalid.values())} of {len(reasons)} invalid rows (--skip_invalid): {_summary(invalid)}")
    stats["used"] = len(dataset)
    return dataset.remove_columns("invalid_reason"), stats


def _summary(counter: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counter.most_common())


# ------------------------------------------------------------------------------- tokenizer and templates


def load_tokenizer(name: str, flag: str, trust_remote_code: bool = False):
    """Load a tokenizer, pad on the right, and make sure it has a pad token distinct from EOS."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag}: could not load tokenizer '{name}' ({str(err).splitlines()[0]}); "
                        f"pass a local model directory with {flag}") from None
    if tokenizer.chat_template is None:
        raise UserError(f"{flag}: tokenizer of '{name}' has no chat template; use an instruct/chat model or set one")
    # Right padding keeps position ids identical to the unpadded sequence, so a reward does not depend on
    # what it was batched with; the classifier reads the last non-pad token either way.
    tokenizer.padding_side = "right"
    ensure_pad_token(tokenizer)
    return tokenizer


# Unused special tokens that model families reserve; taking one avoids growing the embedding matrix.
_RESERVED_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]", "<|pad|>")


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token that is not EOS; return True if a new token was added to the vocab.

    A sequence classifier reads its reward at the last non-pad token, so padding with EOS makes it skip the
    EOS that ends every conversation and score the wrong token (upstream's identical Llama-3 rewards)."""
    eos_ids = {tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in _RESERVED_PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in eos_ids and vocab[candidate] != tokenizer.bos_token_id:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return True


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether calling the tokenizer on text prepends BOS by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def render_conversations(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Apply the chat template as upstream does: the BOS the template writes is removed when the tokenizer
    adds its own, so every sequence starts with exactly one BOS."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)
    bos = tokenizer.bos_token
    if bos and tokenizer_adds_bos(tokenizer):
        texts = [t[len(bos):] if t.startswith(bos) else t for t in texts]
    return texts


def encode_conversations(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation, templated, untruncated."""
    return tokenizer(render_conversations(tokenizer, conversations), add_special_tokens=True)["input_ids"]


def tokenize_pairs(dataset, tokenizer, max_length: int, overlength: str, name: str):
    """Add chosen_input_ids / rejected_input_ids / length columns. Over-long sequences are truncated from
    the left (upstream's rule: the response end, where the reward is read, is kept) or dropped when
    overlength == 'drop'; either way the count is printed. Returns (dataset, stats)."""
    if overlength not in ("truncate", "drop"):
        raise UserError(f"--overlength must be 'truncate' or 'drop', not '{overlength}'")

    def encode(batch):
        chosen = encode_conversations(tokenizer, batch["chosen"])
        rejected = encode_conversations(tokenizer, batch["rejected"])
        too_long = [max(len(c), len(r)) > max_length for c, r in zip(chosen, rejected)]
        return {
            "chosen_input_ids": [ids[-max_length:] for ids in chosen],
            "rejected_input_ids": [ids[-max_length:] for ids in rejected],
            "length": [min(max(len(c), len(r)), max_length) for c, r in zip(chosen, rejected)],
            "overlength": too_long,
        }

    encoded = dataset.map(encode, batched=True, desc=f"tokenizing {name}")
    n_over = sum(encoded["overlength"])
    stats = {"overlength": n_over, "truncated": 0, "dropped_overlength": 0}
    if n_over and overlength == "drop":
        encoded = encoded.filter(lambda over: not over, input_columns="overlength")
        stats["dropped_overlength"] = n_over
        print(f"[{name}] dropped {n_over} pairs longer than max_length={max_length} tokens (--overlength drop)")
    elif n_over:
        stats["truncated"] = n_over
        print(f"[{name}] truncated {n_over} pairs longer than max_length={max_length} tokens from the left")
    return encoded.remove_columns("overlength"), stats


# ------------------------------------------------------------------------------- batching, loss, scoring


@dataclass
class PairwiseCollator:
    """Batch pairs for one forward pass: the chosen sequences first, then the rejected ones, right-padded."""

    tokenizer: Any
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        batch = self.tokenizer.pad(
            {"input_ids": sequences}, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def split_pair_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rewards of a PairwiseCollator batch into (chosen, rejected)."""
    rewards = rewards.reshape(-1)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


@torch.no_grad()
def length_sorted_batches(sequences: list[list[int]], batch_size: int, desc: str = "scoring",
                          progress: bool = False):
    """Index lists of up to batch_size sequences, longest first, so each batch wastes little padding."""
    from tqdm import tqdm

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        yield order[start : start + batch_size]


def truncate_left(ids: list[int], max_length: int, keep_first: bool) -> list[int]:
    """Keep the last max_length tokens (where a reward, embedding or answer is read), and with keep_first the
    first token (the BOS) too."""
    if len(ids) <= max_length:
        return ids
    return ids[:1] + ids[len(ids) - max_length + 1:] if keep_first else ids[len(ids) - max_length:]


def score_sequences(model, tokenizer, sequences: list[list[int]], batch_size: int, progress: bool = False) -> list[float]:
    """Scalar reward of each token sequence, batched by length (longest first) to waste little padding."""
    device = next(model.parameters()).device
    rewards = [0.0] * len(sequences)
    for chunk in length_sorted_batches(sequences, batch_size, progress=progress):
        batch = tokenizer.pad({"input_ids": [sequences[i] for i in chunk]}, padding=True, return_tensors="pt")
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        for i, reward in zip(chunk, logits[:, 0].float().cpu().tolist()):
            rewards[i] = reward
    return rewards


def score_pairs(model, tokenizer, pairs, batch_size: int) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and rejected sequences of a tokenize_pairs() dataset, both sides batched together."""
    chosen, rejected = list(pairs["chosen_input_ids"]), list(pairs["rejected_input_ids"])
    rewards = score_sequences(model, tokenizer, chosen + rejected, batch_size, progress=True)
    return rewards[: len(chosen)], rewards[len(chosen):]


# ------------------------------------------------------------------------------- models and hardware


def has_accelerator() -> bool:
    """True when a CUDA (or other torch accelerator) device is present."""
    return torch.cuda.is_available() or bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


def bf16_available() -> bool:
    """Whether this machine has a GPU that computes in bf16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(bf16: bool) -> torch.dtype:
    """bf16 only where the hardware supports it; fp32 otherwise (and always on CPU)."""
    if bf16 and bf16_available():
        return torch.bfloat16
    if bf16:
        print("bf16 requested but this machine has no bf16-capable GPU: using fp32")
    return torch.float32


def resolve_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 on a GPU where flash-attn is installed, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(auto_class, name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
               trust_remote_code: bool = False, **kwargs):
    """from_pretrained through an Auto class, with one clear error if the model cannot be loaded; the embeddings
    grow to fit a pad token the tokenizer added, and the config learns the pad id."""
    from transformers import AutoConfig

    def cannot_load(err: Exception) -> UserError:
        return UserError(f"{flag}: could not load model '{name}' ({str(err).splitlines()[0]}); "
                         f"pass a local model directory with {flag}")

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        custom = (getattr(config, "auto_map", None) or {}).get(auto_class.__name__)
        if custom and not trust_remote_code:
            # Without it transformers would build the backbone's stock class and silently drop the custom head.
            raise UserError(f"{flag}: '{name}' defines its own {auto_class.__name__} ({custom}); pass "
                            "--trust_remote_code to run that code")
        model = auto_class.from_pretrained(
            name, dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation),
            trust_remote_code=trust_remote_code, **kwargs,
        )
    except (OSError, ValueError) as err:
        raise cannot_load(err) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(name: str, flag: str, tokenizer, dtype: torch.dtype, attn_implementation: str = "auto",
                      trust_remote_code: bool = False):
    """Load a sequence classifier with one output (the reward) and align it with the tokenizer's pad token."""
    from transformers import AutoModelForSequenceClassification

    return load_model(AutoModelForSequenceClassification, name, flag, tokenizer, dtype, attn_implementation,
                      trust_remote_code, num_labels=1)


@contextmanager
def outside_zero3():
    """Load a model whole on this process while a ZeRO-3 run is active: inside it, from_pretrained would partition
    the weights with collectives that the other ranks (not loading) never join, and hang."""
    from transformers.integrations import deepspeed as hf_deepspeed

    zero3_config = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3_config


def save_final_checkpoint(trainer, checkpoint_dir: str) -> None:
    """Save weights (gathered from every rank under ZeRO-3), config and tokenizer as safetensors/JSON. The
    pickled training_args.bin the Trainer adds is removed (metrics.json records the arguments): the checkpoint
    holds nothing that needs pickle to read."""
    trainer.save_model(checkpoint_dir)
    if trainer.args.process_index == 0:
        Path(checkpoint_dir, "training_args.bin").unlink(missing_ok=True)
    trainer.accelerator.wait_for_everyone()


def init_distributed_for_cpu(uses_deepspeed: bool) -> bool:
    """On a machine without an accelerator, start DeepSpeed's gloo process group before TrainingArguments.

    Accelerate sets up no distributed state without CUDA, so the Trainer would count world size 1 while
    DeepSpeed counts the launcher's ranks; initialising DeepSpeed's comm layer first makes both agree.
    Returns True when this machine has no accelerator (so TrainingArguments need use_cpu=True)."""
    if has_accelerator():
        return False
    if uses_deepspeed and "LOCAL_RANK" in os.environ:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return True


def write_run_metrics(output_dir: str, metrics: dict, started: float, train_result, training_args,
                      dtype: torch.dtype) -> str:
    """Add what every training run records (losses, steps, timings, world size, dtype, library versions) to the
    script's own metrics and write <output_dir>/metrics.json; return its path."""
    import json
    import time

    metrics = {
        "train_loss": train_result.training_loss,
        "train_steps": train_result.global_step,
        **metrics,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "world_size": training_args.world_size,
        "dtype": str(dtype),
        "versions": library_versions(),
    }
    path = os.path.join(output_dir, "metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    return path


def library_versions() -> dict[str, str]:
    """Versions that decide a result, recorded with every run."""
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "deepspeed", "datasets", "accelerate", "trl"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
