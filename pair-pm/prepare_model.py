"""Give a model without a pad token one, and save model and tokenizer together (upstream's Llama-3 recipe).

    python pair-pm/prepare_model.py --model_name meta-llama/Meta-Llama-3-8B-Instruct \\
        --output_path ./models/llama3_it_with_padding_token

Upstream pads with EOS. Here the pad token is a reserved special token where the vocabulary has one
(Llama-3's <|reserved_special_token_0|>, <|finetune_right_pad_id|> on 3.1), else a new [PAD] with the embedding
matrix grown to fit: a pad equal to EOS makes every padded position look like the end of a turn.
"""

from dataclasses import dataclass, field

import torch

from useful_code.output_files import check_output_dir, match_umask
from useful_code.cli import parse_args, run_cli
from useful_code.defaults import DEFAULT_MODEL
from useful_code.modeling import load_preference_model
from useful_code.templates import load_tokenizer


@dataclass
class ScriptArguments:
    """Source model and where the prepared copy goes."""

    model_name: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub name or local directory."})
    output_path: str = field(default="./models/model_with_padding_token")
    bf16: bool = field(default=True, metadata={"help": "Save in bf16 (upstream's dtype); False keeps fp32."})
    trust_remote_code: bool = field(default=False)


def main():
    args = parse_args((ScriptArguments,))[0]
    check_output_dir(args.output_path, "--output_path", inputs=(args.model_name,))  # before loading anything
    tokenizer = load_tokenizer(args.model_name, "--model_name", args.trust_remote_code)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    # Loaded on CPU whatever the machine: this only edits and re-saves the weights.
    model = load_preference_model(args.model_name, "--model_name", tokenizer, dtype, "sdpa",
                                  args.trust_remote_code)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.output_path)
    tokenizer.save_pretrained(args.output_path)
    match_umask(args.output_path)
    print(f"pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}); vocabulary "
          f"{model.get_input_embeddings().num_embeddings}; saved to {args.output_path}")


if __name__ == "__main__":
    run_cli(main)
