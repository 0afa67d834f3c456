"""ArmoRM stage 2, part 1: embeddings of preference pairs for the gating network.

    python armo-rm/stage-2_prepare.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 --model_family llama3 \
        --dataset_path RLHFlow/pair_data_v2_80K_wsafety --dataset_split train --n_shards 1 --shard_idx 1
    python armo-rm/stage-2_prepare.py --dataset_path allenai/reward-bench --dataset_split filtered ...

For each pair: the last-token embedding of chosen and of rejected, and the prompt embedding at the gating token
(the token that ends the last user turn, just before the final assistant header). The gating position comes from
the tokenizer's chat template for any model (Llama-3 and Gemma-2 give upstream's hard-coded positions). Pairs
longer than --seq_len are not embedded, but they keep their row: `embedded` marks them, their count is printed,
and ids/subsets stay aligned (upstream dropped them silently, shifting RewardBench rows against their subsets).
Writes <output_dir>/<dataset>[-<source>]-<split>-<shard>-of-<n>.safetensors: `embeddings` [n, 2, hidden] (chosen,
rejected), `prompt_embeddings` [n, 2, hidden], `embedded` [n], `row_ids` [n]; ids and subsets in its metadata.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import armo_utils, rm_utils  # noqa: E402

FAMILY_MODEL_TYPES = {"llama3": "llama", "gemma2": "gemma2"}


@dataclass
class ScriptArguments(armo_utils.PrepareArguments):
    """The shared prepare flags (armo_utils.PrepareArguments) plus the pairs to embed and the length limit."""

    model_family: str = field(default="auto", metadata={"help": "auto (any chat template), llama3 or gemma2."})
    dataset_path: str = field(default=rm_utils.DEFAULT_PREFERENCE_DATA)
    dataset_split: str = field(default="train")
    source: Optional[str] = field(default=None, metadata={"help": "Keep only rows whose 'source' column is this."})
    seq_len: int = field(default=8192, metadata={"help": "Pairs with a longer side are kept but not embedded."})


def main():
    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    splits = rm_utils.load_dataset_dict(args.dataset_path, "--dataset_path", split=None)
    pairs = rm_utils.pick_split(splits, args.dataset_split, "--dataset_path")
    if args.source is not None:
        if "source" not in pairs.column_names:
            raise rm_utils.UserError("--source given but --dataset_path has no 'source' column")
        pairs = pairs.filter(lambda s: s == args.source, input_columns="source")
    pairs, stats = rm_utils.standardize_pairs(pairs, args.skip_invalid, "--dataset_path")
    rows = armo_utils.shard_rows(len(pairs), args.n_shards, args.shard_idx)
    shard = pairs.select(rows)

    model, tokenizer = armo_utils.load_backbone(args.model_path, armo_utils.resolve_device(args.device), args.bf16,
                                                args.attn_implementation, args.trust_remote_code)
    if args.model_family != "auto":
        expected = FAMILY_MODEL_TYPES.get(args.model_family)
        if expected is None or model.config.model_type != expected:
            raise rm_utils.UserError(f"--model_family {args.model_family}: model type is '{model.config.model_type}' "
                                     f"(llama3 needs 'llama', gemma2 'gemma2'; 'auto' works for any chat model)")
    pattern = armo_utils.gating_pattern(tokenizer)
    print(f"Gating token: first of {pattern} ({tokenizer.decode(pattern)!r})")

    chosen = rm_utils.encode_conversations(tokenizer, list(shard["chosen"]))
    rejected = rm_utils.encode_conversations(tokenizer, list(shard["rejected"]))
    embedded = torch.tensor([max(len(c), len(r)) <= args.seq_len for c, r in zip(chosen, rejected)])
    keep = embedded.nonzero().flatten().tolist()
    last, gated = armo_utils.embed(model, tokenizer, [chosen[i] for i in keep] + [rejected[i] for i in keep],
                                   args.batch_size, gating_pattern_ids=pattern)
    hidden = model.config.hidden_size
    embeddings = torch.zeros(len(shard), 2, hidden, dtype=last.dtype)
    prompt_embeddings = torch.zeros(len(shard), 2, hidden, dtype=last.dtype)
    embeddings[keep, 0], embeddings[keep, 1] = last[:len(keep)], last[len(keep):]
    prompt_embeddings[keep, 0], prompt_embeddings[keep, 1] = gated[:len(keep)], gated[len(keep):]

    suffix = (f"-{args.source}" if args.source else "") + f"-{args.dataset_split}"
    prefix = armo_utils.embeddings_prefix(args.output_dir, args.model_path, args.dataset_path, suffix)
    metadata = {"model_path": args.model_path, "dataset_path": args.dataset_path, "split": args.dataset_split,
                "gating_pattern": pattern, "rows": stats, "not_embedded": len(shard) - len(keep),
                "ids": list(shard["id"]) if "id" in shard.column_names else None,
                "subsets": list(shard["subset"]) if "subset" in shard.column_names else None}
    path = armo_utils.save_shard(prefix, args.shard_idx, args.n_shards, {
        "embeddings": embeddings, "prompt_embeddings": prompt_embeddings, "embedded": embedded,
        "row_ids": torch.tensor(list(rows), dtype=torch.int64)}, metadata)
    not_embedded = [i for i in range(len(shard)) if not embedded[i]]
    print(f"Shard {args.shard_idx}/{args.n_shards}: {len(keep)} of {len(shard)} pairs embedded"
          + (f"; {len(not_embedded)} longer than --seq_len={args.seq_len} kept unembedded (rows "
             f"{[rows[i] for i in not_embedded[:10]]}{' ...' if len(not_embedded) > 10 else ''})" if not_embedded else ""))
    print(f"Embeddings: {path}")


if __name__ == "__main__":
    rm_utils.run_cli(main)
