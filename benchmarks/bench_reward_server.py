"""Load test of the reward server: one client at a time against K concurrent clients, on the same requests.

    python benchmarks/bench_reward_server.py [--reward_name_or_path DIR] [--clients 16] [--requests 20]

Starts useful_code/serve_reward_model.py on a free loopback port (never another address), sends each of
clients x requests conversations (real HH-RLHF pairs when ../shared is there, else the toy pairs) once one request
at a time, then again from K concurrent clients, each pass sending for at most half of --max_seconds (the
concurrent pass sends the requests the first sent; what is left unsent is counted apart from errors). Reports
throughput, p50/p99 latency, the error count (must be 0), the server's resident memory before and after, the
concurrent/sequential throughput ratio (dynamic batching), and whether both passes gave the same rewards.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hh_pairs import HHBenchArguments, load_hh_pairs
from useful_code.cli import UserError, parse_args, run_cli
from useful_code.defaults import DEFAULT_MODEL, DEFAULT_PREFERENCE_DATA, HH_RLHF_HARMLESS_TEST, REPO_ROOT
from useful_code.modeling import load_reward_model
from useful_code.reward_client import RewardClient, RewardServerError
from useful_code.templates import load_tokenizer


@dataclass
class LoadTestArguments(HHBenchArguments):
    """The model, the load and its bounds."""

    reward_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Checkpoint to serve. Default: the tiny model with a new score head, saved to a temporary directory."})
    clients: int = field(default=16, metadata={"min": 1, "max": 256})
    requests: int = field(default=20, metadata={"min": 1, "max": 10_000, "help": "Requests per client."})
    batch_wait_ms: float = field(default=5.0, metadata={"min": 0})
    max_seconds: float = field(default=120.0, metadata={
        "min": 1, "help": "Stop sending after this long: half for each pass (one at a time, concurrent)."})
    max_length: int = field(default=512, metadata={"min": 1})
    bf16: bool = field(default=True, metadata={
        "help": "The server's --bf16 (on a GPU; a CPU scores in fp32). bf16 rewards of one sequence differ by "
                "rounding between batches; --bf16 false checks that batching changes no reward beyond fp32's."})


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident_mib(pid: int) -> float:
    """The process's resident memory (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_all(client: RewardClient, conversations: list, workers: int, seconds: float):
    """Each conversation in its own request, from `workers` threads, none sent after `seconds`; (rewards, latencies,
    errors, skipped: those not sent in time, seconds taken)."""
    rewards, latencies, errors, skipped = [None] * len(conversations), [], 0, 0
    deadline = time.time() + seconds

    def one(i: int):
        if time.time() > deadline:
            return None, None, "deadline"
        start = time.perf_counter()
        try:
            reward = client.score([conversations[i]])["rewards"][0]
        except RewardServerError as err:
            return None, None, str(err)
        return reward, time.perf_counter() - start, None

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for i, (reward, latency, error) in enumerate(pool.map(one, range(len(conversations)))):
            rewards[i] = reward
            if error == "deadline":
                skipped += 1
            elif error:
                errors += 1
            else:
                latencies.append(latency)
    return rewards, np.array(latencies), errors, skipped, time.perf_counter() - start


def main():
    args = parse_args((LoadTestArguments,))[0]
    if args.data == HH_RLHF_HARMLESS_TEST and not Path(args.data).exists():
        print(f"{args.data} not found: using the toy pairs")
        args.data = DEFAULT_PREFERENCE_DATA
    n = args.clients * args.requests
    args.pairs = (n + 1) // 2
    pairs = load_hh_pairs(args)
    conversations = [c for pair in zip(pairs["chosen"], pairs["rejected"]) for c in pair][:n]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.reward_name_or_path
        if checkpoint is None:
            tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
            model = load_reward_model(DEFAULT_MODEL, "--model", tokenizer, torch.float32, new_weights=("score.",))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            checkpoint = tmp
        port = free_loopback_port()
        server = subprocess.Popen([sys.executable, str(REPO_ROOT / "useful_code" / "serve_reward_model.py"),
                                   "--reward_name_or_path", checkpoint, "--host", "127.0.0.1", "--port", str(port),
                                   "--batch_wait_ms", str(args.batch_wait_ms), "--max_length", str(args.max_length),
                                   "--batch_size", str(args.batch_size), "--bf16", str(args.bf16)], cwd=REPO_ROOT)
        try:
            client = RewardClient(f"http://127.0.0.1:{port}", timeout=60)
            started = time.time()
            while True:
                try:
                    client.health()
                    break
                except RewardServerError:
                    if server.poll() is not None or time.time() - started > 120:
                        raise UserError("the server did not start") from None
                    time.sleep(0.2)
            client.score(conversations[:2])  # warm-up
            memory_before = resident_mib(server.pid)
            batches, cpu = [client.info()["batches_run"]], [cpu_seconds(server.pid)]
            sequential = send_all(client, conversations, 1, args.max_seconds / 2)
            batches.append(client.info()["batches_run"])
            cpu.append(cpu_seconds(server.pid))
            # The same requests: those the first pass sent in its time (a prefix: one worker sends them in order).
            sent = len(conversations) - sequential[3]
            concurrent = send_all(client, conversations[:sent], args.clients, args.max_seconds / 2)
            batches.append(client.info()["batches_run"])
            cpu.append(cpu_seconds(server.pid))
            memory_after = resident_mib(server.pid)
            info = client.info()
            gpu_peak, dtype = info["peak_gpu_memory_mib"], info["dtype"]
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    print(f"\n{n} single-conversation requests, {args.clients} concurrent clients x {args.requests} requests, "
          f"batch wait {args.batch_wait_ms} ms, {dtype}, data {args.data}")
    # The load generator shares this machine's cores with the server: the server's own CPU time per request says
    # what batching saves, whatever the clients cost.
    print(f"{'':<26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'unsent':>8}{'batches':>9}"
          f"{'server CPU ms/req':>19}")
    phases = (("one request at a time", sequential), (f"{args.clients} concurrent clients", concurrent))
    for n_batches, cpu_used, (name, (_, latencies, errors, skipped, seconds)) in zip(np.diff(batches), np.diff(cpu),
                                                                                    phases):
        done = len(latencies)
        p50, p99 = (1000 * np.percentile(latencies, q) if done else float("nan") for q in (50, 99))
        print(f"{name:<26}{done / seconds:>9.1f}{p50:>9.1f}{p99:>9.1f}{errors:>8}{skipped:>8}{n_batches:>9}"
              f"{1000 * cpu_used / max(done, 1):>19.2f}")
    if sequential[3] or concurrent[3]:
        print(f"note: {sequential[3]} requests were not sent within half of --max_seconds {args.max_seconds} one at a "
              f"time, so the concurrent pass sent the first {len(conversations) - sequential[3]} only"
              + (f", of which {concurrent[3]} were not sent in its half either" if concurrent[3] else ""))
    if len(sequential[1]) and len(concurrent[1]):
        ratio = (len(concurrent[1]) / concurrent[4]) / (len(sequential[1]) / sequential[4])
        print(f"throughput ratio (concurrent / one at a time): {ratio:.2f}x")
    else:
        print("throughput ratio: not measured (a pass completed no request)")
    pairs_done = [(a, b) for a, b in zip(sequential[0], concurrent[0]) if a is not None and b is not None]
    max_diff = max((abs(a - b) for a, b in pairs_done), default=float("nan"))
    print(f"rewards, concurrent vs one at a time: max |diff| {max_diff:.2e} over {len(pairs_done)} requests")
    print(f"server resident memory: {memory_before:.0f} MiB before, {memory_after:.0f} MiB after"
          + (f"; GPU allocator peak {gpu_peak:.0f} MiB" if gpu_peak is not None else ""))
    if sequential[2] or concurrent[2]:
        raise UserError(f"{sequential[2] + concurrent[2]} requests failed")


if __name__ == "__main__":
    run_cli(main)
