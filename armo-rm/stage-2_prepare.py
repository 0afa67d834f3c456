"""ArmoRM stage 2, part 1: embeddings of preference pairs for the gating network.

    python armo-rm/stage-2_prepare.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 --model_family llama3 \\
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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from useful_code.armo_data import embeddings_prefix, save_shard, shard_rows
from useful_code.armo_embeddings import PrepareArguments, embed, gating_pattern
from useful_code.output_files import check_output_dir
from useful_code.cli import UserError, note_tiny_recipe, parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_PREFERENCE_DATA, REPO_ROOT
from useful_code.formats import standardize_pairs
from useful_code.hardware import default_device
from useful_code.modeling import load_backbone
from useful_code.templates import encode_conversations, reject_special_tokens, reject_untemplatable

DEFAULT_CONFIG = str(REPO_ROOT / "armo-rm" / "configs" / "tiny.yaml")


FAMILY_MODEL_TYPES = {"llama3": "llama", "gemma2": "gemma2"}


@dataclass
class ScriptArguments(PrepareArguments):
    """The shared prepare flags (PrepareArguments) plus the pairs to embed and the length limit."""

    model_family: str = field(default="auto", metadata={"help": "auto (any chat template), llama3 or gemma2."})
    dataset_path: str = field(default=DEFAULT_PREFERENCE_DATA)
    dataset_split: str = field(default="train")
    source: Optional[str] = field(default=None, metadata={"help": "Keep only rows whose 'source' column is this."})
    seq_len: int = field(default=8192,
                         metadata={"min": 1, "help": "Pairs with a longer side are kept but not embedded."})


def main():
    args, config = parse_args((ScriptArguments,), DEFAULT_CONFIG, section="stage-2_prepare")
    note_tiny_recipe(config, DEFAULT_CONFIG, args.model_path, "armo-rm/configs/llama3-8b.yaml")
    prefix = embeddings_prefix(args.output_dir, args.model_path, args.dataset_path, args.dataset_split, args.source)
    check_output_dir(Path(prefix).parent, "--output_dir")  # before any embedding
    pairs = load_split(args.dataset_path, args.dataset_split, "--dataset_path", args.skip_invalid)
    if args.source is not None:
        if "source" not in pairs.column_names:
            raise UserError("--source given but --dataset_path has no 'source' column")
        pairs = pairs.filter(lambda s: s == args.source, input_columns="source")
    pairs, stats = standardize_pairs(pairs, args.skip_invalid, "--dataset_path")
    model, tokenizer = load_backbone(args.model_path, default_device(args.device), args.bf16,
                                     args.attn_implementation, args.trust_remote_code,
                                     pickled_weights=args.load_pickled_weights)
    # Checked on every row before sharding, so that all shards agree on the rows they split.
    pairs, stats["special_token_in_content"] = reject_special_tokens(pairs, tokenizer, ("chosen", "rejected"),
                                                                     args.skip_invalid, "--dataset_path")
    pairs, stats["chat_template_rejects"] = reject_untemplatable(pairs, tokenizer, ("chosen", "rejected"),
                                                                 args.skip_invalid, "--dataset_path")
    rows = shard_rows(len(pairs), args.n_shards, args.shard_idx)
    shard = pairs.select(rows)
    if args.model_family != "auto":
        expected = FAMILY_MODEL_TYPES.get(args.model_family)
        if expected is None or model.config.model_type != expected:
            raise UserError(f"--model_family {args.model_family}: model type is '{model.config.model_type}' "
                            f"(llama3 needs 'llama', gemma2 'gemma2'; 'auto' works for any chat model)")
    pattern = gating_pattern(tokenizer)
    print(f"Gating token: first of {pattern} ({tokenizer.decode(pattern)!r})")

    chosen = encode_conversations(tokenizer, list(shard["chosen"]))
    rejected = encode_conversations(tokenizer, list(shard["rejected"]))
    embedded = torch.tensor([max(len(c), len(r)) <= args.seq_len for c, r in zip(chosen, rejected)])
    keep = embedded.nonzero().flatten().tolist()
    last, gated = embed(model, tokenizer, [chosen[i] for i in keep] + [rejected[i] for i in keep],
                        args.batch_size, gating_pattern_ids=pattern,
                        max_tokens_per_batch=args.max_tokens_per_batch,
                        name=lambda i: f"--dataset_path row {rows[keep[i % len(keep)]]} "
                                       f"({'chosen' if i < len(keep) else 'rejected'})")
    hidden = model.config.hidden_size
    embeddings = torch.zeros(len(shard), 2, hidden, dtype=last.dtype)
    prompt_embeddings = torch.zeros(len(shard), 2, hidden, dtype=last.dtype)
    embeddings[keep, 0], embeddings[keep, 1] = last[:len(keep)], last[len(keep):]
    prompt_embeddings[keep, 0], prompt_embeddings[keep, 1] = gated[:len(keep)], gated[len(keep):]

    metadata = {"model_path": args.model_path, "dataset_path": args.dataset_path, "split": args.dataset_split,
                "gating_pattern": pattern, "rows": stats, "not_embedded": len(shard) - len(keep),
                "ids": list(shard["id"]) if "id" in shard.column_names else None,
                "subsets": list(shard["subset"]) if "subset" in shard.column_names else None}
    path = save_shard(prefix, args.shard_idx, args.n_shards, {
        "embeddings": embeddings, "prompt_embeddings": prompt_embeddings, "embedded": embedded,
        "row_ids": torch.tensor(list(rows), dtype=torch.int64)}, metadata)
    not_embedded = [i for i in range(len(shard)) if not embedded[i]]
    print(f"Shard {args.shard_idx}/{args.n_shards}: {len(keep)} of {len(shard)} pairs embedded"
          + (f"; {len(not_embedded)} longer than --seq_len={args.seq_len} kept unembedded (rows "
             f"{[rows[i] for i in not_embedded[:10]]}{' ...' if len(not_embedded) > 10 else ''})" if not_embedded else ""))
    print(f"Embeddings: {path}")


if __name__ == "__main__":
    run_cli(main)
