"""Benchmark: Bradley-Terry reward-model training, TRL's RewardTrainer against this project's trainer padded,
padding-free, and padding-free with prefix sharing, on real HH-RLHF pairs. Every contestant gets the same initial
weights, the same train/held-out files, the same token ids, hyper-parameters and seed. Prints pairs/s, real
(non-pad) tokens/s, the padding fraction, peak memory, held-out accuracy, and each one's speed and memory next to
TRL's.

    python benchmarks/bench_bt_training.py [--model tiny|30m|1b] [--pairs 400] [--held_out 100] [--max_length 1024]
        [--batch_size 8] [--repeats 1] [--json results.json]
    # on a GPU: bf16, a ~1B Llama, and MFU against the chip's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s)
    python benchmarks/bench_bt_training.py --model 1b --bf16 true --peak_tflops 989 [--attn_implementation sdpa]

Each run is its own process with OMP_NUM_THREADS=1 (two threads per process made step times swing 2x on a shared
2-core machine), one at a time, the contestants round-robin within each repeat so that a slow spell of the machine
hits them alike. Peak memory is each process's own maximum RSS (os.wait4). Speed is measured by the same clock for
all: the Trainer's train_runtime (the training loop alone, not start-up or evaluation).
"""

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from hh_pairs import HHBenchArguments, build_bench_model, run_child
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_MODEL, REPO_ROOT
from useful_code.formats import standardize_pairs
from useful_code.templates import load_tokenizer, tokenize_pairs

TRAIN_SCRIPT = str(REPO_ROOT / "bradley-terry-rm" / "train.py")
TRL_RUNNER = str(Path(__file__).resolve().parent / "trl_reward_runner.py")
# name -> (label, extra flags); "trl" runs TRL_RUNNER, the others bradley-terry-rm/train.py.
CONTESTANTS = {
    "trl": ("TRL RewardTrainer", []),
    "padded": ("ours, padded", ["--padding_free", "false"]),
    "padding_free": ("ours, padding-free", ["--padding_free", "true", "--prefix_sharing", "false"]),
    "prefix_sharing": ("ours, padding-free + prefix", ["--padding_free", "true", "--prefix_sharing", "true"]),
}


@dataclass
class BenchArguments(HHBenchArguments):
    model: str = field(default="tiny", metadata={
        "choices": ("tiny", "30m", "1b"), "help": "tiny: assets/tiny-llama with a new score head; 30m / 1b: a "
                                                  "random-init ~30M / ~1B-parameter Llama on the tiny tokenizer."})
    bf16: bool = field(default=False, metadata={"help": "bf16 training for every contestant (a GPU's setting)."})
    attn_implementation: str = field(default="sdpa", metadata={
        "choices": ("sdpa", "eager", "flash_attention_2"), "help": "For every contestant. With flash_attention_2 "
        "the prefix-sharing contestant trains plain padding-free (trees need sdpa or eager)."})
    peak_tflops: float = field(default=0.0, metadata={
        "min": 0, "help": "The device's peak TFLOP/s at the training dtype: MFU is printed when given."})
    pairs: int = field(default=400, metadata={"min": 1, "help": "Training pairs."})
    held_out: int = field(default=100, metadata={"min": 1, "help": "Held-out pairs (accuracy after training)."})
    max_length: int = field(default=1024, metadata={"min": 1, "help": "Longer pairs are cut from the left."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Pairs per training (and evaluation) batch."})
    epochs: float = field(default=1.0, metadata={"min": 0})
    max_steps: int = field(default=-1, metadata={"help": "Train this many steps instead of --epochs (> 0)."})
    learning_rate: float = field(default=1e-4, metadata={"min": 0})
    seed: int = field(default=42)
    group_by_length: bool = field(default=True, metadata={"help": "Length-grouped batches, for every contestant."})
    repeats: int = field(default=1, metadata={"min": 1, "help": "Rounds over all contestants; medians are shown."})
    timeout: float = field(default=1800, metadata={"min": 1, "help": "Seconds each run may take before it is killed."})
    json: Optional[str] = field(default=None, metadata={"help": "Also write the results here."})
    work_dir: Optional[str] = field(default=None, metadata={
        "help": "Keep the model, data, logs and outputs here (default: a temporary directory, removed)."})


def prepare_data(args: BenchArguments, tokenizer, work: Path) -> dict:
    """Write the train and held-out pairs once, as messages (train.jsonl, held_out.jsonl: the BT trainer tokenizes
    them itself) and as this project's token ids (*_ids.jsonl: what TRL gets), the same pairs in the same order.
    Returns token statistics of the training pairs."""
    if not Path(args.data).exists():
        raise UserError(f"--data {args.data} not found: the benchmark needs real HH-RLHF pairs (../shared/data beside "
                        "the checkout); pass --data PATH")
    pairs, _ = standardize_pairs(load_split(args.data, "train", "--data", skip_invalid=True), skip_invalid=True,
                                 name="bench data")
    pairs, _ = tokenize_pairs(pairs.shuffle(seed=args.seed), tokenizer, args.max_length, "truncate", "bench data",
                              skip_invalid=True)
    needed = args.pairs + args.held_out
    if len(pairs) < needed:
        raise UserError(f"--data has {len(pairs)} valid pairs, fewer than --pairs + --held_out = {needed}")
    for name, rows in (("train", range(args.pairs)), ("held_out", range(args.pairs, needed))):
        split = pairs.select(rows)
        split.select_columns(["chosen", "rejected"]).to_json(work / f"{name}.jsonl")
        ids = split.select_columns(["chosen_input_ids", "rejected_input_ids", "length"])
        ids.rename_columns({"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}).to_json(
            work / f"{name}_ids.jsonl")
    train = pairs.select(range(args.pairs))
    lengths = [len(s) for s in list(train["chosen_input_ids"]) + list(train["rejected_input_ids"])]
    return {"sequences": len(lengths), "mean_tokens": float(np.mean(lengths)), "max_tokens": int(np.max(lengths))}


def command(name: str, args: BenchArguments, work: Path, out: Path) -> list[str]:
    """The contestant's command line: the hyper-parameters are one list given to both scripts, so they cannot drift
    apart; only the data format, the sampler flag's name and the packing flags differ."""
    batch = str(args.batch_size)
    shared = ["--model_name", str(work / "model"), "--output_dir", str(out),
              "--per_device_train_batch_size", batch, "--per_device_eval_batch_size", batch,
              "--gradient_accumulation_steps", "1", "--num_train_epochs", str(args.epochs),
              "--max_steps", str(args.max_steps), "--max_length", str(args.max_length), "--seed", str(args.seed),
              "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03",
              "--weight_decay", "0.001", "--optim", "adamw_torch", "--max_grad_norm", "1.0",
              "--bf16", str(args.bf16).lower(), "--activation_checkpointing", "false", "--logging_steps", "10",
              "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
              "--attn_implementation", args.attn_implementation]
    if name == "trl":
        sampler = "group_by_length" if args.group_by_length else "random"
        return [sys.executable, TRL_RUNNER, *shared, "--train_set_path", str(work / "train_ids.jsonl"),
                "--eval_set_path", str(work / "held_out_ids.jsonl"), "--train_sampling_strategy", sampler]
    # reload_check_pairs 1: the trainer's post-training checkpoint check, kept as small as it allows
    return [sys.executable, TRAIN_SCRIPT, *shared, "--train_set_path", str(work / "train.jsonl"),
            "--eval_set_path", str(work / "held_out.jsonl"), "--overwrite_output_dir", "--reload_check_pairs", "1",
            "--group_by_length", str(args.group_by_length).lower(), *CONTESTANTS[name][1]]


def model_flops_per_token(n_params: int, config: dict) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter (forward and backward), as in the MFU of the
    PaLM paper; attention scores are left out, so the figure undercounts a little and is the same for every
    contestant."""
    return 6 * (n_params - config["vocab_size"] * config["hidden_size"])


def read_metrics(run: dict, out: Path, trained_pairs: float, flops_per_token: float) -> dict:
    """The speed, token and quality numbers of a finished run from its metrics.json (both scripts write the same
    keys for them). Model TFLOP/s counts the tokens the forwards ran less padding: a context shared by both sides of
    a pair counts once, as it is computed once, so MFU measures the device's use, and pairs/s the speed."""
    m = json.loads((out / "metrics.json").read_text())
    tokens, runtime = m["train_tokens"], m["train_runtime_s"]
    return {**run, "train_runtime_s": runtime, "train_steps": m["train_steps"], "trained_pairs": trained_pairs,
            "model_tflops": flops_per_token * (tokens["computed"] - tokens["padding"]) / runtime / 1e12,
            "peak_gpu_mib": m.get("peak_gpu_memory_mib") or 0.0,  # 0 on a CPU (the peak RSS is the memory there)
            "pairs_per_s": trained_pairs / runtime, "real_tokens": tokens["real"],
            "real_tokens_per_s": tokens["real"] / runtime, "computed_tokens": tokens["computed"],
            "padding_tokens": tokens["padding"], "padding_fraction": tokens["padding"] / tokens["computed"],
            "padding_free": tokens["padding_free"], "prefix_sharing": tokens["prefix_sharing"],
            "train_loss": m["train_loss"], "eval_accuracy": m["eval_accuracy"], "eval_loss": m["eval_loss"]}


def summarize(runs: list[dict]) -> dict:
    """Per contestant: the median of each number over its successful repeats."""
    summary = {}
    for name in CONTESTANTS:
        done = [r for r in runs if r["contestant"] == name and "pairs_per_s" in r]
        if done:
            summary[name] = {key: float(np.median([r[key] for r in done])) for key in done[0]
                             if isinstance(done[0][key], (int, float)) and not isinstance(done[0][key], bool)}
    return summary


def print_table(summary: dict, peak_tflops: float) -> None:
    trl = summary.get("trl")
    memory_key = "peak_gpu_mib" if trl and trl["peak_gpu_mib"] else "peak_rss_mib"  # what bounds a run's size
    print(f"\n{'contestant':<29}{'pairs/s':>9}{'vs TRL':>8}{'real tok/s':>12}{'padding':>9}{'computed':>10}"
          f"{'GPU MiB' if memory_key == 'peak_gpu_mib' else 'peak MiB':>10}{'vs TRL':>8}{'train loss':>12}"
          f"{'held-out acc':>14}{'loss':>8}{'TFLOP/s':>9}{'MFU':>7}")
    for name, (label, _) in CONTESTANTS.items():
        s = summary.get(name)
        if s is None:
            print(f"{label:<29}{'FAILED':>9}")
            continue
        speed = f"{s['pairs_per_s'] / trl['pairs_per_s']:.2f}x" if trl else "-"
        memory = f"{s[memory_key] / trl[memory_key]:.2f}x" if trl else "-"
        mfu = f"{100 * s['model_tflops'] / peak_tflops:.1f}%" if peak_tflops else "-"
        # computed: tokens the forward ran per real token (padding adds, a shared context counted once removes)
        print(f"{label:<29}{s['pairs_per_s']:>9.2f}{speed:>8}{s['real_tokens_per_s']:>12.0f}"
              f"{100 * s['padding_fraction']:>8.1f}%{s['computed_tokens'] / s['real_tokens']:>9.2f}x"
              f"{s[memory_key]:>10.0f}{memory:>8}{s['train_loss']:>12.4f}{s['eval_accuracy']:>14.3f}"
              f"{s['eval_loss']:>8.4f}{s['model_tflops']:>9.3g}{mfu:>7}")


def main():
    args = parse_args((BenchArguments,))[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
        data = prepare_data(args, tokenizer, work)
        n_params = build_bench_model(args.model, tokenizer, work / "model", args.seed, args.max_length)
        flops_per_token = model_flops_per_token(n_params, json.loads((work / "model" / "config.json").read_text()))
        # Both trainers go through the same pairs per epoch; with --max_steps, full batches are assumed.
        trained_pairs = args.pairs * args.epochs if args.max_steps <= 0 else args.max_steps * args.batch_size
        print(f"model {args.model}: {n_params / 1e6:.1f}M parameters; {args.pairs} train pairs ({data['sequences']} "
              f"sequences, mean {data['mean_tokens']:.0f} tokens, max {data['max_tokens']}), {args.held_out} held out; "
              f"batch {args.batch_size}, max_length {args.max_length}, lr {args.learning_rate}, "
              f"{'max_steps ' + str(args.max_steps) if args.max_steps > 0 else f'{args.epochs:g} epoch(s)'}, "
              f"{'bf16' if args.bf16 else 'fp32'}, {args.attn_implementation}, 1 CPU thread per run")

        runs, total = [], args.repeats * len(CONTESTANTS)
        for repeat in range(args.repeats):
            for name, (label, _) in CONTESTANTS.items():
                out = work / "runs" / f"{name}-{repeat}"
                log = work / "runs" / f"{name}-{repeat}.log"
                out.parent.mkdir(parents=True, exist_ok=True)
                print(f"[{len(runs) + 1}/{total}] repeat {repeat + 1}: {label} ...", flush=True)
                run = {"contestant": name, "repeat": repeat,
                       **run_child(command(name, args, work, out), log, args.timeout)}
                if run["exit_code"] == 0:
                    run = read_metrics(run, out, trained_pairs, flops_per_token)
                    print(f"    done in {run['wall_s']:.1f} s (training {run['train_runtime_s']:.1f} s, "
                          f"{run['pairs_per_s']:.2f} pairs/s), peak {run['peak_rss_mib']:.0f} MiB", flush=True)
                else:
                    why = f"timed out after {args.timeout:.0f} s" if run["timed_out"] else f"exit {run['exit_code']}"
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                    print(f"    FAILED ({why}); last lines of its log:\n{tail}", flush=True)
                runs.append(run)

    summary = summarize(runs)
    print_table(summary, args.peak_tflops)
    real = {name: s["real_tokens"] for name, s in summary.items()}
    if len(set(real.values())) > 1:  # the same pairs and epochs must mean the same tokens for every contestant
        print(f"warning: real training tokens differ between contestants: {real}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": asdict(args), "parameters": n_params, "data": data,
                                               "runs": runs, "summary": summary}, indent=2))
        print(f"results: {args.json}")
    failed = [r["contestant"] for r in runs if r["exit_code"] != 0]
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    run_cli(main)
