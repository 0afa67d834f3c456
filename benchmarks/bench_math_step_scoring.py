"""Speed of PRM step scoring: upstream's loop (one forward per step, each over the whole prefix) against one forward
per solution, unbatched and batched (prm_evaluate.py's way), on the same model and solutions, with the largest
difference between their step scores.

    python benchmarks/bench_math_step_scoring.py [--reward_name_or_path DIR] [--dataset FILE] [--batch_size 16]

Default: a trained toy PRM if `make demo-math` left one, else the embedded tiny model, on the toy best-of-N set.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from useful_code.cli import parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_MODEL, REPO_ROOT
from useful_code.math_data import (
    TOY_BEST_OF_N,
    encode_labeled,
    label_token_ids,
    prm_conversation,
    split_steps,
    validate_eval_rows,
)
from useful_code.math_scoring import StepScorer
from useful_code.templates import encode_conversations

DEMO_CHECKPOINT = REPO_ROOT / "outputs" / "demo-math" / "last_checkpoint"


@dataclass
class BenchArguments:
    reward_name_or_path: str = field(default=str(DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_dir() else DEFAULT_MODEL))
    dataset: str = field(default=TOY_BEST_OF_N)
    model_type: str = field(default="Mistral", metadata={"choices": ("Mistral", "Deepseek")})
    batch_size: int = field(default=16, metadata={"min": 1})
    bf16: bool = field(default=False, metadata={"help": "bf16 where the GPU supports it (fp32 by default)."})
    repeats: int = field(default=3, metadata={"min": 1, "help": "Timed runs of each method; the fastest counts."})


@torch.inference_mode()
def per_step_scores(model, tokenizer, conversations: list[list[dict]]) -> list[list[float]]:
    """Upstream's loop: for step k, the conversation up to its label "+" is templated and run alone, and P(+) is
    read at position -3 (Llama-3's template ends a turn "+", "<|eot_id|>": position -3 predicts the "+")."""
    plus, minus = label_token_ids(tokenizer)
    device = next(model.parameters()).device
    scores = []
    for messages in conversations:
        row = []
        for k in range(2, len(messages) + 1, 2):
            ids = encode_conversations(tokenizer, [messages[:k]])[0]
            assert ids[-2] == plus, "the template does not end a turn with one token after the label"
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -3, [plus, minus]]
            row.append(torch.softmax(logits.float(), -1)[0].item())
        scores.append(row)
    return scores


def timed(fn, repeats: int):
    """(result of the last run, fastest wall time)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return result, best


def main():
    args = parse_args((BenchArguments,))[0]
    scorer = StepScorer.from_pretrained(args.reward_name_or_path, bf16=args.bf16, batch_size=args.batch_size)
    problems, _ = validate_eval_rows(load_split(args.dataset, "test", "--dataset"), scorer.tokenizer, False,
                                     "--dataset")
    conversations = [prm_conversation(prompt, split_steps(answer, args.model_type))
                     for prompt, answers in zip(problems["prompt"], problems["answers"]) for answer in answers]
    steps = sum(len(c) // 2 for c in conversations)
    print(f"{Path(args.reward_name_or_path).name}: {len(conversations)} solutions, {steps} steps, "
          f"device {next(scorer.model.parameters()).device}, dtype {next(scorer.model.parameters()).dtype}")

    loop, loop_s = timed(lambda: per_step_scores(scorer.model, scorer.tokenizer, conversations), args.repeats)
    scorer.batch_size = 1
    single, single_s = timed(lambda: scorer.score_conversations(conversations, progress=False), args.repeats)
    scorer.batch_size = args.batch_size
    batched, batched_s = timed(lambda: scorer.score_conversations(conversations, progress=False), args.repeats)

    # Token positions each method runs through the model: a measure of compute that does not depend on the machine.
    lengths = [len(ids) for ids, _ in encode_labeled(scorer.tokenizer, conversations)]
    prefix_tokens = sum(len(ids) for c in conversations
                        for ids in encode_conversations(scorer.tokenizer, [c[:k] for k in range(2, len(c) + 1, 2)]))
    ordered = sorted(lengths, reverse=True)
    padded_tokens = sum(len(ordered[i:i + args.batch_size]) * ordered[i]
                        for i in range(0, len(ordered), args.batch_size))

    flat = [np.concatenate([np.asarray(s, dtype=np.float64) for s in scores]) for scores in (loop, single, batched)]
    print(f"{'method':<40} {'forwards':>9} {'tokens':>8} {'seconds':>8} {'speed-up':>9} {'max |diff|':>11}")
    for name, forwards, tokens, seconds, values in (
            ("upstream: one forward per step", steps, prefix_tokens, loop_s, flat[0]),
            ("one forward per solution, unbatched", len(conversations), sum(lengths), single_s, flat[1]),
            (f"one forward per solution, batch {args.batch_size}", -(-len(conversations) // args.batch_size),
             padded_tokens, batched_s, flat[2])):
        print(f"{name:<40} {forwards:>9} {tokens:>8} {seconds:>8.3f} {loop_s / seconds:>8.1f}x "
              f"{np.max(np.abs(values - flat[0])):>11.2e}")

if __name__ == "__main__":
    run_cli(main)
