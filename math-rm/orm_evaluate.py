"""Best-of-N evaluation of an outcome reward model (ORM) against majority voting and pass@1.

    python math-rm/orm_evaluate.py --reward_name_or_path RLHFlow/Llama3.1-8B-ORM-Mistral-Data \\
        --dataset RLHFlow/Mistral-MATH500-Test --output_dir Mistral-ORM-Mistral-MATH500 --num_n 1024 \\
        --model_type Mistral
    torchrun --nproc_per_node 8 math-rm/orm_evaluate.py ...     # data-parallel: one slice of the solutions per rank

Each candidate solution is one user turn (the problem and the whole answer, Mistral's step tags removed) answered
"+": its score is P(+) (softmax over the "+"/"-" logits) at that label. For N = 1, 2, 4, ... up to --num_n (or the most
candidates a problem has: said, and recorded as num_n_reached), the top-scored of a problem's first N candidates is
compared with the most common final answer among them (majority voting) and the first candidate (pass@1). Writes
<output_dir>/best_of_n.json (the curve, and upstream's one number as "accuracy": best-of-N at the largest N),
best_of_n.png and scores.jsonl; these replace upstream's {output_dir}_{num_n}.json and
{output_dir}_{num_n}_save_data.jsonl.
"""

import time
from dataclasses import dataclass, field

from useful_code.best_of_n import (
    BestOfNArguments,
    best_of_n_curve,
    candidate_coverage,
    format_curve,
    load_best_of_n_inputs,
    n_values,
    write_results,
)
from useful_code.output_files import check_output_dir
from useful_code.cli import parse_args, run_cli
from useful_code.data_parallel import finish, process_state
from useful_code.math_data import extract_final_answer, orm_conversation
from useful_code.scoring import split_by_sizes


@dataclass
class ScriptArguments(BestOfNArguments):
    """The best-of-N flags (upstream's and the project's), with upstream's ORM as the default model."""

    reward_name_or_path: str = field(default="RLHFlow/Llama3.1-8B-ORM-Mistral-Data",
                                     metadata={"help": "Hub name or checkpoint directory."})


def main():
    args = parse_args((ScriptArguments,))[0]
    state = process_state()
    check_output_dir(args.output_dir, "--output_dir", inputs=(args.dataset, args.reward_name_or_path))

    # Model and data: the problems, each with its first --num_n candidates as one turn.
    scorer, problems, answers, stats = load_best_of_n_inputs(args, state)
    conversations = [orm_conversation(prompt, answer, args.model_type)
                     for prompt, candidates in zip(problems["prompt"], answers) for answer in candidates]

    # Score: one label per solution, all solutions length-sorted in shared batches, split across the ranks.
    started = time.time()
    label_scores = split_by_sizes(scorer.score_conversations(conversations, progress=state.is_main_process,
                                                             name="--dataset"), [len(c) for c in answers])
    seconds = time.time() - started
    scores = [[s[0] for s in problem] for problem in label_scores]

    if state.is_main_process:
        labels = [row[: len(c)] for row, c in zip(problems["label"], answers)]
        finals = [[extract_final_answer(a) for a in candidates] for candidates in answers]
        coverage, coverage_notes = candidate_coverage(args.num_n, [len(c) for c in answers])
        curve = best_of_n_curve(scores, labels, finals, n_values(args.num_n, coverage["num_n_reached"]))
        summary = {"reward_name_or_path": args.reward_name_or_path, "dataset": args.dataset, "reward_type": "orm",
                   "model_type": args.model_type, **coverage, "problems": len(answers),
                   "solutions": len(conversations), "no_final_answer": sum(a is None for f in finals for a in f),
                   "truncated": scorer.truncated, "scoring_seconds": round(seconds, 3),
                   "processes": state.num_processes, "examples": stats}
        results = write_results(args.output_dir, curve, summary, problems, label_scores, scores,
                                f"ORM best-of-N, {len(answers)} problems")
        print(format_curve(curve))
        for note in coverage_notes:
            print(note)
        print(f"accuracy {results['accuracy']:.4f} (upstream's number: best-of-{curve[-1]['n']}, "
              "'accuracy' in best_of_n.json)")
        if scorer.truncated:
            print(f"{scorer.truncated} solutions longer than max_length={args.max_length} were cut from the left")
        print(f"Scored {len(conversations)} solutions in {seconds:.2f} s; results in {args.output_dir}/best_of_n.json, "
              "best_of_n.png, scores.jsonl")
    finish(state)


if __name__ == "__main__":
    run_cli(main)
