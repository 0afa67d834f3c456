"""Which attributes drive an ArmoRM score: the top-K attributes by |coefficient| for one conversation.

    python armo-rm/interpret.py --trust_remote_code --model_path ./models/ArmoRM --prompt "What are some synonyms for beautiful?" \\
        --response "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant" --top_k 3

The coefficients are gating_output @ T^T (T: the reward transform matrix), so score = sum_k rewards_k * coeff_k,
as in upstream's README. From Python: model.explain(input_ids, top_k) on the loaded export.
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification

from useful_code.cli import UserError, parse_args, run_cli
from useful_code.defaults import REPO_ROOT
from useful_code.formats import CONVERSATION_RULES, validate_conversation
from useful_code.modeling import load_model
from useful_code.templates import encode_conversations, load_tokenizer

DEFAULT_CONFIG = str(REPO_ROOT / "armo-rm" / "configs" / "tiny.yaml")


@dataclass
class ScriptArguments:
    """An exported ArmoRM (armo-rm/export.py) and one prompt/response."""

    model_path: str = field(default="./models/ArmoRM", metadata={"help": "The export (export.py's --output_path)."})
    prompt: str = field(default="What are some synonyms for the word 'beautiful'?")
    response: str = field(default="Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant")
    top_k: int = field(default=3, metadata={"min": 1})
    trust_remote_code: bool = field(default=False, metadata={"help": "Required: the export ships its modeling code."})


def main():
    args = parse_args((ScriptArguments,), DEFAULT_CONFIG, section="interpret")[0]
    messages = [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": args.response}]
    reason = validate_conversation(messages)  # the rules every scoring path applies (an empty text: empty_content)
    if reason:
        raise UserError(f"--prompt / --response: {CONVERSATION_RULES[reason]} ({reason})")
    tokenizer = load_tokenizer(args.model_path, "--model_path")
    model = load_model(AutoModelForSequenceClassification, args.model_path, "--model_path", tokenizer,
                       torch.float32, trust_remote_code=args.trust_remote_code).eval()
    if not hasattr(model.config, "attribute_names"):
        raise UserError(f"--model_path: {args.model_path} is not an ArmoRM export (no attribute_names)")
    result = model.explain(torch.tensor(encode_conversations(tokenizer, [messages])), args.top_k)
    print(f"score {result['score']:.5f}")
    for name, coefficient, reward in result["top"]:
        print(f"  {name:40s} coefficient {coefficient:+.5f}  reward {reward:.5f}")


if __name__ == "__main__":
    run_cli(main)
