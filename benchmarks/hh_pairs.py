"""What the benchmarks share: their flags and the real HH-RLHF pairs they score (../shared beside the checkout)."""

from dataclasses import dataclass, field

from useful_code.cli import UserError
from useful_code.data import load_split
from useful_code.defaults import DEFAULT_MODEL, HH_RLHF_HARMLESS_TEST
from useful_code.formats import standardize_pairs


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
