"""Assemble backbone + regression layer + reward transform matrix + gating network into one Hugging Face model.

    python armo-rm/export.py --model_path sfairXC/FsfairX-LLaMA3-RM-v0.1 \
        --head_dir ./armo_data/gating_network/FsfairX-LLaMA3-RM-v0.1 --output_path ./models/ArmoRM

The result loads like the published RLHFlow/ArmoRM-Llama3-8B-v0.1:
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    out = model(input_ids)  # out.score, out.rewards (per attribute), out.gating_output; out.logits = score[:, None]
The attribute names, verbosity penalties and gating settings are in its config. The export is checked: the
exported model's score on a few preference pairs must equal stage 2's score from embeddings.
"""

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import armo_utils, modeling_armo_rm, rm_utils  # noqa: E402


@dataclass
class ScriptArguments:
    """The backbone (the stage-1/2 model), stage 2's head directory and where the model goes."""

    model_path: str = field(default=rm_utils.DEFAULT_MODEL)
    head_dir: str = field(default=f"{armo_utils.DATA_ROOT}/gating_network/tiny-llama",
                          metadata={"help": "Directory with stage-2_train.py's armo_head.safetensors/.json."})
    output_path: str = field(default="./models/ArmoRM")
    check_pairs: int = field(default=8, metadata={"help": "Toy pairs scored to check the export."})
    bf16: bool = field(default=False, metadata={"help": "Save the weights in bf16 (as the published 8B model)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "For the backbone only."})


def build_config(model_path: str, summary: dict, pattern: list[int], trust_remote_code: bool):
    """The backbone's config plus what the ArmoRM head needs, with auto_map pointing at the shipped modeling file."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
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
    from safetensors.torch import load_file

    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    head_dir = Path(args.head_dir)
    try:
        head = load_file(str(head_dir / "armo_head.safetensors"))
        summary = json.loads((head_dir / "armo_head.json").read_text())
    except OSError as err:
        raise rm_utils.UserError(f"--head_dir: {err}; run armo-rm/stage-2_train.py first") from None
    tokenizer = rm_utils.load_tokenizer(args.model_path, "--model_path", args.trust_remote_code)
    pattern = armo_utils.gating_pattern(tokenizer)
    config = build_config(args.model_path, summary, pattern, args.trust_remote_code)
    config.pad_token_id = tokenizer.pad_token_id

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    backbone = rm_utils.load_model(AutoModel, args.model_path, "--model_path", tokenizer, dtype, "sdpa",
                                   args.trust_remote_code)
    model = modeling_armo_rm.ArmoRMForSequenceClassification(config).to(dtype)
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state.update({k: v.to(dtype) for k, v in head.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export: weights missing {missing} / unexpected {unexpected}")
    out = Path(args.output_path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(modeling_armo_rm.__file__, out / "modeling_armo_rm.py")
    print(f"Exported ArmoRM ({config.num_objectives} attributes, hidden {config.hidden_size}) to {out}")

    max_diff = check_export(out, args.model_path, head, args.check_pairs, tolerance=5e-2 if args.bf16 else 1e-4)
    print(f"Export verified: scores equal stage 2's from embeddings (max |diff| {max_diff:.2e} on "
          f"{args.check_pairs} pairs)")


def check_export(path: Path, backbone_path: str, head: dict, n_pairs: int, tolerance: float) -> float:
    """Score toy pairs with the exported model as a user loads it, and with stage 2's embedding route
    (backbone embeddings, then the head's tensors); they must agree."""
    import numpy as np
    from datasets import load_dataset

    exported = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True,
                                                                  dtype=torch.float32).eval()
    tokenizer = rm_utils.load_tokenizer(str(path), "checkpoint")
    rows = load_dataset("json", data_files=f"{rm_utils.DEFAULT_PREFERENCE_DATA}/test.jsonl", split="train")
    rows = rows.select(range(n_pairs))
    conversations = list(rows["chosen"]) + list(rows["rejected"])
    sequences = rm_utils.encode_conversations(tokenizer, conversations)
    direct = np.array(rm_utils.score_sequences(exported, tokenizer, sequences, batch_size=4))

    backbone, _ = armo_utils.load_backbone(backbone_path, "cpu")
    last, gated = armo_utils.embed(backbone, tokenizer, sequences, 4, exported.config.gating_pattern, progress=False)
    gating = modeling_armo_rm.GatingNetwork(
        last.shape[1], exported.config.num_objectives, exported.config.gating_hidden_dim,
        exported.config.gating_n_hidden, exported.config.gating_temperature).eval()
    gating.load_state_dict({k.removeprefix("gating."): v for k, v in head.items() if k.startswith("gating.")})
    with torch.no_grad():
        via_embeddings = modeling_armo_rm.armo_score(last @ head["regression_layer.weight"].T, gating(gated),
                                                     head["reward_transform_matrix"]).numpy()
    max_diff = float(np.max(np.abs(direct - via_embeddings)))
    if not max_diff <= tolerance * max(1.0, float(np.max(np.abs(direct)))):
        raise RuntimeError(f"exported model scores differ from stage 2's by up to {max_diff:.3g}")
    return max_diff


if __name__ == "__main__":
    rm_utils.run_cli(main)
