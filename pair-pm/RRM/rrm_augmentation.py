"""Robust reward model (RRM, arXiv 2409.13156) data augmentation: pairs across examples, in the PM format.

    python pair-pm/RRM/rrm_augmentation.py --input_dataset PAIRS --output_dataset data/pm_rrm.jsonl [--seed 42]

Each example i (context x_i, winner yw_i, loser yl_i) is matched with two other examples j and k, and gets upstream's
14 augmented examples, all with x_i's context:
  decisive (8): yw_i and yl_i each beat each of yw_j, yl_j, yw_k, yl_k (a response to another prompt is worse than
                any response to this one, whatever its length or style);
  "Same" (6):   every pair of those four responses ties (neither answers x_i).
The originals are written too (--include_original; upstream's script writes the augmented examples only; a "Same"
input stays a tie, as upstream keeps it neutral), and --include_same false leaves the ties out. pair-pm/train.py
trains on ties with the loss on the tokens of "Same"; scoring still compares "A" with "B".

Input: standard-format pairs in any format the project reads (useful_code/formats.py), or PM-format examples as
pair-pm/process_pair_data.py writes them (upstream's input). Output: PM-format examples, the assistant's answer "A",
"B" or upstream's "Same", in a .jsonl/.parquet file or a datasets directory. Deterministic with --seed: j and k come
from one seeded cycle through the examples (never i itself, never j == k), positions are balanced and seeded, and
the output is shuffled. An augmented example is dropped and counted when a borrowed response comes from an example
with the same context as x_i (it does answer x_i: its label is unknown) or when its two responses are the same text.
Invalid input rows stop the run with the row and the rule, or with --skip_invalid are dropped and counted.
"""

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from datasets import Dataset, DatasetDict

from useful_code.output_files import save_dataset
from useful_code.cli import UserError, looks_like_local_path, parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_PREFERENCE_DATA
from useful_code.formats import enforce_validity, standardize_pairs
from useful_code.pm_data import (
    LABELS,
    PM_INVALID_REASONS,
    PM_PROMPT_TEMPLATE,
    balanced_positions,
    check_dataset_output,
    format_context,
    pm_invalid_reason,
)

SAME = "Same"  # upstream's answer for a tie
PM_PROMPT = re.compile(r"\[CONTEXT\] (.*) \[RESPONSE A\] (.*) \[RESPONSE B\] (.*) \n", re.DOTALL)
MARKERS = ("[CONTEXT]", "[RESPONSE A]", "[RESPONSE B]")
PM_INPUT_RULES = {
    **PM_INVALID_REASONS,
    "unparseable_prompt": "the prompt must be '[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \\n' with each "
                          "marker once",
    "identical_responses": "responses A and B must differ",
}


@dataclass
class ScriptArguments:
    """Input pairs, output PM examples and the seed; the flag names are upstream's."""

    input_dataset: str = field(default=DEFAULT_PREFERENCE_DATA, metadata={
        "help": "Standard-format pairs (any format the project reads) or PM-format examples: a hub name, a dataset "
                "directory or a .json/.jsonl/.parquet file."})
    output_dataset: str = field(default="./data/pm_data_rrm", metadata={
        "help": "A .json/.jsonl/.parquet file, or a directory for datasets.save_to_disk."})
    split: str = field(default="train", metadata={"help": "Split read from the input."})
    seed: int = field(default=42, metadata={"help": "Seed for the matching of examples, positions and the shuffle."})
    include_original: bool = field(default=True, metadata={"help": "Write the original pairs too."})
    include_same: bool = field(default=True, metadata={
        "help": "Write the 'Same' (tie) examples; false for a trainer that reads only 'A'/'B' answers."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (counted) instead of failing."})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Also push the result to this hub repo id."})


def parse_pm_prompt(prompt: str) -> Optional[tuple[str, str, str]]:
    """(rendered context, response A, response B) of a PM prompt, or None when it does not follow the template."""
    if any(prompt.count(marker) != 1 for marker in MARKERS):
        return None  # a marker inside a response would make the split ambiguous
    match = PM_PROMPT.fullmatch(prompt)
    return match.groups() if match else None


def pm_to_triplet(messages) -> dict:
    """A PM example as {context, chosen, rejected, tie, invalid_reason}; the context stays rendered. A "Same" example
    is a tie (as upstream's `neutral`): its responses keep their order and it is never written as a win."""
    reason = pm_invalid_reason(messages)
    parsed = parse_pm_prompt(messages[0]["content"]) if not reason else None
    if not reason and parsed is None:
        reason = "unparseable_prompt"
    if reason:
        return {"context": "", "chosen": "", "rejected": "", "tie": False, "invalid_reason": reason}
    context, a, b = parsed
    chosen, rejected = (b, a) if messages[1]["content"] == LABELS[1] else (a, b)
    return {"context": context, "chosen": chosen, "rejected": rejected, "tie": messages[1]["content"] == SAME,
            "invalid_reason": "identical_responses" if a == b else ""}


def load_triplets(args) -> tuple[Dataset, dict]:
    """The input as {context (rendered as the PM reads it), chosen, rejected, tie} rows, validated, with counts."""
    raw = load_split(args.input_dataset, args.split, "--input_dataset", args.skip_invalid)
    if "messages" in raw.column_names and not {"chosen", "rejected"} <= set(raw.column_names):
        marked = raw.map(pm_to_triplet, input_columns="messages", remove_columns=raw.column_names,
                         desc="parsing PM examples")
        triplets, stats = enforce_validity(marked, PM_INPUT_RULES, args.skip_invalid, "input_dataset")
        return triplets, {"format": "pm", **stats}
    pairs, stats = standardize_pairs(raw, args.skip_invalid, "input_dataset")

    def render(chosen, rejected):
        return {"context": format_context(chosen[:-1]), "chosen": chosen[-1]["content"],
                "rejected": rejected[-1]["content"], "tie": False}

    triplets = pairs.map(render, input_columns=["chosen", "rejected"], remove_columns=pairs.column_names,
                         desc="rendering contexts")
    return triplets, stats


def partners(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """j and k for every example: the next two along one seeded cycle through all n examples, so each example lends
    its responses exactly twice (as upstream's two shuffles do) and never to itself."""
    if n < 3:
        raise UserError(f"--input_dataset: {n} valid pairs; RRM pairs each example with two others, so it needs at "
                        "least 3")
    order = np.random.default_rng(seed).permutation(n)
    j, k = np.empty(n, dtype=int), np.empty(n, dtype=int)
    j[order] = np.roll(order, -1)
    k[order] = np.roll(order, -2)
    return j, k


def augment(contexts: list[str], chosen: list[str], rejected: list[str], seed: int) -> tuple[list, list, Counter]:
    """Upstream's 14 augmented examples per example, as (context, winner, loser) for the decisive ones and
    (context, first, second) for the ties; examples that would be wrong are dropped and counted."""
    j_of, k_of = partners(len(contexts), seed)
    decisive, same, dropped = [], [], Counter()

    def keep(i: int, pair: tuple[tuple[str, int], tuple[str, int]], into: list) -> None:
        (first, source_1), (second, source_2) = pair
        borrowed = [s for s in (source_1, source_2) if s != i]
        if any(contexts[s] == contexts[i] for s in borrowed):
            dropped["same_prompt"] += 1  # another pair for the same prompt: its responses answer x_i
        elif first == second:
            dropped["identical_responses"] += 1
        else:
            into.append((contexts[i], first, second))

    for i, (j, k) in enumerate(zip(j_of, k_of)):
        own = [(chosen[i], i), (rejected[i], i)]
        others = [(chosen[j], j), (chosen[k], k), (rejected[j], j), (rejected[k], k)]  # upstream's order
        for winner in own:
            for loser in others:
                keep(i, (winner, loser), decisive)
        yw_j, yw_k, yl_j, yl_k = others
        for pair in ((yw_j, yl_j), (yw_k, yl_k), (yw_j, yw_k), (yw_j, yl_k), (yw_k, yl_j), (yl_j, yl_k)):
            keep(i, pair, same)
    return decisive, same, dropped


def pm_example(context: str, first: str, second: str, position: int, label: Optional[str] = None) -> dict:
    """A PM example from a rendered context: first goes to A when position is 0; the answer is first's position,
    or label (a tie) when given."""
    a, b = (first, second) if position == 0 else (second, first)
    prompt = PM_PROMPT_TEMPLATE.format(context=context, response_A=a, response_B=b)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": label or LABELS[position]}]}


def looks_like_hub_repo(name: str) -> bool:
    """Whether an output name reads as a hub repo id (owner/name: no file suffix, not a ./, ../, / or ~/ path)."""
    return (not looks_like_local_path(name) and name.count("/") == 1 and all(name.split("/"))
            and not name.endswith((".json", ".jsonl", ".parquet")))


def main(argv: Optional[list[str]] = None):
    args = parse_args((ScriptArguments,), argv=argv)[0]
    check_dataset_output(args.output_dataset, "--output_dataset", (args.input_dataset,))
    triplets, stats = load_triplets(args)
    contexts, chosen, rejected, ties = (list(triplets[c]) for c in ("context", "chosen", "rejected", "tie"))
    # A tie's two responses both answer its prompt, so they still beat the borrowed ones and tie with each other
    # when lent: only the original example itself must stay a tie.
    decisive, same, dropped = augment(contexts, chosen, rejected, args.seed)

    originals = list(zip(contexts, chosen, rejected)) if args.include_original else []
    tied_originals = [t for t, tie in zip(originals, ties) if tie]
    decided = [t for t, tie in zip(originals, ties) if not tie] + decisive
    same = tied_originals + same
    # Positions balanced separately, so each label's examples show the first response as often at A as at B.
    examples = [pm_example(*t, p) for t, p in zip(decided, balanced_positions(len(decided), args.seed))]
    if args.include_same:
        examples += [pm_example(*t, p, SAME) for t, p in zip(same, balanced_positions(len(same), args.seed + 1))]
    if not examples:
        raise UserError("nothing to write: every augmented example was dropped and no original is written "
                        "(--include_original false, or only ties with --include_same false)")
    # Shuffled here, not with Dataset.shuffle: flattening its index mapping takes seconds per ten thousand rows.
    output = Dataset.from_list([examples[i] for i in np.random.default_rng(args.seed).permutation(len(examples))])
    save_dataset(output, args.output_dataset, "--output_dataset")

    labels = Counter(m[1]["content"] for m in output["messages"])
    invalid = ", ".join(f"{r}: {n}" for r, n in stats["invalid"].items()) or "none"
    print(f"{args.input_dataset} ({stats['format']}): {stats['read']} read, {stats['read'] - stats['used']} invalid "
          f"dropped ({invalid})\n"
          f"  original: {len(originals)}{'' if args.include_original else ' (--include_original false)'}"
          f"{f' (of which {SAME} ties: {len(tied_originals)})' if tied_originals else ''}, "
          f"decisive augmented: {len(decisive)}, 'Same' augmented: {len(same) - len(tied_originals)}"
          f"{'' if args.include_same else ' (not written: --include_same false)'}, augmented dropped: "
          f"{sum(dropped.values())} (same prompt: {dropped['same_prompt']}, identical responses: "
          f"{dropped['identical_responses']})\n"
          f"Wrote {len(output)} PM examples to {args.output_dataset} "
          f"(A: {labels['A']}, B: {labels['B']}, {SAME}: {labels[SAME]})")
    if args.push_to_hub:
        DatasetDict({"train": output}).push_to_hub(args.push_to_hub)
        print(f"Pushed to the hub: {args.push_to_hub}")
    elif looks_like_hub_repo(args.output_dataset):
        print(f"note: nothing was pushed: upstream's --output_dataset was a hub repo it pushed to; here it is where "
              f"the dataset is written. Pass --push_to_hub {args.output_dataset} to push it too")


if __name__ == "__main__":
    run_cli(main)
