"""Assemble backbone + regression layer + reward transform matrix + gating network into one Hugging Face model.

    python armo-rm/export.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 \\
        --head_dir ./armo_data/gating_network/FsfairX-LLaMA3-RM-v0.1 --output_path ./models/ArmoRM

The result loads like the published RLHFlow/ArmoRM-Llama3-8B-v0.1:
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    out = model(input_ids)  # out.score, out.rewards (per attribute), out.gating_output; out.logits = score[:, None]
The attribute names, verbosity penalties and gating settings are in its config. The export is checked: the
exported model's score on a few preference pairs must equal stage 2's score from embeddings.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from useful_code import checkpoints, modeling_armo_rm, output_files
from useful_code.armo_data import HEAD_SUMMARY, HEAD_WEIGHTS, check_same_backbone, gating_head_dir
from useful_code.armo_embeddings import embed, gating_pattern
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_MODEL, DEFAULT_PREFERENCE_DATA, REPO_ROOT
from useful_code.modeling import load_backbone, load_model
from useful_code.scoring import score_sequences
from useful_code.templates import chat_template_error, encode_conversations, load_tokenizer

DEFAULT_CONFIG = str(REPO_ROOT / "armo-rm" / "configs" / "tiny.yaml")


@dataclass
class ScriptArguments:
    """The backbone (the stage-1/2 model), stage 2's head directory and where the model goes."""

    model_path: str = field(default=DEFAULT_MODEL)
    head_dir: Optional[str] = field(default=None, metadata={
        "help": f"stage-2_train.py's output ({HEAD_WEIGHTS}, {HEAD_SUMMARY}). Default: ./armo_data/gating_network/<model>."})
    output_path: str = field(default="./models/ArmoRM")
    check_pairs: int = field(default=8, metadata={"min": 1, "help": "Toy pairs scored to check the export."})
    bf16: bool = field(default=False, metadata={"help": "Save the weights in bf16 (as the published 8B model)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "For the backbone only."})


def build_config(model_path: str, summary: dict, pattern: list[int], trust_remote_code: bool):
    """The backbone's config plus what the ArmoRM head needs, with auto_map pointing at the shipped modeling file."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    for key in ("mean", "std"):  # a BT backbone's reward scale (OpenRLHF's names), not ArmoRM's score's
        if hasattr(config, key):
            delattr(config, key)
    config.num_objectives = len(summary["attributes"])
    config.attribute_names = list(summary["attributes"])
    config.gating_hidden_dim = summary["gating_hidden_dim"]
    config.gating_n_hidden = summary["gating_n_hidden"]
    config.gating_temperature = summary["gating_temperature"]
    config.gating_pattern = pattern
    config.verbosity_penalty = summary["penalty"]
    config.num_labels = 1
    config.architectures = ["ArmoRMForSequenceClassification"]
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_armo_rm.ArmoRMForSequenceClassification"}
    return config


def main():
    args = parse_args((ScriptArguments,), DEFAULT_CONFIG, section="export")[0]
    head_dir = gating_head_dir(args.head_dir, args.model_path)
    if Path(args.output_path).is_file():
        raise UserError(f"--output_path: {args.output_path} is a file; the export is a model directory")
    output_files.check_output_dir(Path(args.output_path).expanduser().resolve().parent, "--output_path")
    try:
        head = load_file(str(head_dir / HEAD_WEIGHTS))
        summary = json.loads((head_dir / HEAD_SUMMARY).read_text())
    except (OSError, SafetensorError, ValueError) as err:  # missing, or not what stage 2 writes (ValueError: JSON)
        raise UserError(f"--head_dir: {head_dir}: {str(err).splitlines()[0]}; run armo-rm/stage-2_train.py first") \
            from None
    check_same_backbone(summary.get("arguments", {}).get("model_path"), args.model_path, f"the head in {head_dir}")
    tokenizer = load_tokenizer(args.model_path, "--model_path", args.trust_remote_code)
    pattern = gating_pattern(tokenizer)
    config = build_config(args.model_path, summary, pattern, args.trust_remote_code)
    config.pad_token_id = tokenizer.pad_token_id

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    backbone = load_model(AutoModel, args.model_path, "--model_path", tokenizer, dtype, "sdpa", args.trust_remote_code)
    model = modeling_armo_rm.ArmoRMForSequenceClassification(config).to(dtype)
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state.update({k: v.to(dtype) for k, v in head.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export: weights missing {missing} / unexpected {unexpected}")
    # Written and checked beside the target, then moved into place: a failed or killed export leaves no model, and
    # a failed one no staging directory either.
    out = Path(args.output_path)
    staged = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        shutil.copy(modeling_armo_rm.__file__, staged / "modeling_armo_rm.py")
        check_export(staged, args.model_path, head, args.check_pairs, tolerance=5e-2 if args.bf16 else 1e-4)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    output_files.publish_dir(staged, out)
    print(f"Exported ArmoRM ({config.num_objectives} attributes, hidden {config.hidden_size}) to {out}")


def check_conversations(tokenizer, n_pairs: int) -> list[list[dict]]:
    """The chosen then the rejected conversations of the first n_pairs toy pairs the chat template accepts. A
    template that refuses a system message (Gemma-2's) gets the pair without it; one that refuses every pair is a
    UserError naming the first row and the template's message."""
    rows = load_split(DEFAULT_PREFERENCE_DATA, "test", "toy pairs")
    chosen, rejected, first_error = [], [], None
    for index, row in enumerate(rows):
        pair = (row["chosen"], row["rejected"])
        error = chat_template_error(tokenizer, pair[0]) or chat_template_error(tokenizer, pair[1])
        if error and pair[0][0]["role"] == "system":
            pair = (pair[0][1:], pair[1][1:])
            error = chat_template_error(tokenizer, pair[0]) or chat_template_error(tokenizer, pair[1])
        if error:
            first_error = first_error or f"row {index}: {error}"
            continue
        chosen.append(pair[0])
        rejected.append(pair[1])
        if len(chosen) == n_pairs:
            break
    if not chosen:
        raise UserError(f"export check: the chat template of --model_path accepts none of the toy pairs "
                        f"({DEFAULT_PREFERENCE_DATA} test; {first_error})")
    return chosen + rejected


def check_export(path: Path, backbone_path: str, head: dict, n_pairs: int, tolerance: float) -> float:
    """Score toy pairs with the exported model as a user loads it, and with stage 2's embedding route (backbone
    embeddings, then the head's tensors); they must agree. Returns the largest difference."""
    exported = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True,
                                                                  dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(path), "checkpoint")
    sequences = encode_conversations(tokenizer, check_conversations(tokenizer, n_pairs))
    direct = score_sequences(exported, tokenizer, sequences, batch_size=4)

    backbone, _ = load_backbone(backbone_path, "cpu")
    last, gated = embed(backbone, tokenizer, sequences, 4, exported.config.gating_pattern, progress=False)
    gating = modeling_armo_rm.GatingNetwork(
        last.shape[1], exported.config.num_objectives, exported.config.gating_hidden_dim,
        exported.config.gating_n_hidden, exported.config.gating_temperature).eval()
    gating.load_state_dict({k.removeprefix("gating."): v for k, v in head.items() if k.startswith("gating.")})
    with torch.inference_mode():
        via_embeddings = modeling_armo_rm.armo_score(last @ head["regression_layer.weight"].T, gating(gated),
                                                     head["reward_transform_matrix"]).numpy()
    return checkpoints.verify_reload(via_embeddings, np.array(direct), torch.float32, str(path), "scores", tolerance,
                                     reference="stage 2's scores from embeddings")


if __name__ == "__main__":
    run_cli(main)
