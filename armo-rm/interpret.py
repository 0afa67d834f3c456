"""Which attributes drive an ArmoRM score: the top-K attributes by |coefficient| for one conversation.

    python armo-rm/interpret.py --trust_remote_code --model_path ./models/ArmoRM --prompt "What are some synonyms for beautiful?" \
        --response "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant" --top_k 3

The coefficients are gating_output @ T^T (T: the reward transform matrix), so score = sum_k rewards_k * coeff_k,
as in upstream's README. From Python: explain(model, tokenizer, messages, top_k).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from useful_code import rm_utils  # noqa: E402


@dataclass
class ScriptArguments:
    """An exported ArmoRM (armo-rm/export.py) and one prompt/response."""

    model_path: str = field(default="./models/ArmoRM")
    prompt: str = field(default="What are some synonyms for the word 'beautiful'?")
    response: str = field(default="Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant")
    top_k: int = field(default=3)
    trust_remote_code: bool = field(default=False, metadata={"help": "Required: the export ships its modeling code."})


@torch.no_grad()
def explain(model, tokenizer, messages: list[dict], top_k: int = 3) -> dict:
    """Score, per-attribute rewards and coefficients of one conversation, and the top_k attributes by
    |coefficient| as (name, coefficient, reward) triples."""
    ids = torch.tensor(rm_utils.encode_conversations(tokenizer, [messages]))
    out = model(input_ids=ids)
    coefficients = (out.gating_output @ model.reward_transform_matrix.T.to(out.gating_output.dtype))[0]
    rewards = out.rewards[0]
    names = model.config.attribute_names
    top = torch.argsort(coefficients.abs(), descending=True)[:top_k].tolist()
    return {"score": float(out.score[0]), "rewards": dict(zip(names, rewards.tolist())),
            "coefficients": dict(zip(names, coefficients.tolist())),
            "top": [(names[k], float(coefficients[k]), float(rewards[k])) for k in top]}


def main():
    from transformers import AutoModelForSequenceClassification

    args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]
    tokenizer = rm_utils.load_tokenizer(args.model_path, "--model_path")
    model = rm_utils.load_model(AutoModelForSequenceClassification, args.model_path, "--model_path", tokenizer,
                                torch.float32, trust_remote_code=args.trust_remote_code).eval()
    if not hasattr(model.config, "attribute_names"):
        raise rm_utils.UserError(f"--model_path: {args.model_path} is not an ArmoRM export (no attribute_names)")
    result = explain(model, tokenizer, [{"role": "user", "content": args.prompt},
                                        {"role": "assistant", "content": args.response}], args.top_k)
    print(f"score {result['score']:.5f}")
    for name, coefficient, reward in result["top"]:
        print(f"  {name:40s} coefficient {coefficient:+.5f}  reward {reward:.5f}")


if __name__ == "__main__":
    rm_utils.run_cli(main)
