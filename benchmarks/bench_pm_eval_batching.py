"""Benchmark: preference-model scoring in both orders as the eval scripts score (packed rows of
--max_tokens_per_batch tokens, or with 0 length-sorted left-padded batches of --batch_size; last-position logits
only) vs upstream's loop (one sequence per forward, full logits), on real HH-RLHF pairs, in the same run. Prints
pairs/s for both, the speed ratio, and the largest difference in P(chosen preferred) (they must agree).

    python benchmarks/bench_pm_eval_batching.py [--data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz]
        [--max_tokens_per_batch 0 --batch_size 64]
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hh_pairs import HHBenchArguments, load_hh_pairs
from useful_code.cli import parse_args, run_cli
from useful_code.pm_data import build_pm_prompt, encode_pm_prompts, label_token_ids
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.scoring import token_budget_field


@dataclass
class BenchArguments(HHBenchArguments):
    pairs: int = field(default=200, metadata={"min": 1, "help": "Pairs scored by each method (each in both orders)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 on a GPU that has it (fp32 on CPU)."})
    max_tokens_per_batch: int = token_budget_field()


def upstream_loop(model, tokenizer, contexts, chosen, rejected) -> np.ndarray:
    """upstream's eval_reward_bench_pm.py loop: each order of each pair in its own forward pass."""
    id_a, id_b = label_token_ids(tokenizer)
    device = next(model.parameters()).device
    out = []
    for context, good, bad in zip(contexts, chosen, rejected):
        probs = []
        for position, (a, b) in enumerate(((good, bad), (bad, good))):
            ids = encode_pm_prompts(tokenizer, [build_pm_prompt(context, a, b)])[0]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1, [id_a, id_b]].float()
            probs.append(torch.softmax(logits, -1)[position].item())
        out.append(np.mean(probs))
    return np.array(out)


def main():
    args = parse_args((BenchArguments,))[0]
    scorer = PairPreferenceScorer.from_pretrained(args.model, "--model", bf16=args.bf16, batch_size=args.batch_size,
                                                  max_tokens_per_batch=args.max_tokens_per_batch)
    pairs = load_hh_pairs(args)
    contexts = [c[:-1] for c in pairs["chosen"]]
    chosen = [c[-1]["content"] for c in pairs["chosen"]]
    rejected = [r[-1]["content"] for r in pairs["rejected"]]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    with torch.inference_mode():
        scorer.prob_first_preferred(contexts[:8], chosen[:8], rejected[:8])  # warm-up (kernels, allocator)
        sync()
        start = time.perf_counter()
        batched = scorer.prob_first_preferred(contexts, chosen, rejected)["mean"]
        sync()
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        single = upstream_loop(scorer.model, scorer.tokenizer, contexts, chosen, rejected)
        sync()
        single_s = time.perf_counter() - start

    lengths = [len(s) for s in encode_pm_prompts(scorer.tokenizer, [
        build_pm_prompt(c, a, b) for c, a, b in zip(contexts, chosen, rejected)])]
    device = next(scorer.model.parameters()).device
    print(f"{args.pairs} HH-RLHF pairs x 2 orders, mean {np.mean(lengths):.0f} tokens per PM prompt, "
          f"{scorer.model.dtype} on {device}" + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"upstream loop, one sequence per forward     : {args.pairs / single_s:8.1f} pairs/s")
    batching = (f"packed rows of {args.max_tokens_per_batch} tokens" if args.max_tokens_per_batch
                else f"length-sorted batches of {args.batch_size}")
    print(f"{batching}, last logits only: {args.pairs / batched_s:8.1f} pairs/s")
    print(f"speed-up: {single_s / batched_s:.2f}x   max |P(chosen) difference|: {np.max(np.abs(batched - single)):.2e}")


if __name__ == "__main__":
    run_cli(main)
