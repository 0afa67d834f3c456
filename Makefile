# The two commands a new user runs: `make demo` and `make test`. Both set up .venv/ from requirements.txt first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The venv's bin first, so the `deepspeed` launcher and the Python it starts are the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Two ranks on two cores: one thread each avoids oversubscription.
DEMO_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
DEMO_DIR := outputs/demo
PM_DIR := outputs/demo-pm
ARMO_DIR := outputs/demo-armo
# ArmoRM's frozen backbone: the BT demo's trained checkpoint when `make demo` has run, else the tiny default.
# Decided when the recipe runs (recursive, $(shell)): `make demo demo-armo` in one call sees demo's checkpoint.
ARMO_BACKBONE = $(shell [ -f $(DEMO_DIR)/last_checkpoint/model.safetensors ] && echo $(DEMO_DIR)/last_checkpoint \
	|| echo assets/tiny-llama)
ARMO_EMB := $(ARMO_DIR)/embeddings

.PHONY: install demo demo-pm demo-armo demo-math serve test test-fast test-e2e bench bench-gpu clean

install: $(STAMP)

# The pinned libraries, then this project as an editable package (useful_code/, importable from every script).
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Bradley-Terry: ZeRO-3 training on 2 CPU ranks, RewardBench 1 evaluation, then RewardBench 2 data-parallel on 2 ranks.
demo: $(STAMP)
	$(DEMO_ENV) deepspeed --num_gpus 2 bradley-terry-rm/train.py \
		--deepspeed deepspeed_configs/deepspeed_3.json --output_path $(DEMO_DIR) --overwrite_output_dir
	python useful_code/eval_reward_bench_bt.py --reward_name_or_path $(DEMO_DIR)/last_checkpoint \
		--data_set_name assets/data/reward_bench_sample.jsonl \
		--record_dir $(DEMO_DIR)/reward_bench.txt --results_json $(DEMO_DIR)/reward_bench.json
	$(DEMO_ENV) torchrun --nproc_per_node 2 useful_code/eval_reward_bench_bt.py --benchmark 2 \
		--reward_name_or_path $(DEMO_DIR)/last_checkpoint --data_set_name assets/data/reward_bench_2_sample.jsonl \
		--record_dir $(DEMO_DIR)/reward_bench.txt --results_json $(DEMO_DIR)/reward_bench_2.json

# Pairwise preference model: standard pairs -> PM data, ZeRO-3 training on 2 CPU ranks (held-out accuracy in both
# orders), RewardBench 1 and 2 evaluation (v2 data-parallel on 2 ranks), and best-of-4 ranking by knock-out tournament.
demo-pm: $(STAMP)
	python pair-pm/process_pair_data.py --dataset_path assets/data/toy_preference --output_path $(PM_DIR)/pm_data
	$(DEMO_ENV) deepspeed --num_gpus 2 pair-pm/train.py pair-pm/tiny.yaml \
		--deepspeed deepspeed_configs/deepspeed_3.json --dataset_path $(PM_DIR)/pm_data \
		--eval_set_path assets/data/toy_preference --output_dir $(PM_DIR) --overwrite_output_dir
	python useful_code/eval_reward_bench_pm.py --reward_name_or_path $(PM_DIR)/last_checkpoint \
		--data_set_name assets/data/reward_bench_sample.jsonl \
		--record_dir $(PM_DIR)/reward_bench.txt --results_json $(PM_DIR)/reward_bench.json
	$(DEMO_ENV) torchrun --nproc_per_node 2 useful_code/eval_reward_bench_pm.py --benchmark 2 \
		--reward_name_or_path $(PM_DIR)/last_checkpoint --data_set_name assets/data/reward_bench_2_sample.jsonl \
		--record_dir $(PM_DIR)/reward_bench.txt --results_json $(PM_DIR)/reward_bench_2.json
	python pair-pm/rank_responses.py --reward_name_or_path $(PM_DIR)/last_checkpoint \
		--input_path assets/data/toy_ranking.jsonl --output_path $(PM_DIR)/ranked.jsonl

# ArmoRM: the four stages on toy data with armo-rm/configs/tiny.yaml, each script's default (19-attribute probes,
# verbosity debiasing, gating network), export to one
# model, its RewardBench-format evaluation through the BT eval, and the top attributes of one answer.
demo-armo: $(STAMP)
	python armo-rm/stage-1_prepare.py --model_path $(ARMO_BACKBONE) --output_dir $(ARMO_EMB)
	python armo-rm/stage-1_train.py --model_path $(ARMO_BACKBONE) --embeddings_dir $(ARMO_EMB) \
		--output_dir $(ARMO_DIR)/regression_weights
	for split in train test; do python armo-rm/stage-2_prepare.py --model_path $(ARMO_BACKBONE) \
		--dataset_split $$split --output_dir $(ARMO_EMB) || exit 1; done
	python armo-rm/stage-2_prepare.py --model_path $(ARMO_BACKBONE) --output_dir $(ARMO_EMB) \
		--dataset_path assets/data/reward_bench_sample.jsonl
	python armo-rm/stage-2_train.py --model_path $(ARMO_BACKBONE) --embeddings_dir $(ARMO_EMB) \
		--regression_weights $(ARMO_DIR)/regression_weights --reference_split test \
		--output_dir $(ARMO_DIR)/head --overwrite_output_dir --eval_reward_bench --reward_bench_dataset assets/data/reward_bench_sample.jsonl --reward_bench_split train
	python armo-rm/export.py --model_path $(ARMO_BACKBONE) --head_dir $(ARMO_DIR)/head --output_path $(ARMO_DIR)/model
	python useful_code/eval_reward_bench_bt.py --reward_name_or_path $(ARMO_DIR)/model --trust_remote_code \
		--data_set_name assets/data/reward_bench_sample.jsonl \
		--record_dir $(ARMO_DIR)/reward_bench.txt --results_json $(ARMO_DIR)/reward_bench.json
	python useful_code/eval_reward_bench_bt.py --reward_name_or_path $(ARMO_DIR)/model --trust_remote_code \
		--benchmark 2 --data_set_name assets/data/reward_bench_2_sample.jsonl \
		--record_dir $(ARMO_DIR)/reward_bench.txt --results_json $(ARMO_DIR)/reward_bench_2.json
	python armo-rm/interpret.py --model_path $(ARMO_DIR)/model --trust_remote_code

# Math process reward model: PRM training on the toy arithmetic solutions (loss on every step's "+"/"-" label), then
# best-of-N on 64 toy problems with 8 candidates each, data-parallel on 2 ranks: the PRM's pick (min of its step
# P(+)) against majority voting and pass@1 for N = 1, 2, 4, 8, printed and drawn (best_of_n.png).
demo-math: $(STAMP)
	$(DEMO_ENV) python math-rm/train.py math-rm/tiny.yaml --output_dir outputs/demo-math --overwrite_output_dir
	$(DEMO_ENV) torchrun --nproc_per_node 2 math-rm/prm_evaluate.py \
		--reward_name_or_path outputs/demo-math/last_checkpoint --output_dir outputs/demo-math/best_of_n
	@echo "Best-of-N curve: outputs/demo-math/best_of_n/best_of_n.png (numbers in best_of_n.json)"

# The reward server on 127.0.0.1:5000 with make demo's checkpoint (see the README's "Serving" section).
serve: $(STAMP)
	python useful_code/serve_reward_model.py

# Both tiers: fast in-process unit tests and end-to-end tests (subprocesses, DeepSpeed ranks; marked e2e).
test: $(STAMP)
	python -m pytest tests -q

test-fast: $(STAMP)
	python -m pytest tests -q -m "not e2e"

test-e2e: $(STAMP)
	python -m pytest tests -q -m e2e

# The CPU benchmarks, each against its reference in the same run: batched scoring (BT, PM in both orders) vs one
# sequence per forward, the server's batching, BT training vs TRL (real HH-RLHF pairs: needs ../shared), and PRM
# step scoring vs upstream's per-step loop (toy best-of-N set).
bench: $(STAMP)
	python benchmarks/bench_eval_batching.py
	python benchmarks/bench_pm_eval_batching.py
	python benchmarks/bench_reward_server.py
	python benchmarks/bench_bt_training.py
	python benchmarks/bench_math_step_scoring.py

# The GPU measurements in one run (scoring ratios, server batching, ~1B Llama training against TRL with MFU).
bench-gpu: $(STAMP)
	bash benchmarks/gpu_benchmarks.sh outputs/bench-gpu

clean:
	rm -rf outputs
