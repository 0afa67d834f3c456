"""Pick the best of n responses per prompt with a preference model and a knock-out tournament.

    python pair-pm/rank_responses.py --reward_name_or_path DIR --input_path prompts.jsonl --output_path best.jsonl

Each input line is a JSON object with "prompt" (a string, or a message list) or "context" (a message list ending with
the user's turn; also read from score_dataset.py's context_messages, messages or conversations), and "responses" (a
non-empty list of non-empty strings). Every line is checked before the model loads, with its tokenizer (the rules of
useful_code/score_dataset.py's rows); a bad line stops the run naming its number and rule.
A tournament takes n - 1 comparisons, each scored in both orders (upstream's recommendation for n > 2: linear in n,
where ranking every pair is quadratic). The matches of a round, across all prompts, share batched forward passes;
under torchrun, accelerate launch or deepspeed each rank scores a slice of every round's sequences, and the first
rank writes the output:

    torchrun --nproc_per_node 8 pair-pm/rank_responses.py --reward_name_or_path DIR --input_path prompts.jsonl

Each output line is the input plus "best_index", "best_response" and "matches" ([first, second, P(first
preferred)] per comparison).

From Python: PairPreferenceScorer.from_pretrained(DIR).knockout(context_messages, responses).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from useful_code.output_files import atomic_write_text, check_output_file
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data_parallel import finish, process_state
from useful_code.pm_scoring import PairPreferenceScorer
from useful_code.score_dataset import CONTEXT_COLUMNS, RESPONSE_RULES, ROW_RULES, parse_row, response_problems
from useful_code.scoring import token_budget_field
from useful_code.templates import load_tokenizer, special_token_pattern

# score_dataset's row rules, with this script's name for the message-list context.
LINE_RULES = {**ROW_RULES, "empty_response": RESPONSE_RULES["empty_response"],
              "bad_prompt": "needs 'prompt' (a non-empty string or a message list) or 'context' (a message list "
                            "ending with the user's turn; or context_messages, messages or conversations)"}


@dataclass
class ScriptArguments:
    """The preference model, the prompts with their candidates, and where the winners go."""

    reward_name_or_path: str = field(metadata={"help": "Preference model: hub name or checkpoint directory."})
    input_path: str = field(metadata={"help": "JSON lines: {'prompt' or 'context', 'responses': [...]} per line."})
    output_path: str = field(default="./ranked.jsonl")
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Sequences per padded forward (length-sorted)."})
    max_tokens_per_batch: int = token_budget_field()
    max_length: int = field(default=4096,
                            metadata={"min": 1, "help": "Longer prompts are cut from the left (counted)."})
    bf16: bool = field(default=True)
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False)
    load_pickled_weights: bool = field(default=False, metadata={
        "help": "Read a checkpoint that has only pickled weights (.bin) with torch's weights-only loader."})
    local_rank: int = field(default=-1, metadata={"help": "Passed by the deepspeed launcher; the rank comes from it."})


def parse_line(row, number: int, special_tokens=None) -> tuple[list[dict], list[str]]:
    """(context messages, responses) of one input line (1-based number), or a UserError naming it and its rule."""
    if not isinstance(row, dict):
        raise UserError(f"--input_path line {number}: not a JSON object ({type(row).__name__})")
    fields = {c: row.get(c) for c in (*CONTEXT_COLUMNS, "prompt", "responses")}
    if row.get("context") is not None:  # this script's name for score_dataset's context_messages
        fields["context_messages"] = row["context"]
    context, responses, reason = parse_row(fields, special_tokens)
    if reason:
        raise UserError(f"--input_path line {number}: {reason}: {LINE_RULES[reason]}")
    for index, rule in response_problems(context, responses):  # a tournament needs every response scorable
        raise UserError(f"--input_path line {number} response {index}: {rule}: {LINE_RULES[rule]}")
    return context, responses


def read_prompts(path: str, special_tokens=None) -> tuple[list[list[dict]], list[list[str]], list[dict], list[int]]:
    """Contexts, candidate lists, the raw rows and their line numbers of a JSON-lines file; a malformed line is an
    error naming it (special_tokens: the tokenizer's special_token_pattern, refused in any text)."""
    contexts, candidates, rows, numbers = [], [], [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"--input_path: cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"--input_path: {path} is not UTF-8 text (byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--input_path line {number}: not JSON ({err.msg})") from None
        context, responses = parse_line(row, number, special_tokens)
        contexts.append(context)
        candidates.append(responses)
        rows.append(row)
        numbers.append(number)
    if not rows:
        raise UserError(f"--input_path: {path} holds no prompts")
    return contexts, candidates, rows, numbers


def write_winners(path: str, rows: list[dict], candidates: list[list[str]], results) -> None:
    """Each input row plus its tournament's winner and matches, one JSON line per prompt, written atomically."""
    lines = [{**row, "best_index": result.winner, "best_response": responses[result.winner],
              "matches": [[m.first, m.second, m.prob_first] for m in result.matches]}
             for row, responses, result in zip(rows, candidates, results)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def main():
    args = parse_args((ScriptArguments,))[0]
    state = process_state()
    check_output_file(args.output_path, "--output_path", inputs=(args.input_path, args.reward_name_or_path))
    # Checked with the tokenizer only, before the model loads: a bad line costs seconds, not minutes.
    tokenizer = load_tokenizer(args.reward_name_or_path, "--reward_name_or_path", args.trust_remote_code)
    contexts, candidates, rows, numbers = read_prompts(args.input_path, special_token_pattern(tokenizer))
    scorer = PairPreferenceScorer.from_pretrained(
        args.reward_name_or_path, bf16=args.bf16, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, pickled_weights=args.load_pickled_weights, device=state.device,
        batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
        max_length=args.max_length, state=state)
    results = scorer.knockout_many(contexts, candidates)  # every rank gets every result
    if state.is_main_process:
        write_winners(args.output_path, rows, candidates, results)
        n_matches = sum(len(r.matches) for r in results)
        print(f"Ranked {len(rows)} prompts with {n_matches} comparisons (each in both orders)"
              + (f"; {scorer.truncated} sequences cut to max_length" if scorer.truncated else ""))
        print(f"Winners: {args.output_path}")
    finish(state)


if __name__ == "__main__":
    run_cli(main)
