"""Best-of-N evaluation of a process reward model (PRM) against majority voting and pass@1.

    python math-rm/prm_evaluate.py --reward_name_or_path RLHFlow/Llama3.1-8B-PRM-Mistral-Data \\
        --dataset RLHFlow/Mistral-MATH500-Test --output_dir Mistral-PRM-Mistral-MATH500 --num_n 1024 \\
        --model_type Mistral
    torchrun --nproc_per_node 8 math-rm/prm_evaluate.py ...     # data-parallel: one slice of the solutions per rank

Each candidate solution is cut into steps (--model_type) and scored by ONE forward: P(+) (softmax over the "+"/"-"
logits) at every step's label position; --aggregation turns the step scores into the solution's score. For N = 1, 2,
4, ... up to --num_n (or the most candidates a problem has: said, and recorded as num_n_reached), the top-scored of a
problem's first N candidates is compared with the most common final answer among them (majority voting) and the first
candidate (pass@1). Writes <output_dir>/best_of_n.json (the curve, and upstream's one number as "accuracy": best-of-N
at the largest N), best_of_n.png and scores.jsonl (every candidate's step scores); these replace upstream's
{output_dir}_{num_n}.json and {output_dir}_{num_n}_save_data.jsonl.
"""

import time
from dataclasses import dataclass, field

from useful_code.best_of_n import (
    AGGREGATIONS,
    BestOfNArguments,
    aggregate,
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
from useful_code.math_data import extract_final_answer, prm_conversation, split_steps
from useful_code.scoring import split_by_sizes


@dataclass
class ScriptArguments(BestOfNArguments):
    """The best-of-N flags (upstream's and the project's) plus how step scores make a solution's score."""

    aggregation: str = field(default="min", metadata={
        "choices": AGGREGATIONS, "help": "Solution score from its steps' P(+): min (the weakest step, Math-Shepherd's "
                                         "choice), mean (upstream's), last or prod."})


def main():
    args = parse_args((ScriptArguments,))[0]
    state = process_state()
    check_output_dir(args.output_dir, "--output_dir", inputs=(args.dataset, args.reward_name_or_path))

    # Model and data: the problems, each with its first --num_n candidates cut into steps.
    scorer, problems, answers, stats = load_best_of_n_inputs(args, state)
    conversations = [prm_conversation(prompt, split_steps(answer, args.model_type))
                     for prompt, candidates in zip(problems["prompt"], answers) for answer in candidates]

    # Score: one forward per solution, all solutions length-sorted in shared batches, split across the ranks.
    started = time.time()
    step_scores = split_by_sizes(scorer.score_conversations(conversations, progress=state.is_main_process,
                                                            name="--dataset"), [len(c) for c in answers])
    seconds = time.time() - started
    scores = [[aggregate(steps, args.aggregation) for steps in problem] for problem in step_scores]

    if state.is_main_process:
        labels = [row[: len(c)] for row, c in zip(problems["label"], answers)]
        finals = [[extract_final_answer(a) for a in candidates] for candidates in answers]
        coverage, coverage_notes = candidate_coverage(args.num_n, [len(c) for c in answers])
        curve = best_of_n_curve(scores, labels, finals, n_values(args.num_n, coverage["num_n_reached"]))
        summary = {"reward_name_or_path": args.reward_name_or_path, "dataset": args.dataset, "reward_type": "prm",
                   "aggregation": args.aggregation, "model_type": args.model_type, **coverage,
                   "problems": len(answers), "solutions": len(conversations),
                   "steps": sum(len(s) for problem in step_scores for s in problem),
                   "no_final_answer": sum(a is None for f in finals for a in f), "truncated": scorer.truncated,
                   "scoring_seconds": round(seconds, 3), "processes": state.num_processes, "examples": stats}
        results = write_results(args.output_dir, curve, summary, problems, step_scores, scores,
                                f"PRM best-of-N ({args.aggregation} of step P(+)), {len(answers)} problems")
        print(format_curve(curve))
        for note in coverage_notes:
            print(note)
        # upstream's number is best-of-num_n, with the steps' mean: under another aggregation the same name differs
        same = "upstream's number" if args.aggregation == "mean" else \
            f"upstream's measure with the {args.aggregation} of the step scores, where upstream took the mean"
        print(f"accuracy {results['accuracy']:.4f} ({same}: best-of-{curve[-1]['n']}, 'accuracy' in best_of_n.json)")
        if scorer.truncated:
            print(f"{scorer.truncated} solutions longer than max_length={args.max_length} were cut from the left; "
                  "their first steps are not scored")
        print(f"Scored {len(conversations)} solutions ({summary['steps']} steps) in {seconds:.2f} s; results in "
              f"{args.output_dir}/best_of_n.json, best_of_n.png, scores.jsonl")
    finish(state)


if __name__ == "__main__":
    run_cli(main)
