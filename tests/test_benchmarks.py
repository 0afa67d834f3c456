"""The attention-choices benchmark runs end to end at toy sizes and reports every choice against its reference."""

import re
import sys

import pytest

from helpers import check_ok, run

pytestmark = pytest.mark.e2e  # a subprocess: `make test-fast` skips this file


def test_attention_choices_benchmark_reports_every_choice():
    proc = run([sys.executable, "benchmarks/bench_attention_choices.py", "--data", "assets/data/toy_preference",
                "--pairs", "4", "--batch_pairs", "2", "--max_length", "128"],
               env_extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": "benchmarks"})
    check_ok(proc)
    rows = dict(re.findall(r"^(\S.*?)\s+[\d.]+\s+([\d.]+)x$", proc.stdout, re.M))
    choices = ["packed, CPU's groups", "packed, GPU's groups", "packed + prefix sharing, CPU's groups",
               "packed + prefix sharing, GPU's groups"]
    # each part's reference row is 1.00x of itself; every choice appears in both parts
    assert rows["padded (reference)"] == "1.00" and rows["one sequence per forward (reference)"] == "1.00"
    for part in proc.stdout.split("\n2. ")[0], proc.stdout.split("\n2. ")[1]:
        assert all(re.search(rf"^{re.escape(c)}\s", part, re.M) for c in choices)
    assert re.search(r"^without cuDNN\s+[\d.]+ first\s+[\d.]+ again", proc.stdout, re.M)
