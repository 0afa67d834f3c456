"""Benchmark: the attention choices of packed rows on this device, each against its reference in the same process,
on the same real HH-RLHF batches and the same weights:

1. a BT training step (forward and backward, no optimizer step; bf16 autocast on a GPU): padded batches (the
   reference), transformers' own packed path (a row x row mask from the position ids), and packed rows through
   packing's attention at the CPU's and the GPU's attention grouping (packing.CPU_GROUP_LENGTH_RATIO and
   GPU_GROUP_LENGTH_RATIO), plain and with prefix sharing; on a GPU each with torch's default SDPA backends and
   again without cuDNN's (packing's own choice on a GPU: PACKED_SDPA_BACKENDS);
2. scoring (inference) of the same batches: one sequence per forward (the reference), padded, and packed as above;
3. SDPA's cost of a sequence length seen for the first time (on a GPU, cuDNN's attention builds a graph per
   shape): single sequences of new lengths scored twice (first sight, then again), with torch's default SDPA
   backends and with cuDNN's left out.

    python benchmarks/bench_attention_choices.py [--model tiny|30m|1b] [--pairs 64] [--batch_pairs 8]

Prints milliseconds per batch (per call in part 3) and each one's speed next to its reference. It is the probe
behind packing's per-device defaults (benchmarks/README.md, "Measured on a GPU (H200)").
"""

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from hh_pairs import HHBenchArguments, bench_model, load_hh_pairs
from useful_code import packing
from useful_code.cli import parse_args, run_cli
from useful_code.defaults import DEFAULT_MODEL
from useful_code.templates import load_tokenizer, tokenize_pairs




@dataclass
class ChoicesArguments(HHBenchArguments):
    model: str = field(default="tiny", metadata={"choices": ("tiny", "30m", "1b")})
    pairs: int = field(default=64, metadata={"min": 1, "help": "Pairs, in length-grouped batches of --batch_pairs."})
    batch_pairs: int = field(default=8, metadata={"min": 1})
    max_length: int = field(default=1024, metadata={"min": 1})
    repeats: int = field(default=1, metadata={"min": 1, "help": "Timed passes over the batches."})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, batches: list, device: torch.device, repeats: int) -> float:
    """Milliseconds per batch of run(batch), after one untimed pass over the first two batches."""
    for batch in batches[:2]:
        run(batch)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            run(batch)
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / (repeats * len(batches))


def main():
    args = parse_args((ChoicesArguments,))[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
    pairs, _ = tokenize_pairs(load_hh_pairs(args), tokenizer, args.max_length, "truncate", "bench", skip_invalid=True)
    chosen, rejected = list(pairs["chosen_input_ids"]), list(pairs["rejected_input_ids"])
    order = sorted(range(len(chosen)), key=lambda i: -max(len(chosen[i]), len(rejected[i])))  # length-grouped
    batches = [order[i:i + args.batch_pairs] for i in range(0, len(order), args.batch_pairs)]
    model = bench_model(args.model, tokenizer, seed=0, max_length=args.max_length, device=device)
    model.set_attn_implementation("sdpa")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    ratios = {"CPU's groups": packing.CPU_GROUP_LENGTH_RATIO, "GPU's groups": packing.GPU_GROUP_LENGTH_RATIO}
    mean = sum(map(len, chosen + rejected)) / (2 * len(chosen))
    print(f"{args.pairs} HH-RLHF pairs in {len(batches)} batches of {args.batch_pairs} (mean {mean:.0f} tokens), "
          f"model {args.model}, {device.type}{', bf16 autocast' if device.type == 'cuda' else ', fp32'}")

    def padded(batch):
        enc = tokenizer.pad({"input_ids": [chosen[i] for i in batch] + [rejected[i] for i in batch]}, padding=True,
                            return_tensors="pt")
        return model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits

    def transformers_packed(batch):  # the model's own packed path: no plan, a mask built from the position ids
        row = packing.pack_pairs([chosen[i] for i in batch], [rejected[i] for i in batch], share_prefix=False)
        hidden = model.model(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                             use_cache=False).last_hidden_state
        return model.score(hidden[0, row.last_positions.to(device)])

    def packed(share_prefix, ratio):
        def run(batch):
            packing.GROUP_LENGTH_RATIO = ratio
            row = packing.pack_pairs([chosen[i] for i in batch], [rejected[i] for i in batch], share_prefix)
            return packing.packed_rewards(model, packing.inputs_on_device(row.as_inputs(), device))
        return run

    # On a GPU every choice runs with torch's default SDPA backends and again without cuDNN's, whose attention builds
    # a graph for each new shape (packed rows keep off it on a GPU: packing.PACKED_SDPA_BACKENDS).
    settings = {"default SDPA": None}
    if device.type == "cuda":
        settings["without cuDNN"] = packing.NO_CUDNN_SDPA
    packed_backends = packing.PACKED_SDPA_BACKENDS

    def report(title, reference_name, runs):
        """runs: name -> (whether it runs packing's attention, run); ms and speed-up per SDPA setting."""
        print(f"\n{title}\n{'':<44}" + "".join(f"{name + ': ms':>22}{'speed-up':>10}" for name in settings))
        results = {}
        for setting, allowed in settings.items():
            packing.PACKED_SDPA_BACKENDS = allowed
            with sdpa_kernel(allowed) if allowed else nullcontext():
                for name, (packed_attention, run) in runs.items():
                    if packed_attention:
                        assert packing.enable_padding_free(model)
                    else:
                        model.set_attn_implementation("sdpa")
                    results[name, setting] = timed(run, batches, device, args.repeats)
        for name in runs:
            print(f"{name:<44}" + "".join(f"{results[name, setting]:22.1f}"
                                          f"{results[reference_name, setting] / results[name, setting]:9.2f}x"
                                          for setting in settings))
        packing.GROUP_LENGTH_RATIO, packing.PACKED_SDPA_BACKENDS = None, packed_backends

    def training_step(forward):
        def step(batch):
            with autocast:
                rewards = forward(batch).float()
            n = len(batch)
            (-F.logsigmoid(rewards[:n, 0] - rewards[n:, 0]).mean()).backward()
            model.zero_grad(set_to_none=True)
        return step

    model.train()
    runs = {"padded (reference)": (False, training_step(padded)),
            "transformers' packed path": (False, training_step(transformers_packed))}
    for share in (False, True):
        for label, ratio in ratios.items():
            runs[f"packed{' + prefix sharing' if share else ''}, {label}"] = (True, training_step(packed(share, ratio)))
    report("1. training step (forward + backward), ms per batch", "padded (reference)", runs)

    model.eval()
    with torch.inference_mode():
        def one_by_one(batch):
            for ids in [chosen[i] for i in batch] + [rejected[i] for i in batch]:
                model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()

        runs = {"one sequence per forward (reference)": (False, one_by_one),
                "padded": (False, lambda b: padded(b).float().cpu())}
        for share in (False, True):
            for label, ratio in ratios.items():
                forward = packed(share, ratio)
                runs[f"packed{' + prefix sharing' if share else ''}, {label}"] = (
                    True, lambda b, forward=forward: forward(b).float().cpu())
        with autocast:
            report("2. scoring, ms per batch", "one sequence per forward (reference)", runs)

        model.set_attn_implementation("sdpa")
        print("\n3. single sequences of distinct lengths, ms per call: first sight of a length, then again")
        longest = max(chosen + rejected, key=len)
        seen = {len(ids) for ids in chosen + rejected}  # and transformers' packed rows, [1, T] too
        seen |= {sum(len(chosen[i]) + len(rejected[i]) for i in batch) for batch in batches}
        unseen = sorted(set(range(16, len(longest) + 1)) - seen)
        lengths = unseen[:: max(1, len(unseen) // 64)][:64]  # lengths no forward of parts 1-2 had
        if len(lengths) < 2:
            print(f"  skipped: the pairs leave {len(lengths)} unseen lengths between 16 and {len(longest)} tokens")
            return
        backends = {"default SDPA backends": None, "without cuDNN": packing.NO_CUDNN_SDPA}
        for k, (name, allowed) in enumerate(backends.items()):
            # every other length for each: both get lengths of the same spread, each seen first here
            sequences = [longest[:n] for n in lengths[k::2]]
            with sdpa_kernel(allowed) if allowed else nullcontext(), autocast:
                seconds = []
                for _ in range(2):
                    start = time.perf_counter()
                    for ids in sequences:
                        model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()
                    seconds.append(1000 * (time.perf_counter() - start) / len(sequences))
            print(f"{name:<44}{seconds[0]:9.1f} first{seconds[1]:9.1f} again  ({len(sequences)} lengths)")


if __name__ == "__main__":
    run_cli(main)
