"""Benchmark: RewardBench-style scoring of real HH-RLHF pairs four ways, on the same checkpoint and token ids:
one sequence per forward (upstream's pipeline with batch_size=1, the reference), length-sorted padded batches,
token-budget padding-free rows, and the same with each shared context computed once (prefix sharing: the default of
every scoring path here on a CPU; on a GPU plain packing is). Prints pairs/s, peak memory and the ratios to the
reference, and checks that every method makes the same decisions (chosen above rejected).

    python benchmarks/bench_eval_batching.py [--model tiny|30m|1b] [--pairs 300] [--max_length 1024] [--bf16 true]

Each method runs in its own process with one thread, one after the other, so that its peak memory (RSS from
os.wait4; on a GPU the allocator's peak) is its own; a few sequences are scored first, untimed (a GPU's first
forwards load kernels). The parent compares their rewards.
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hh_pairs import HHBenchArguments, build_bench_model, load_hh_pairs, run_child
from useful_code import packing
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.defaults import DEFAULT_MODEL
from useful_code.hardware import peak_gpu_memory_mib
from useful_code.modeling import load_reward_model
from useful_code.packing import enable_padding_free, packed_rewards, packed_rows
from useful_code.scoring import DEFAULT_SCORING_TOKENS, score_sequences
from useful_code.templates import load_tokenizer, tokenize_pairs

METHODS = {"single": "one sequence per forward", "padded": "padded batches", "packed": "padding-free token budget",
           "prefix": "+ prefix sharing"}


@dataclass
class BenchArguments(HHBenchArguments):
    model: str = field(default="tiny", metadata={"choices": ("tiny", "30m", "1b")})
    bf16: bool = field(default=False, metadata={"help": "Score in bf16 (on a GPU only; fp32 on a CPU)."})
    max_length: int = field(default=1024, metadata={"min": 1})
    max_tokens_per_batch: int = field(default=DEFAULT_SCORING_TOKENS, metadata={"min": 1})
    group_length_ratio: Optional[float] = field(default=None, metadata={
        "min": 0, "max": 1, "help": "packing.GROUP_LENGTH_RATIO for the packed methods: blocks whose lengths are "
        "within this ratio share one attention call (0: one call per layer, padded to the longest block). Fewer "
        "calls cost more padding. Default: the device's (packing.group_length_ratio: 0.8 on a CPU, 0 on a GPU)."})
    method: Optional[str] = field(default=None, metadata={
        "choices": tuple(METHODS), "help": "Run one method in this process, on --model_dir, into --results."})
    model_dir: Optional[str] = field(default=None, metadata={"help": "With --method: the checkpoint to score with."})
    results: Optional[str] = field(default=None, metadata={"help": "With --method: where its rewards go (.json)."})


def score_with(method: str, args: BenchArguments) -> None:
    """One method, in this process: score the pairs, write the rewards and the scoring time."""
    tokenizer = load_tokenizer(args.model_dir, "--model_dir")
    # On a GPU (when there is one), in bf16 with --bf16; one CPU thread per process either way.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    model = load_reward_model(args.model_dir, "--model_dir", tokenizer, dtype).to(device).eval()
    pairs, _ = tokenize_pairs(load_hh_pairs(args), tokenizer, args.max_length, "truncate", "bench", skip_invalid=True)
    sequences = list(pairs["chosen_input_ids"]) + list(pairs["rejected_input_ids"])
    if method in ("packed", "prefix"):
        assert enable_padding_free(model)
        packing.GROUP_LENGTH_RATIO = args.group_length_ratio

    def score(batch: list) -> list:
        if method == "single":
            with torch.inference_mode():
                return [model(input_ids=torch.tensor([ids], device=device)).logits[0, 0].item() for ids in batch]
        if method in ("packed", "prefix"):  # score_sequences' packed path, prefix sharing as the method says
            rewards = [0.0] * len(batch)
            with torch.inference_mode():
                for chunk, _, inputs in packed_rows(batch, args.max_tokens_per_batch, device,
                                                    share_prefix=method == "prefix"):
                    for i, value in zip(chunk, packed_rewards(model, inputs)[:, 0].float().tolist()):
                        rewards[i] = value
            return rewards
        return score_sequences(model, tokenizer, batch, args.batch_size, max_tokens_per_batch=0)

    # A GPU's first forwards load kernels and set up cuBLAS (a second or two): not part of the method's speed.
    score(sequences[:8])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rewards = score(sequences)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mean_tokens = float(np.mean([len(s) for s in sequences]))
    Path(args.results).write_text(json.dumps({"seconds": seconds, "rewards": rewards, "mean_tokens": mean_tokens,
                                              "peak_gpu_mib": peak_gpu_memory_mib()}))


def main():
    args = parse_args((BenchArguments,))[0]
    if args.method:
        return score_with(args.method, args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
        build_bench_model(args.model, tokenizer, work / "model", seed=0, max_length=args.max_length)
        results = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method, "--model_dir", str(work / "model"),
                   "--results", str(work / f"{method}.json")]
            run = run_child(cmd, work / f"{method}.log", timeout=3600)
            if run["exit_code"] != 0:
                raise UserError(f"{method} failed: {(work / f'{method}.log').read_text()[-2000:]}")
            results[method] = {**run, **json.loads((work / f"{method}.json").read_text())}
    reference = results["single"]
    ratio = args.group_length_ratio
    if ratio is None:
        ratio = packing.group_length_ratio("cuda" if torch.cuda.is_available() else "cpu")
    rewards = {m: np.asarray(r["rewards"]).reshape(2, -1) for m, r in results.items()}
    decisions = {m: r[0] > r[1] for m, r in rewards.items()}
    print(f"{args.pairs} HH-RLHF pairs ({2 * args.pairs} sequences, mean {reference['mean_tokens']:.0f} tokens, "
          f"max_length {args.max_length}), model {args.model}, one thread per process, attention groups of blocks "
          f"within {ratio} of each other's length")
    # On a GPU the process's resident memory is mostly the CUDA context: the GPU's own peak is what batching moves.
    peak = "peak_gpu_mib" if reference["peak_gpu_mib"] is not None else "peak_rss_mib"
    print(f"{'method':34s} {'pairs/s':>9s} {'speed-up':>9s} {'peak MiB':>9s} {'memory':>7s} {'max |diff|':>11s}"
          f"  (memory: {'GPU allocator peak' if peak == 'peak_gpu_mib' else 'peak RSS'})")
    for method, label in METHODS.items():
        r = results[method]
        diff = float(np.max(np.abs(rewards[method] - rewards["single"])))
        if not np.array_equal(decisions[method], decisions["single"]):
            raise UserError(f"{label} changes {int((decisions[method] != decisions['single']).sum())} decisions")
        print(f"{label:34s} {args.pairs / r['seconds']:9.1f} {reference['seconds'] / r['seconds']:8.2f}x "
              f"{r[peak]:9.0f} {r[peak] / reference[peak]:6.2f}x {diff:11.2e}")
    print("decisions: identical across methods")


if __name__ == "__main__":
    run_cli(main)
