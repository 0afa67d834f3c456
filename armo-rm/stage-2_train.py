"""ArmoRM stage 2, part 2: verbosity debiasing and the mixture-of-experts gating network.

    python armo-rm/stage-2_train.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 \\
        --multi_objective_dataset RLHFlow/ArmoRM-Multi-Objective-Data-v0.1 \\
        --preference_dataset RLHFlow/pair_data_v2_80K_wsafety --reference_dataset RLHFlow/UltraFeedback-preference-standard \\
        --eval_reward_bench

The reference pairs are --reference_dataset's --reference_split embeddings: by default the preference dataset and
--preference_split (train), as upstream, whose README embeds the reference dataset with stage-2_prepare's default
split (train). Each pair set's dataset, split and shard files are printed before any fitting.

1. Verbosity debiasing: on the reference pairs' responses, each attribute's penalty is the smallest value of
   upstream's grid for which Spearman(r_k - p * r_verbosity, r_verbosity) <= --corr_threshold; the penalties form
   the reward transform matrix T (r @ T).
2. The gating network (upstream's MLP) maps the prompt embedding to attribute weights; score =
   sum_k gate_k * (r @ T)_k, trained with the Bradley-Terry loss on the preference pairs (80/20 split, seeded).
   Unlike upstream, the softmax runs over the attributes and T is applied in training, as in the exported model.
3. With --eval_reward_bench, RewardBench is scored from embeddings with the shared scoring module.
Writes <output_dir>/armo_head.safetensors (regression_layer.weight, reward_transform_matrix, gating.*) and
armo_head.json (attributes, penalties, gating hyper-parameters, validation accuracy); armo-rm/export.py
assembles them with the backbone into one model.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from useful_code import checkpoints, output_files
from useful_code.armo_data import (
    ATTRIBUTES,
    HEAD_SUMMARY,
    HEAD_WEIGHTS,
    VERBOSITY_INDEX,
    check_same_backbone,
    dataset_name,
    embeddings_prefix,
    gating_head_dir,
    load_regression_weights,
    load_shards,
    regression_weights_path,
    shard_path,
)
from useful_code.armo_fit import CORRELATION_THRESHOLD, split_rows, transform_matrix, verbosity_penalties
from useful_code.cli import UserError, note_tiny_recipe, parse_args, run_cli
from useful_code.defaults import DEFAULT_MODEL, DEFAULT_MULTI_OBJECTIVE_DATA, DEFAULT_PREFERENCE_DATA, REPO_ROOT
from useful_code.hardware import default_device
from useful_code.losses import bradley_terry_loss
from useful_code.modeling_armo_rm import GatingNetwork, armo_score
from useful_code.reward_bench import format_report, score_examples

DEFAULT_CONFIG = str(REPO_ROOT / "armo-rm" / "configs" / "tiny.yaml")


@dataclass
class ScriptArguments(checkpoints.OutputDirArguments):
    """Upstream's flags (same names and defaults where they are hyper-parameters) plus explicit paths."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": f"Replace a finished run ({HEAD_WEIGHTS} and {HEAD_SUMMARY}) in the output directory."})
    model_path: str = field(default=DEFAULT_MODEL)
    multi_objective_dataset: str = field(default=DEFAULT_MULTI_OBJECTIVE_DATA)
    preference_dataset: str = field(default=DEFAULT_PREFERENCE_DATA)
    preference_split: str = field(default="train")
    reference_dataset: Optional[str] = field(default=None, metadata={"help": "Default: the preference dataset."})
    reference_split: Optional[str] = field(default=None, metadata={
        "help": "Default: --preference_split (train), the split stage-2_prepare.py embeds by default."})
    device: int = field(default=0, metadata={"help": "GPU index (the CPU when there is no GPU, or when < 0)."})
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.0)
    n_steps: int = field(default=2000, metadata={"min": 1})
    batch_size: int = field(default=1024, metadata={"min": 1})
    verbosity_dim: int = field(default=VERBOSITY_INDEX, metadata={
        "min": 0, "max": len(ATTRIBUTES) - 1, "help": "Index of the verbosity attribute (0-based, among the 19)."})
    corr_threshold: float = field(default=CORRELATION_THRESHOLD, metadata={
        "min": -1, "max": 1, "help": "Largest Spearman correlation with verbosity left after the penalty."})
    model_family: str = field(default="auto", metadata={"help": "Unused here (kept for upstream's commands)."})
    eval_reward_bench: bool = field(default=False)
    reward_bench_dataset: str = field(default="allenai/reward-bench", metadata={"help": "As given to stage-2_prepare."})
    reward_bench_split: str = field(default="filtered")
    logit_scale: float = field(default=1.0, metadata={"above": 0})
    temperature: float = field(default=10.0, metadata={"above": 0})
    n_hidden: int = field(default=3, metadata={"min": 0})
    hidden_size: int = field(default=1024, metadata={"min": 1})
    dropout: float = field(default=0.2, metadata={"min": 0, "below": 1})
    embeddings_dir: Optional[str] = field(default=None, metadata={"help": "Default: ./armo_data/embeddings/<model>."})
    regression_weights: Optional[str] = field(default=None, metadata={
        "help": "stage-1_train.py's weights file, or the directory it wrote to (its --output_dir). Default: its "
                "default output for --model_path and --multi_objective_dataset."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Default: ./armo_data/gating_network/<model>."})
    val_fraction: float = field(default=0.2, metadata={
        "min": 0.0, "max": 1.0, "help": "Preference pairs held out for the validation accuracy (strictly between 0 "
                                        "and 1)."})
    save_every_steps: int = field(default=0, metadata={"min": 0, "help": "Save the training state every x steps (0: "
                                                                          "never), for --resume_from_checkpoint."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "'latest' (the newest checkpoint-N of the output directory) or a checkpoint-N path."})
    seed: int = field(default=0)


def load_pair_embeddings(args, dataset: str, split: str, role: str, split_flag: str) -> tuple[dict, dict]:
    """Merged stage-2 shards of one dataset split: embeddings, prompt embeddings, embedded mask, metadata. Prints
    once which dataset, split and files they are (role: what they are used for). With none at that split, the error
    names the other embeddings of the dataset in the directory and the flag that picks the split."""
    prefix = embeddings_prefix(args.embeddings_dir, args.model_path, dataset, split)
    try:
        tensors, metadata = load_shards(prefix)
    except UserError as err:
        folder, name = Path(prefix).parent, dataset_name(dataset)
        others = sorted({f.name.rsplit("-", 3)[0] for f in folder.glob(f"{name}-*-of-*.safetensors")})
        if not str(err).startswith("no embedding shards found") or not others:
            raise
        raise UserError(f"{err}; {folder} holds {', '.join(others)}: pick the split with {split_flag}") from None
    n_shards = metadata["n_shards"]
    files = shard_path(prefix, 1, n_shards) if n_shards == 1 else \
        f"{prefix}-*-of-{n_shards:05d}.safetensors ({n_shards} shards)"
    print(f"{role}: {dataset}, split {split}: {files}")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, metadata


def embedded_rows(pairs: dict, weight: torch.Tensor, role: str, dataset: str, split: str) -> torch.Tensor:
    """Indices of the embedded pairs of a split. None embedded (every pair longer than stage-2_prepare's --seq_len)
    or embeddings of another width than the regression layer's is a UserError naming the dataset: the penalties or
    the gating network would be fit on nothing."""
    if pairs["embeddings"].shape[-1] != weight.shape[1]:
        raise UserError(f"{role} {dataset} ({split}): embeddings of width {pairs['embeddings'].shape[-1]}, but the "
                        f"regression weights take {weight.shape[1]}; embed it with the backbone stage 1 used")
    rows = pairs["embedded"].nonzero().flatten()
    if len(rows) == 0:
        raise UserError(f"{role} {dataset} ({split}): none of its {len(pairs['embedded'])} pairs is embedded (each "
                        "is longer than the --seq_len stage-2_prepare.py was run with, or the split is empty); "
                        "prepare it again with a larger --seq_len")
    return rows


def pair_scores(gating: GatingNetwork, weight: torch.Tensor, transform: torch.Tensor, prompt: torch.Tensor,
                responses: torch.Tensor) -> torch.Tensor:
    """ArmoRM scores [n, 2] of (chosen, rejected) from the prompt embedding [n, D] and response embeddings [n, 2, D]."""
    gate = gating(prompt)[:, None, :]  # one gate per prompt, shared by both responses
    return armo_score(responses @ weight.T, gate, transform)


# Flags that do not change the gating network's training: a resumed run may set them anew.
NOT_TRAINING = ("overwrite_output_dir", "device", "model_family", "eval_reward_bench", "reward_bench_dataset",
                "reward_bench_split", "save_every_steps", "resume_from_checkpoint", "output_dir")


def training_settings(args, weights_path: str) -> dict:
    """What the steps of a run depend on: every flag but NOT_TRAINING's, and the regression weights file used."""
    return {**{k: v for k, v in asdict(args).items() if k not in NOT_TRAINING},
            "regression_weights": str(Path(weights_path).resolve())}


def check_same_settings(saved: dict, settings: dict, checkpoint: str) -> None:
    """A resumed run must continue the saved one: another --n_steps, --seed (it redraws the validation split),
    network shape or regression weights would mix two runs in one head (a checkpoint that predates the record
    passes)."""
    changed = [f"--{k} {saved[k]} -> {settings.get(k)}" for k in sorted(saved) if saved[k] != settings.get(k)]
    if changed:
        raise UserError(f"--resume_from_checkpoint {checkpoint} was saved by a run with other settings "
                        f"({'; '.join(changed)}): resume with the saved ones, or start again with "
                        "--overwrite_output_dir")


def main():
    args, config = parse_args((ScriptArguments,), DEFAULT_CONFIG, section="stage-2_train")
    note_tiny_recipe(config, DEFAULT_CONFIG, args.model_path, "armo-rm/configs/llama3-8b.yaml")
    device = default_device(args.device)
    output_dir = checkpoints.claim_output_dir(str(gating_head_dir(args.output_dir, args.model_path)),
                                              args.overwrite_output_dir, finished=HEAD_SUMMARY,
                                              resuming=bool(args.resume_from_checkpoint))
    torch.manual_seed(args.seed)
    weights_path = args.regression_weights
    if weights_path is None or Path(weights_path).is_dir():
        weights_path = str(regression_weights_path(weights_path, args.model_path, args.multi_objective_dataset))
    weight = load_regression_weights(weights_path, model_path=args.model_path).to(device)  # [K, D]

    # Both pair sets are loaded and checked first: an unusable one stops the run before any fitting.
    reference_name = (args.reference_dataset or args.preference_dataset, args.reference_split or args.preference_split)
    reference, reference_meta = load_pair_embeddings(args, *reference_name, "Reference pairs (verbosity debiasing)",
                                                     "--reference_split" if args.reference_split else
                                                     "--preference_split")
    check_same_backbone(reference_meta.get("model_path"), args.model_path, f"the embeddings of {reference_name[0]}")
    reference_rows = embedded_rows(reference, weight, "reference dataset", *reference_name)
    pairs, pairs_meta = load_pair_embeddings(args, args.preference_dataset, args.preference_split,
                                             "Preference pairs (gating network)", "--preference_split")
    check_same_backbone(pairs_meta.get("model_path"), args.model_path, f"the embeddings of {args.preference_dataset}")
    usable = embedded_rows(pairs, weight, "preference dataset", args.preference_dataset, args.preference_split)
    if args.eval_reward_bench:  # loaded now too: a wrong split must not cost the training, nor the previous head
        bench, bench_meta = load_pair_embeddings(args, args.reward_bench_dataset, args.reward_bench_split,
                                                 "RewardBench pairs (--eval_reward_bench)", "--reward_bench_split")
        check_same_backbone(bench_meta.get("model_path"), args.model_path,
                            f"the embeddings of {args.reward_bench_dataset}")
        if bench_meta.get("subsets") is None:
            raise UserError(f"{args.reward_bench_dataset}: its embeddings carry no subsets")
    print(f"{len(usable)} of {len(pairs['embedded'])} preference pairs embedded; {len(reference_rows)} of "
          f"{len(reference['embedded'])} reference pairs")
    train_rows, val_rows = split_rows(usable.numpy(), args.val_fraction, args.seed, "embedded preference pairs")
    # The summary is written last: without it the directory never passes for a finished run.
    (output_dir / HEAD_SUMMARY).unlink(missing_ok=True)

    # 1. Verbosity debiasing on the reference responses (chosen and rejected pooled, embedded pairs only).
    ref_rewards = (reference["embeddings"][reference_rows].to(device) @ weight.T).reshape(-1, len(weight))
    debias = verbosity_penalties(ref_rewards.cpu().numpy(), args.verbosity_dim,
                                 threshold=args.corr_threshold)
    transform = torch.tensor(transform_matrix(debias["penalty"], args.verbosity_dim),
                             dtype=torch.float32, device=device)
    print("Verbosity penalties: " + ", ".join(f"{a} {p:g}" for a, p in zip(ATTRIBUTES, debias["penalty"])))
    if debias["not_reached"]:
        print(f"Never under the correlation threshold (penalty 1.0): "
              f"{[ATTRIBUTES[k] for k in debias['not_reached']]}")

    # 2. Gating network on the preference pairs.
    prompt = pairs["prompt_embeddings"][:, 0].to(device)
    responses = pairs["embeddings"].to(device)
    gating = GatingNetwork(weight.shape[1], len(weight), args.hidden_size, args.n_hidden, args.temperature,
                           args.logit_scale, args.dropout).to(device)
    optimizer = torch.optim.AdamW(gating.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.n_steps)
    generator = torch.Generator().manual_seed(args.seed)
    train_rows_t = torch.as_tensor(train_rows)
    start = 0
    resume = checkpoints.resolve_resume(args.resume_from_checkpoint, str(output_dir), checkpoints.LOOP_STATE)
    settings = training_settings(args, weights_path)
    if resume:  # everything the remaining steps depend on, so they are the ones an uninterrupted run takes
        state = checkpoints.load_loop_state(resume)
        check_same_settings(json.loads(state.get("settings", "{}")), settings, resume)
        gating.load_state_dict(state["gating"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["batch_generator"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and "cuda_rng" in state:  # dropout draws from the GPU's generator there
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = state["step"]
    gating.train()
    for step in range(start, args.n_steps):
        batch = train_rows_t[torch.randint(len(train_rows_t), (args.batch_size,), generator=generator)].to(device)
        scores = pair_scores(gating, weight, transform, prompt[batch], responses[batch])
        loss = bradley_terry_loss(scores[:, 0], scores[:, 1])
        if not torch.isfinite(loss):  # else it would train on, save a NaN gating network and report accuracy 0
            raise UserError(f"training diverged: the loss is {loss.item()} at step {step + 1} (--learning_rate "
                            f"{args.learning_rate}); nothing was published: lower --learning_rate")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0 or step == 0:
            print(f"step {step + 1}/{args.n_steps}: loss {loss.item():.4f}")
        if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
            checkpoints.save_loop_state(str(output_dir), step + 1, {
                "gating": gating.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "batch_generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "settings": json.dumps(settings),
                **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})})
    gating.eval()
    with torch.inference_mode():
        val_scores = pair_scores(gating, weight, transform, prompt[val_rows], responses[val_rows])
    if not torch.isfinite(val_scores).all():  # the last update, after the last checked loss: NaN compares false
        raise UserError(f"training diverged: the trained gating network gives NaN or infinite scores on "
                        f"{int((~torch.isfinite(val_scores).all(-1)).sum())} of {len(val_rows)} validation pairs "
                        f"(--learning_rate {args.learning_rate}); nothing was published: lower --learning_rate")
    val_accuracy = float((val_scores[:, 0] > val_scores[:, 1]).float().mean())
    print(f"Validation accuracy: {val_accuracy:.4f} on {len(val_rows)} pairs")

    head = {"regression_layer.weight": weight.cpu(), "reward_transform_matrix": transform.cpu(),
            **{f"gating.{k}": v.detach().cpu() for k, v in gating.state_dict().items()}}
    output_files.atomic_save_file(head, output_dir / HEAD_WEIGHTS)
    summary = {"attributes": ATTRIBUTES, "verbosity_dim": args.verbosity_dim,
               "penalty": debias["penalty"].tolist(), "corr": debias["corr"].tolist(),
               "not_reached": [ATTRIBUTES[k] for k in debias["not_reached"]],
               "gating_hidden_dim": args.hidden_size, "gating_n_hidden": args.n_hidden,
               "gating_temperature": args.temperature, "val_accuracy": val_accuracy, "val_pairs": len(val_rows),
               "regression_weights": weights_path, "arguments": asdict(args)}

    # 3. RewardBench from embeddings (rows that were not embedded count as ties: wrong, and reported).
    if args.eval_reward_bench:
        with torch.inference_mode():
            scores = pair_scores(gating, weight, transform, bench["prompt_embeddings"][:, 0].to(device),
                                 bench["embeddings"].to(device)).cpu()
            scores[~bench["embedded"]] = 0.0  # not embedded: a tie, counted wrong (and reported below)
        ids = bench_meta["ids"] or list(range(len(scores)))
        results = score_examples(ids, bench_meta["subsets"], scores[:, 0].tolist(), scores[:, 1].tolist())
        results["not_embedded"] = int((~bench["embedded"]).sum())
        output_files.atomic_write_text(output_dir / "reward_bench.json", json.dumps(results, indent=2))
        print(format_report(results))
        summary["reward_bench"] = {"sections": results["sections"], "score": results["score"],
                                   "not_embedded": results["not_embedded"]}
    output_files.atomic_write_text(output_dir / HEAD_SUMMARY, json.dumps(summary, indent=2))
    print(f"ArmoRM head: {output_dir / HEAD_WEIGHTS} (+ {HEAD_SUMMARY})")


if __name__ == "__main__":
    run_cli(main)
