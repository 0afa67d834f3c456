"""Compare RewardBench results JSON files: scores side by side, the examples whose decisions differ, a bar chart.

    python useful_code/compare_results.py A.json B.json ... [--max_examples N] [--plot FILE.png]

Reads what useful_code/eval_reward_bench_bt.py and eval_reward_bench_pm.py write: RewardBench v1 ("benchmark": 1,
or no key in older files) or v2 ("benchmark": 2), never both at once. Every number shown is on a 0-100 scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from useful_code.cli import UserError, check_limits, limits_aware_parser, run_cli
from useful_code.output_files import check_output_file


@dataclass
class CompareArguments:
    """Flags of the comparison; the results JSON files are positional."""

    max_examples: int = field(default=20, metadata={"min": 0, "help": "Differing examples listed (all are counted)."})
    plot: Optional[str] = field(default=None, metadata={"help": "Write a grouped bar chart to this .png file."})


def parse_command_line(argv=None) -> tuple[CompareArguments, list[str]]:
    """The flags and the file list; a wrong flag or value is a UserError, as in every script of the project."""
    # cli.parse_args has no positionals: its parser (argparse errors raised as UserError) takes one added here.
    parser = limits_aware_parser((CompareArguments,), __doc__)
    parser.add_argument("files", nargs="*", metavar="RESULTS.json", help="Results JSON files, compared in this order.")
    args, extra, leftover = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    # argparse takes positionals from one place only: files after a flag come back here, still in order.
    unknown = [arg for arg in leftover if arg.startswith("-")]
    if unknown:
        raise UserError(f"unknown flag(s): {' '.join(unknown)} (see --help)")
    check_limits(args)
    files = extra.files + leftover
    if not files:
        raise UserError("give one or more results JSON files (two or more to see the differing examples)")
    return args, files


def load_results(path: str) -> dict:
    """A results JSON as a dict with "benchmark" (1 where older files have none) and "path" set."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for binary files
        raise UserError(f"{path} is not JSON ({str(err).splitlines()[0]})") from None
    if not (isinstance(results, dict) and isinstance(results.get("per_example"), list)
            and isinstance(results.get("subsets"), dict)):
        raise UserError(f"{path} is not a RewardBench results JSON (it needs per_example and subsets)")
    benchmark = results.get("benchmark", 1)
    if benchmark not in (1, 2):
        raise UserError(f"{path}: unknown benchmark {benchmark!r} (1 or 2)")
    return {**results, "benchmark": benchmark, "path": path}


def check_same_benchmark(runs: list[dict]) -> None:
    """Refuse to mix v1 and v2: their subsets, scales and scores mean different things."""
    if len({run["benchmark"] for run in runs}) > 1:
        named = ", ".join(f"{run['path']} (v{run['benchmark']})" for run in runs)
        raise UserError(f"cannot compare RewardBench v1 with v2 results: {named}")


def column_names(runs: list[dict]) -> list[str]:
    """Each file's model; the file stem where two files share a model, the path where two share a stem too."""
    models = [str(run.get("model") or Path(run["path"]).stem) for run in runs]
    stems = [Path(run["path"]).stem for run in runs]
    return [model if models.count(model) == 1 else stem if stems.count(stem) == 1 else run["path"]
            for run, model, stem in zip(runs, models, stems)]


def _union(mappings) -> list[str]:
    return list(dict.fromkeys(key for mapping in mappings for key in (mapping or {})))


def table_rows(runs: list[dict]) -> list:
    """(label, one value per file or None) rows: subsets, then v1's sections, then the scores; None is a rule."""
    scale = 100 if runs[0]["benchmark"] == 1 else 1  # v1 stores subset accuracies on 0-1, everything else on 0-100
    rows = [(s, [None if run["subsets"].get(s) is None else scale * run["subsets"][s] for run in runs])
            for s in _union(run["subsets"] for run in runs)]
    rows.append(None)
    if runs[0]["benchmark"] == 1:
        rows += [(s, [(run.get("sections") or {}).get(s) for run in runs])
                 for s in _union(run.get("sections") for run in runs)] + [None]
    rows.append(("Score", [run.get("score") for run in runs]))
    if any("prior_sets" in run for run in runs):
        rows.append(("Prior Sets", [(run.get("prior_sets") or {}).get("score") for run in runs]))
    if any("leaderboard_score" in run for run in runs):
        rows.append(("Leaderboard Score", [run.get("leaderboard_score") for run in runs]))
    return rows


def format_table(names: list[str], rows: list) -> str:
    """The rows as text: one column per file, two decimals, "absent" for a missing value."""
    label_width = max([7] + [len(row[0]) for row in rows if row]) + 2
    widths = [max(len(name), 7) + 2 for name in names]
    lines = [" " * label_width + "".join(f"{name:>{w}}" for name, w in zip(names, widths))]
    for row in rows:
        if row is None:
            lines.append("-" * (label_width + sum(widths)))
            continue
        cells = ("absent" if v is None else f"{v:.2f}" for v in row[1])
        lines.append(f"{row[0]:<{label_width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def decisions(run: dict) -> dict:
    """id -> (subset, decision, shown text). v1 decides by `correct` (tie credit included); v2 by the index of the
    highest score, the first one on ties."""
    out = {}
    for i, ex in enumerate(run["per_example"]):
        try:
            if run["benchmark"] == 1:
                decision = float(ex["correct"])
                shown = f"correct={decision:g} (chosen {ex['chosen_reward']:.3f}, rejected {ex['rejected_reward']:.3f})"
            else:
                decision = max(range(len(ex["scores"])), key=ex["scores"].__getitem__)
                credit = "n/a" if ex.get("credit") is None else f"{ex['credit']:g}"
                shown = f"argmax={decision} credit={credit} scores=[{', '.join(f'{s:.3f}' for s in ex['scores'])}]"
            out[ex["id"]] = (ex.get("subset"), decision, shown)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{run['path']}: per_example[{i}] is not a v{run['benchmark']} example ({err!r})") from None
    return out


def format_differences(first: dict, second: dict, names: list[str], max_examples: int) -> str:
    """The examples of both files whose decisions differ (count, then up to max_examples lines), and a line
    counting the ids found in only one of them."""
    a, b = decisions(first), decisions(second)
    shared = [i for i in a if i in b]
    differ = [i for i in shared if a[i][1] != b[i][1]]
    lines = [f"Decisions differ on {len(differ)} of {len(shared)} examples in both {names[0]} and {names[1]}"
             + (":" if differ else ".")]
    for i in differ[:max_examples]:
        lines.append(f"  id {i} [{a[i][0]}]  {names[0]}: {a[i][2]}  |  {names[1]}: {b[i][2]}")
    if len(differ) > max_examples:
        lines.append(f"  ... and {len(differ) - max_examples} more (--max_examples)")
    only_a, only_b = [i for i in a if i not in b], [i for i in b if i not in a]
    if only_a or only_b:
        lines.append(f"Ids in one file only: {len(only_a)} only in {names[0]}, {len(only_b)} only in {names[1]} "
                     f"(first: {', '.join(map(str, (only_a[:5] + only_b[:5])))})")
    return "\n".join(lines)


def write_plot(runs: list[dict], names: list[str], path: str) -> None:
    """Grouped bar chart: sections (v1) or subsets (v2) along x, one bar per file, 0-100. Saved beside path
    first and moved into place, so an interrupted run leaves no truncated image."""
    from useful_code.training_plots import pyplot, save_figure

    plt = pyplot()

    key = "sections" if runs[0]["benchmark"] == 1 else "subsets"
    groups = _union(run.get(key) for run in runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * (1 + 0.3 * len(runs))), 4.5))
    for n, (run, name) in enumerate(zip(runs, names)):
        values = [(run.get(key) or {}).get(g) for g in groups]
        bars = ax.bar([x - 0.4 + (n + 0.5) * width for x in range(len(groups))],
                      [0.0 if v is None else v for v in values], width, label=name)
        # Labels tell an absent value from a 0 score, which both draw no bar.
        ax.bar_label(bars, ["n/a" if v is None else f"{v:.1f}" for v in values], fontsize=7,
                     rotation=90 if len(runs) > 3 else 0)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (0-100)")
    # Below the axes: inside, it would hide bars near 100.
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(runs), 3))
    save_figure(fig, path)


def check_plot(path: str, files: list[str]) -> None:
    """Before any work: --plot must be a writable .png path that is no input."""
    check_output_file(path, "--plot", inputs=tuple(files))
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"--plot: {path} must end in .png (the chart is written as PNG)")


def main(argv=None) -> None:
    args, files = parse_command_line(argv)
    if args.plot:
        check_plot(args.plot, files)
    runs = [load_results(path) for path in files]
    check_same_benchmark(runs)
    names = column_names(runs)
    print(f"RewardBench v{runs[0]['benchmark']}, {len(runs)} file(s)")
    print(format_table(names, table_rows(runs)))
    print()
    if len(runs) < 2:
        print("One file: no decisions to compare (give two files to list the differing examples).")
    else:
        print(format_differences(runs[0], runs[1], names, args.max_examples))
    if args.plot:
        write_plot(runs, names, args.plot)
        print(f"Plot: {args.plot}")


if __name__ == "__main__":
    run_cli(main)
