"""Score a Bradley-Terry (sequence classifier) reward model, or an exported ArmoRM model, on RewardBench 1 or 2.

    python useful_code/eval_reward_bench_bt.py --reward_name_or_path DIR --record_dir FILE [--benchmark 2]
    torchrun --nproc_per_node N useful_code/eval_reward_bench_bt.py ...   # data-parallel: one slice per rank

Scoring follows allenai/reward-bench (useful_code/reward_bench.py). v1: an example is correct only when chosen
scores strictly higher; sections are weighted by the official per-subset counts. v2: every completion of a prompt is
scored once, and the prompt earns 1/k when its correct completion is among the k at the maximum (Ties: the official
weighted formula). Appends to record_dir as upstream does and writes a results JSON (per-example scores, subsets,
sections (v1), score).
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from useful_code.armo_embeddings import check_gating_sequences
from useful_code.cli import parse_args, run_cli
from useful_code.data_parallel import finish, main_process_first, map_across_ranks, process_state
from useful_code.evaluation import (
    EvalArguments,
    check_eval_arguments,
    load_benchmark,
    load_examples,
    prepare_examples,
    prepare_examples_v2,
    save_and_report,
)
from useful_code.modeling import load_for_scoring, load_reward_model
from useful_code.reward_bench import score_examples, score_examples_v2
from useful_code.scoring import once_each, score_pairs, score_sequences, split_by_sizes
from useful_code.templates import encode_conversations, special_token_pattern, tokenize_pairs, truncate_all


@dataclass
class ScriptArguments(EvalArguments):
    """The shared RewardBench eval flags (EvalArguments), with a BT reward model by default."""

    reward_name_or_path: Optional[str] = field(
        default="sfairXC/FsfairX-LLaMA3-RM-v0.1", metadata={"help": "Reward model: hub name or checkpoint directory."}
    )


def tokenized_pairs(examples, flag: str, args, tokenizer):
    """Validated v1 examples, tokenized (cut from the left, counted)."""
    dataset, stats = examples
    # A pair whose responses template to the same tokens stays: reward-bench scores it (a tie, counted wrong).
    dataset, token_stats = tokenize_pairs(dataset, tokenizer, args.max_length, "truncate", flag.lstrip("-"),
                                          args.skip_invalid, keep_same_tokens=True)
    return dataset, {**stats, **token_stats}


def check_gating(model, tokenizer, sequences: list[list[int]], names: list[str], max_length: int) -> None:
    """An exported ArmoRM reads the prompt at its gating pattern: a sequence without it (its user turn cut off by
    --max_length) is one line naming the example, where the model's forward would fail its whole batch."""
    pattern = getattr(model.config, "gating_pattern", None)
    if pattern:
        check_gating_sequences(tokenizer, sequences, pattern, names.__getitem__, max_length,
                               [len(ids) >= max_length for ids in sequences])


def completion_scores(model, tokenizer, examples, args, state) -> tuple[list[list[float]], int]:
    """v2: the reward of every completion of every prompt (each scored once, length-sorted batches split across
    the ranks), grouped by prompt; and how many sequences were cut to max_length."""
    conversations = [context + [{"role": "assistant", "content": response}]
                     for context, responses in zip(examples["context"], examples["responses"])
                     for response in responses]
    sequences, cut = truncate_all(tokenizer, encode_conversations(tokenizer, conversations), args.max_length)
    check_gating(model, tokenizer, sequences, [f"example {i} completion {j}" for i, responses in
                                               zip(examples["id"], examples["responses"]) for j in range(len(responses))],
                 args.max_length)
    score = partial(score_sequences, model, tokenizer, batch_size=args.batch_size, progress=state.is_main_process,
                    max_tokens_per_batch=args.max_tokens_per_batch)
    flat = once_each(partial(map_across_ranks, state, score), sequences)  # a repeated completion: one score
    return split_by_sizes(flat, [len(r) for r in examples["responses"]]), cut


def main():
    args = parse_args((ScriptArguments,))[0]
    state = process_state()
    check_eval_arguments(args, state)  # output paths and flag combinations, before any scoring
    model, tokenizer = load_for_scoring(load_reward_model, args.reward_name_or_path, "--reward_name_or_path",
                                        args.bf16, args.attn_implementation, args.trust_remote_code,
                                        device=state.device, device_map=args.device_map,
                                        pickled_weights=args.load_pickled_weights)
    with main_process_first(state):  # one rank fills the datasets cache, the others then read it
        benchmark, raw = load_benchmark(args)
        if benchmark == 2:
            examples, stats = prepare_examples_v2(raw, "--data_set_name", args.skip_invalid,
                                                  special_token_pattern(tokenizer))
        else:
            examples, stats = tokenized_pairs(prepare_examples(raw, args.data_set_name, "--data_set_name",
                                                               args.skip_invalid), "--data_set_name", args, tokenizer)
            prior = None
            if args.prior_sets_path:
                prior, stats["prior_sets"] = tokenized_pairs(
                    load_examples(args.prior_sets_path, None, "--prior_sets_path", args.skip_invalid),
                    "--prior_sets_path", args, tokenizer)

    if benchmark == 2:
        scores, stats["truncated"] = completion_scores(model, tokenizer, examples, args, state)
        if stats["truncated"] and state.is_main_process:  # said as the v1 path and the PM script say it
            print(f"[data_set_name] truncated {stats['truncated']} completions longer than max_length="
                  f"{args.max_length} tokens from the left")
        results = score_examples_v2(examples["id"], examples["subset"], scores, examples["num_correct"])
    else:
        for pairs in (examples, prior) if prior is not None else (examples,):
            check_gating(model, tokenizer, list(pairs["chosen_input_ids"]) + list(pairs["rejected_input_ids"]),
                         [f"example {i} ({side})" for side in ("chosen", "rejected") for i in pairs["id"]],
                         args.max_length)
        chosen, rejected = score_pairs(model, tokenizer, examples, args.batch_size, state.is_main_process, state,
                                       args.max_tokens_per_batch)
        prior_scores = None
        if prior is not None:
            prior_scores = (prior["id"], prior["subset"],
                            *score_pairs(model, tokenizer, prior, args.batch_size, state.is_main_process, state,
                                         args.max_tokens_per_batch))
        results = score_examples(examples["id"], examples["subset"], chosen, rejected, tie_credit=args.tie_credit,
                                 prior=prior_scores)
    if state.is_main_process:
        save_and_report(results, args, {**stats, "processes": state.num_processes}, model.dtype)
    finish(state)


if __name__ == "__main__":
    run_cli(main)
