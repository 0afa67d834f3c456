"""ArmoRM stage 1, part 1: last-token embeddings of a frozen reward model for multi-objective examples.

    python armo-rm/stage-1_prepare.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 \
        --dataset_path RLHFlow/ArmoRM-Multi-Objective-Data-v0.1 --n_shards 8 --shard_idx 1 --device 0

Each row is a conversation ('messages') with the 19 attribute columns (useful_code/armo_utils.ATTRIBUTES; null
labels become NaN). Rows are validated, split into contiguous shards (1-based --shard_idx, as upstream) and
embedded in length-sorted batches. Writes <output_dir>/<dataset>-<shard>-of-<n>.safetensors with `embeddings`
[n, hidden], `labels` [n, 19] and `row_ids` (stage-1_train.py merges the shards back in row order).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import armo_utils, rm_utils  # noqa: E402


@dataclass
class ScriptArguments(armo_utils.PrepareArguments):
    """The shared prepare flags (armo_utils.PrepareArguments) plus the multi-objective data and truncation."""

    dataset_path: str = field(default=armo_utils.DEFAULT_MULTI_OBJECTIVE_DATA)
    max_length: int = field(default=4096, metadata={"help": "Longer conversations keep their last tokens (counted)."})


def main():
    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    data = rm_utils.pick_split(rm_utils.load_dataset_dict(args.dataset_path, "--dataset_path"), "train",
                               "--dataset_path")
    missing = [a for a in armo_utils.ATTRIBUTES if a not in data.column_names]
    if missing:
        raise rm_utils.UserError(f"--dataset_path lacks attribute columns {missing}")
    data, stats = armo_utils.validate_conversations(data, args.skip_invalid, "--dataset_path")
    rows = armo_utils.shard_rows(len(data), args.n_shards, args.shard_idx)
    shard = data.select(rows)

    model, tokenizer = armo_utils.load_backbone(args.model_path, armo_utils.resolve_device(args.device), args.bf16,
                                                args.attn_implementation, args.trust_remote_code)
    sequences, truncated = armo_utils.encode_truncated(tokenizer, list(shard["messages"]), args.max_length)
    embeddings, _ = armo_utils.embed(model, tokenizer, sequences, args.batch_size)
    labels = np.array([[np.nan if v is None else v for v in shard[a]] for a in armo_utils.ATTRIBUTES],
                      dtype=np.float32).T.reshape(len(shard), len(armo_utils.ATTRIBUTES))

    prefix = armo_utils.embeddings_prefix(args.output_dir, args.model_path, args.dataset_path)
    path = armo_utils.save_shard(prefix, args.shard_idx, args.n_shards, {
        "embeddings": embeddings, "labels": torch.from_numpy(labels),
        "row_ids": torch.tensor(list(rows), dtype=torch.int64),
    }, {"model_path": args.model_path, "dataset_path": args.dataset_path, "attributes": armo_utils.ATTRIBUTES,
        "rows": stats, "truncated": truncated})
    print(f"Shard {args.shard_idx}/{args.n_shards}: {len(shard)} rows embedded ({stats['read']} read, "
          f"{sum(stats['invalid'].values())} invalid, {truncated} cut to {args.max_length} tokens); "
          f"{int(np.isfinite(labels).sum())} labels present")
    print(f"Embeddings: {path}")


if __name__ == "__main__":
    rm_utils.run_cli(main)
