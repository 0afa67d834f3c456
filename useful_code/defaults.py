"""Embedded defaults: the tiny model and the datasets the project ships, loaded through the same from_pretrained /
load_dataset code as a hub name, so every script runs without a model hub (CI, a fresh clone)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
DEFAULT_MODEL = str(ASSETS / "tiny-llama")
DEFAULT_PREFERENCE_DATA = str(ASSETS / "data" / "toy_preference")
DEFAULT_MULTI_OBJECTIVE_DATA = str(ASSETS / "data" / "toy_multi_objective")
REWARD_BENCH_SAMPLE = str(ASSETS / "data" / "reward_bench_sample.jsonl")
REWARD_BENCH_2_SAMPLE = str(ASSETS / "data" / "reward_bench_2_sample.jsonl")
TOY_GENERATIONS = str(ASSETS / "data" / "toy_generations.jsonl")  # prompts with 4 responses each (score_dataset)
# Real human preference pairs beside a checkout (benchmarks and some tests; absent where the project is cloned alone).
HH_RLHF_HARMLESS_TEST = str(REPO_ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz")
