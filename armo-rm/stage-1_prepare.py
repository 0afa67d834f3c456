"""ArmoRM stage 1, part 1: last-token embeddings of a frozen reward model for multi-objective examples.

    python armo-rm/stage-1_prepare.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 \\
        --dataset_path RLHFlow/ArmoRM-Multi-Objective-Data-v0.1 --n_shards 8 --shard_idx 1 --device 0

Each row is a conversation ('messages') with the 19 attribute columns (useful_code/ATTRIBUTES; null
labels become NaN). Rows are shuffled with seed 0 (as upstream, so stage 1's train/validation split is upstream's),
validated, split into contiguous shards (1-based --shard_idx, as upstream) and embedded in length-sorted batches.
Writes <output_dir>/<dataset>-<shard>-of-<n>.safetensors with `embeddings` [n, hidden], `labels` [n, 19] and
`row_ids` (stage-1_train.py merges the shards back in that order).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from useful_code.armo_data import ATTRIBUTES, embeddings_prefix, save_shard, shard_rows, validate_attribute_labels
from useful_code.armo_embeddings import PrepareArguments, embed
from useful_code.output_files import check_output_dir
from useful_code.cli import UserError, note_tiny_recipe, parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_MULTI_OBJECTIVE_DATA, REPO_ROOT
from useful_code.formats import text_start, validate_conversations
from useful_code.hardware import default_device
from useful_code.modeling import load_backbone
from useful_code.templates import encode_conversations, reject_special_tokens, reject_untemplatable, truncate_all

DEFAULT_CONFIG = str(REPO_ROOT / "armo-rm" / "configs" / "tiny.yaml")


@dataclass
class ScriptArguments(PrepareArguments):
    """The shared prepare flags (PrepareArguments) plus the multi-objective data and truncation."""

    dataset_path: str = field(default=DEFAULT_MULTI_OBJECTIVE_DATA)
    max_length: int = field(default=4096,
                            metadata={"min": 1, "help": "Longer conversations keep their last tokens (counted)."})


def main():
    args, config = parse_args((ScriptArguments,), DEFAULT_CONFIG, section="stage-1_prepare")
    note_tiny_recipe(config, DEFAULT_CONFIG, args.model_path, "armo-rm/configs/llama3-8b.yaml")
    prefix = embeddings_prefix(args.output_dir, args.model_path, args.dataset_path)
    check_output_dir(Path(prefix).parent, "--output_dir")  # before any embedding
    data = load_split(args.dataset_path, "train", "--dataset_path", args.skip_invalid)
    missing = [a for a in ATTRIBUTES if a not in data.column_names]
    if missing:
        raise UserError(f"--dataset_path lacks attribute columns {missing}: stage 1 reads the layout of "
                        "RLHFlow/ArmoRM-Multi-Objective-Data-v0.1, a 'messages' conversation and the "
                        f"{len(ATTRIBUTES)} attribute columns (null where a row's source does not rate one)")
    # Every check runs before the shuffle, so that an error names the row as it is in the file.
    data, stats = validate_conversations(data, args.skip_invalid, "--dataset_path")
    data, label_stats = validate_attribute_labels(data, args.skip_invalid, "--dataset_path")
    stats["invalid"].update(label_stats["invalid"])
    stats["used"] = label_stats["used"]
    model, tokenizer = load_backbone(args.model_path, default_device(args.device), args.bf16,
                                     args.attn_implementation, args.trust_remote_code,
                                     pickled_weights=args.load_pickled_weights)
    # Checked on every row before sharding, so that all shards agree on the rows they split.
    data, stats["special_token_in_content"] = reject_special_tokens(data, tokenizer, ("messages",), args.skip_invalid,
                                                                    "--dataset_path")
    data, stats["chat_template_rejects"] = reject_untemplatable(data, tokenizer, ("messages",), args.skip_invalid,
                                                                "--dataset_path")
    # Upstream shuffles with seed 0 before it shards; stage-1_train.py's 80/20 split (seed 42) then takes the same
    # validation rows, which pick each probe's alpha.
    data = data.shuffle(seed=0)
    rows = shard_rows(len(data), args.n_shards, args.shard_idx)
    shard = data.select(rows)

    sequences, truncated = truncate_all(tokenizer, encode_conversations(tokenizer, list(shard["messages"])),
                                        args.max_length)
    embeddings, _ = embed(model, tokenizer, sequences, args.batch_size,
                          max_tokens_per_batch=args.max_tokens_per_batch,
                          # a row's index after the shuffle would not find it in the file: its first words do
                          name=lambda i: f"the --dataset_path conversation starting "
                                         f"{text_start(shard[i]['messages'][0]['content'])}")
    labels = np.array([[np.nan if v is None else v for v in shard[a]] for a in ATTRIBUTES],
                      dtype=np.float32).T.reshape(len(shard), len(ATTRIBUTES))

    path = save_shard(prefix, args.shard_idx, args.n_shards, {
        "embeddings": embeddings, "labels": torch.from_numpy(labels),
        "row_ids": torch.tensor(list(rows), dtype=torch.int64),
    }, {"model_path": args.model_path, "dataset_path": args.dataset_path, "attributes": ATTRIBUTES,
        "rows": stats, "truncated": truncated})
    print(f"Shard {args.shard_idx}/{args.n_shards}: {len(shard)} rows embedded ({stats['read']} read, "
          f"{sum(stats['invalid'].values())} invalid, {truncated} cut to {args.max_length} tokens); "
          f"{int(np.isfinite(labels).sum())} labels present")
    print(f"Embeddings: {path}")


if __name__ == "__main__":
    run_cli(main)
