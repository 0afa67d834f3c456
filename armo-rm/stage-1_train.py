"""ArmoRM stage 1, part 2: one ridge-regression probe per attribute on the frozen embeddings.

    python armo-rm/stage-1_train.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 \\
        --dataset_path RLHFlow/ArmoRM-Multi-Objective-Data-v0.1

Merges the stage-1 shards in row order (upstream's shuffled order), splits rows 80/20 (seed 42), and per attribute
fits ridge regression without intercept over upstream's alpha grid on the rows where that label is present, keeping
the alpha with the lowest validation MSE. Writes <output_dir>/<model>_<dataset>.safetensors with `weight`
[19, hidden] (the regression layer), and the chosen alphas, validation MSEs and row counts in its metadata and a
.json beside it.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from useful_code.armo_data import (
    ATTRIBUTES,
    check_same_backbone,
    embeddings_prefix,
    has_shards,
    load_shards,
    regression_weights_path,
)
from useful_code.armo_fit import fit_ridge_probes
from useful_code.output_files import atomic_save_file, atomic_write_text, check_output_dir
from useful_code.cli import note_tiny_recipe, parse_args, run_cli
from useful_code.defaults import DEFAULT_MODEL, DEFAULT_MULTI_OBJECTIVE_DATA, REPO_ROOT

DEFAULT_CONFIG = str(REPO_ROOT / "armo-rm" / "configs" / "tiny.yaml")


@dataclass
class ScriptArguments:
    """Upstream's flags (model and dataset name the files; the directories default under ./armo_data)."""

    model_path: str = field(default=DEFAULT_MODEL)
    dataset_path: str = field(default=DEFAULT_MULTI_OBJECTIVE_DATA)
    embeddings_dir: Optional[str] = field(default=None, metadata={
        "help": "The folder of stage-1_prepare.py's shards (<dataset>-*.safetensors), or upstream's form, the shards' "
                "own path prefix. Default: ./armo_data/embeddings/<model>."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Default: ./armo_data/regression_weights."})
    val_fraction: float = field(default=0.2, metadata={
        "min": 0.0, "max": 1.0, "help": "Rows held out to pick each probe's alpha (strictly between 0 and 1)."})
    seed: int = field(default=42)


def main():
    args, config = parse_args((ScriptArguments,), DEFAULT_CONFIG, section="stage-1_train")
    note_tiny_recipe(config, DEFAULT_CONFIG, args.model_path, "armo-rm/configs/llama3-8b.yaml")
    path = regression_weights_path(args.output_dir, args.model_path, args.dataset_path)
    check_output_dir(path.parent, "--output_dir")  # before any fitting
    prefix = embeddings_prefix(args.embeddings_dir, args.model_path, args.dataset_path)
    if args.embeddings_dir and not has_shards(prefix) and has_shards(args.embeddings_dir):
        prefix = args.embeddings_dir  # upstream's form: the shards' own path prefix, not their folder
    tensors, metadata = load_shards(prefix)
    check_same_backbone(metadata.get("model_path"), args.model_path, f"the embeddings at {prefix}")
    embeddings = tensors["embeddings"].float().numpy()
    labels = tensors["labels"].float().numpy()
    print(f"{len(embeddings)} rows from {metadata['n_shards']} shard(s), hidden size {embeddings.shape[1]}")

    probes = fit_ridge_probes(embeddings, labels, val_fraction=args.val_fraction, seed=args.seed)
    for name, alpha, mse, n_train, n_val in zip(ATTRIBUTES, probes["alpha"], probes["val_mse"],
                                                probes["n_train"], probes["n_val"]):
        shown = "no labels: zero weights" if alpha is None else f"alpha {alpha:g}, validation MSE {mse:.4f}"
        print(f"  {name:40s} {n_train:6d} train / {n_val:5d} val rows  {shown}")

    summary = {"attributes": ATTRIBUTES, **{k: probes[k] for k in ("alpha", "val_mse", "n_train", "n_val")},
               "embeddings": prefix, "backbone": metadata.get("model_path"), "rows": len(embeddings),
               "arguments": asdict(args)}
    atomic_save_file({"weight": torch.from_numpy(probes["weight"])}, path, metadata={"json": json.dumps(summary)})
    atomic_write_text(path.with_suffix(".json"), json.dumps(summary, indent=2))
    print(f"Regression weights: {path}")


if __name__ == "__main__":
    run_cli(main)
