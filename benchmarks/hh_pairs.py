"""What the benchmarks share: their flags, the real HH-RLHF pairs they score (../shared beside the checkout), the
model every contestant starts from, and running a contestant as its own measured process."""

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from useful_code.cli import UserError
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_MODEL, HH_RLHF_HARMLESS_TEST, REPO_ROOT
from useful_code.formats import standardize_pairs
from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_reward_model


@dataclass
class HHBenchArguments:
    """The data, the model and how much of it each method scores."""

    data: str = field(default=HH_RLHF_HARMLESS_TEST, metadata={"help": "HH-RLHF pairs (any format the project reads)."})
    model: str = field(default=DEFAULT_MODEL)
    pairs: int = field(default=300, metadata={"min": 1, "help": "Pairs scored by each method."})
    batch_size: int = field(default=16, metadata={"min": 1})


def load_hh_pairs(args: HHBenchArguments):
    """The first args.pairs valid pairs in the standard format (invalid rows are skipped and counted)."""
    data = load_split(args.data, "train", "--data", skip_invalid=True)
    pairs, _ = standardize_pairs(data, skip_invalid=True, name="bench data")
    if len(pairs) < args.pairs:
        raise UserError(f"--data has {len(pairs)} valid pairs, fewer than --pairs={args.pairs}")
    return pairs.select(range(args.pairs))


def bench_model(kind: str, tokenizer, seed: int, max_length: int, device=None):
    """The contestants' common starting point, a one-output sequence classifier (fp32, on device), its new weights
    drawn from a fixed seed: 'tiny' is the embedded model with a new score head, '30m' a random-init Llama (hidden
    512, 8 layers, 8 heads, intermediate 1376; 25.9M parameters with the tiny tokenizer's vocabulary), '1b' a
    random-init Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads, intermediate
    5632; 0.97B parameters with the tiny vocabulary), for a GPU."""
    torch.manual_seed(seed)
    if kind == "tiny":
        model = load_reward_model(DEFAULT_MODEL, "--model", tokenizer, torch.float32, new_weights=REWARD_HEAD_WEIGHTS)
        return model.to(device) if device is not None else model
    shape = {"30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376),
             "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                        intermediate_size=5632)}[kind]
    config = LlamaConfig(vocab_size=len(tokenizer), **shape, max_position_embeddings=max(2048, max_length),
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    with torch.device(device or "cpu"):  # initialised where it runs: a 1B model's init on a CPU takes a while
        return LlamaForSequenceClassification(config)


def build_bench_model(kind: str, tokenizer, path: Path, seed: int, max_length: int) -> int:
    """Save bench_model(kind) and its tokenizer to path. Returns its parameter count."""
    model = bench_model(kind, tokenizer, seed, max_length)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_child(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run cmd as its own process group with one thread, its output to log_path; kill the group after timeout.
    Returns its exit code, wall time and peak RSS: os.wait4's rusage is this child's own (RUSAGE_CHILDREN would be
    the largest of every child so far)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start, timed_out = time.perf_counter(), False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    except BaseException:  # Ctrl-C: take the child's process group down too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {"exit_code": proc.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - start,
            "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux: KiB
