"""Benchmark: RewardBench-style scoring, length-sorted batches (ours) vs one sequence per forward (upstream's
pipeline with batch_size=1), on real HH-RLHF pairs, in the same run. Prints pairs/s for both, the speed ratio,
and the largest reward difference between the two (they must agree).

    python benchmarks/bench_eval_batching.py [--data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz]
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from hh_pairs import HHBenchArguments, load_hh_pairs
from useful_code.cli import parse_args, run_cli
from useful_code.scoring import score_sequences
from useful_code.templates import load_tokenizer, tokenize_pairs


@dataclass
class BenchArguments(HHBenchArguments):
    max_length: int = field(default=1024, metadata={"min": 1})


def main():
    args = parse_args((BenchArguments,))[0]
    tokenizer = load_tokenizer(args.model, "--model")
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs, _ = tokenize_pairs(load_hh_pairs(args), tokenizer, args.max_length, "truncate", "bench", skip_invalid=True)
    sequences = list(pairs["chosen_input_ids"]) + list(pairs["rejected_input_ids"])

    start = time.perf_counter()
    batched = score_sequences(model, tokenizer, sequences, args.batch_size)
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    with torch.inference_mode():
        single = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]
    single_s = time.perf_counter() - start

    max_diff = float(np.max(np.abs(np.array(batched) - np.array(single))))
    print(f"{args.pairs} HH-RLHF pairs ({len(sequences)} sequences, mean {np.mean([len(s) for s in sequences]):.0f} tokens), "
          f"{torch.get_num_threads()} threads")
    print(f"one sequence per forward : {args.pairs / single_s:8.1f} pairs/s")
    print(f"length-sorted batches of {args.batch_size}: {args.pairs / batched_s:8.1f} pairs/s")
    print(f"speed-up: {single_s / batched_s:.2f}x   max |reward difference|: {max_diff:.2e}")


if __name__ == "__main__":
    run_cli(main)
