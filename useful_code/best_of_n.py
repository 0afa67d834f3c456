"""Best-of-N evaluation of math reward models (math-rm/prm_evaluate.py, orm_evaluate.py): step-score aggregation, the
best-of-N / majority-voting / pass@1 arithmetic, its JSON and plot, and the scripts' shared flags and inputs."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from useful_code.cli import UserError
from useful_code.data import load_split
from useful_code.data_parallel import main_process_first
from useful_code.math_data import (MISTRAL_TAG, STEP_SEPARATORS, TOY_BEST_OF_N, extract_final_answer,
                                   validate_eval_rows)
from useful_code.math_scoring import StepScorer
from useful_code.output_files import atomic_write_text

AGGREGATIONS = ("min", "mean", "last", "prod")




def aggregate(step_scores: list[float], how: str) -> float:
    """One score for a solution from its steps' P(+): the weakest step (min, Math-Shepherd's choice), the mean
    (upstream's), the last step's, or the product (the chance that every step is right). Steps whose score is NaN
    (cut off by truncation) are left out."""
    values = [s for s in step_scores if not math.isnan(s)]
    if how not in AGGREGATIONS:
        raise UserError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}, not '{how}'")
    if not values:
        return math.nan
    if how == "min":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    if how == "last":
        return values[-1]
    return math.prod(values)


def n_values(num_n: int, most: int) -> list[int]:
    """N = 1, 2, 4, ... up to min(num_n, most), that limit included."""
    limit = min(num_n, most)
    ns = [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]
    return ns + ([limit] if ns[-1] != limit else [])


def candidate_coverage(num_n: int, counts: list[int]) -> tuple[dict, list[str]]:
    """What --num_n reached, from each problem's number of candidates (its first --num_n): the summary's keys
    (num_n as asked, num_n_reached: the curve's largest N, the fewest and most candidates of a problem, and how many
    problems have fewer than num_n_reached, whose best-of-N at a larger N uses all their candidates) and the notes
    to print when the curve stops short of --num_n or the problems' counts differ."""
    reached, fewest = min(num_n, max(counts)), min(counts)
    short = sum(c < reached for c in counts)
    summary = {"num_n": num_n, "num_n_reached": reached, "candidates_min": fewest, "candidates_max": max(counts),
               "problems_with_fewer_candidates": short}
    notes = []
    if reached < num_n:
        notes.append(f"--num_n {num_n}: the problems have at most {reached} candidates; the curve stops at N={reached}")
    if short:
        notes.append(f"{short} of {len(counts)} problems have fewer than {reached} candidates (fewest: {fewest}); at "
                     f"an N above a problem's count, its best-of-N, majority and oracle use all its candidates")
    return summary, notes


def best_pick(scores: list[float]) -> int:
    """The index of the highest score, the first on a tie (upstream's list.index(max)); NaN never wins."""
    values = [-math.inf if math.isnan(s) else s for s in scores]
    return values.index(max(values))


def majority_pick(final_answers: list[Optional[str]]) -> Optional[int]:
    """The first candidate whose final answer is the most common (a tie goes to the answer seen first); None when no
    candidate states one."""
    counts = Counter(a for a in final_answers if a is not None)
    if not counts:
        return None
    most = max(counts.values())
    return next(i for i, a in enumerate(final_answers) if a is not None and counts[a] == most)


def best_of_n_curve(scores: list[list[float]], labels: list[list[int]], final_answers: list[list[Optional[str]]],
                    ns: list[int]) -> list[dict]:
    """For each N, over the problems: accuracy of the top-scored of the first N candidates (best_of_n), of the most
    common final answer among them (majority; a problem where none states an answer counts as wrong), of the first
    candidate (pass_at_1), and whether any of them is right (oracle, the ceiling)."""
    curve = []
    for n in ns:
        best, majority, first, oracle = [], [], [], []
        for s, y, a in zip(scores, labels, final_answers):
            best.append(y[best_pick(s[:n])])
            pick = majority_pick(a[:n])
            majority.append(0 if pick is None else y[pick])
            first.append(y[0])
            oracle.append(int(any(y[:n])))
        curve.append({"n": n, "best_of_n": float(np.mean(best)), "majority": float(np.mean(majority)),
                      "pass_at_1": float(np.mean(first)), "oracle": float(np.mean(oracle))})
    return curve


def upstream_accuracy(scores: list[list[float]], labels: list[list[int]]) -> float:
    """Upstream's one number ("accuracy" in its {output_dir}_{num_n}.json): over the problems, whether the top-scored
    of each problem's candidates (all it was given: the first --num_n) is right, the first on a tie. It is the
    best-of-N accuracy at the largest N, whatever the problems' candidate counts."""
    return float(np.mean([y[best_pick(s)] == 1 for s, y in zip(scores, labels)]))


def format_curve(curve: list[dict]) -> str:
    """The curve as a small table."""
    lines = [f"{'N':>5} {'best-of-N':>10} {'majority':>9} {'pass@1':>7} {'oracle':>7}"]
    lines += [f"{p['n']:>5} {p['best_of_n']:>10.4f} {p['majority']:>9.4f} {p['pass_at_1']:>7.4f} {p['oracle']:>7.4f}"
              for p in curve]
    return "\n".join(lines)


def plot_curve(curve: list[dict], path, title: str) -> str:
    """Accuracy against N (log2 axis): best-of-N, majority voting and pass@1."""
    from useful_code.training_plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [p["n"] for p in curve]
    for key, label, style in (("best_of_n", "best-of-N (reward model)", "o-"), ("majority", "majority voting", "s--"),
                              ("pass_at_1", "pass@1", ":")):
        ax.plot(ns, [p[key] for p in curve], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return save_figure(fig, path)


# ============================================================================ the evaluation scripts' flags and outputs


@dataclass
class BestOfNArguments:
    """Flags of prm_evaluate.py and orm_evaluate.py: upstream's (reward_name_or_path, dataset, output_dir, num_n,
    model_type) plus the split, batching, truncation and loading options of the project's eval scripts."""

    reward_name_or_path: str = field(default="RLHFlow/Llama3.1-8B-PRM-Mistral-Data",
                                     metadata={"help": "Hub name or checkpoint directory."})
    dataset: str = field(default=TOY_BEST_OF_N, metadata={
        "help": "Best-of-N problems (prompt, answers, label): hub name (e.g. RLHFlow/Mistral-GSM8K-Test) or local "
                "file/directory. Default: the bundled toy set."})
    split: str = field(default="test", metadata={"help": "Dataset split (a single local file is its own split)."})
    output_dir: str = field(default="outputs/math_best_of_n", metadata={
        "help": "Directory for best_of_n.json, best_of_n.png and scores.jsonl."})
    num_n: int = field(default=1024, metadata={"min": 1, "help": "Largest N: candidates used per problem."})
    model_type: str = field(default="Mistral", metadata={
        "choices": tuple(STEP_SEPARATORS), "help": "Step format of the answers: Mistral (steps end in 'ки') or "
                                                   "Deepseek (steps separated by a blank line)."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Solutions per forward pass (length-sorted)."})
    max_length: int = field(default=4096, metadata={"min": 8, "help": "Longer inputs are cut from the left "
                                                                      "(counted; steps cut off are not scored)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid problems (counted) instead of failing."})
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})


def _or_null(score: float) -> Optional[float]:
    return None if math.isnan(score) else score


def write_results(output_dir, curve: list[dict], summary: dict, problems, step_scores: list[list[list[float]]],
                  scores: list[list[float]], title: str) -> dict:
    """best_of_n.json (the run's summary, upstream's "accuracy" and the curve), best_of_n.png and scores.jsonl (each
    problem with its candidates' scores, step scores where a PRM gave them, and final answers). Returns the JSON's
    content."""
    out = Path(output_dir)
    accuracy = upstream_accuracy(scores, [row["label"][: len(s)] for row, s in zip(problems, scores)])
    results = {**summary, "accuracy": accuracy, "curve": curve}
    atomic_write_text(out / "best_of_n.json", json.dumps(results, indent=2) + "\n")
    plot_curve(curve, out / "best_of_n.png", title)
    lines = []
    for row, steps, solution_scores in zip(problems, step_scores, scores):
        n = len(solution_scores)
        # null, not NaN, for a step --max_length cut off (and a solution with no step left): strict JSON
        lines.append(json.dumps({"prompt": row["prompt"], "label": row["label"][:n],
                                 "scores": [_or_null(x) for x in solution_scores],
                                 "step_scores": [[_or_null(x) for x in solution] for solution in steps],
                                 "final_answers": [extract_final_answer(a) for a in row["answers"][:n]]},
                                allow_nan=False))
    atomic_write_text(out / "scores.jsonl", "\n".join(lines) + "\n")
    return results


def load_best_of_n_inputs(args: "BestOfNArguments", state):
    """What both best-of-N scripts start from: the scorer on this rank's device (its sequences split across the
    ranks of state) and the validated problems with their first --num_n candidates. Returns (scorer, problems,
    candidates per problem, stats)."""
    scorer = StepScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, pickled_weights=args.load_pickled_weights, device=state.device,
        batch_size=args.batch_size, max_length=args.max_length, state=state)
    with main_process_first(state):  # one rank fills the datasets cache, the others then read it
        problems, stats = validate_eval_rows(load_split(args.dataset, args.split, "--dataset", args.skip_invalid),
                                             scorer.tokenizer, args.skip_invalid, "--dataset")
    candidates = [row[: args.num_n] for row in problems["answers"]]
    check_step_format(candidates, args.model_type)
    return scorer, problems, candidates, stats


def check_step_format(candidates: list[list[str]], model_type: str) -> None:
    """The answers must be in --model_type's step format, or every solution would be read as one step: Mistral's
    answers end their steps with its tag, Deepseek's do not carry it."""
    tag = MISTRAL_TAG
    answers = [answer for problem in candidates for answer in problem]
    tagged = sum(bool(STEP_SEPARATORS["Mistral"].search(answer)) for answer in answers)
    if model_type == "Mistral" and not tagged:
        raise UserError(f"--model_type Mistral: none of the {len(answers)} answers holds its step tag {tag!r}; "
                        "answers whose steps are separated by blank lines need --model_type Deepseek")
    if model_type == "Deepseek" and tagged == len(answers):
        raise UserError(f"--model_type Deepseek: every answer holds Mistral's step tag {tag!r}, so each would be read "
                        "as one step; pass --model_type Mistral")
