#!/usr/bin/env bash
# The GPU measurements still open in benchmarks/README.md ("Measured on a GPU"), in one run, each log in OUT_DIR:
#   bash benchmarks/gpu_benchmarks.sh OUT_DIR [HH_DATA]    # or: make bench-gpu
# 0. attention choices (bench_attention_choices.py): padded, packed at each device's grouping, prefix sharing, and
#    SDPA's first-sight cost of a sequence length with and without cuDNN (tiny and ~1B Llama);
# 1. scoring: one sequence per forward against padded, padding-free and prefix-shared batches (tiny and ~30M Llama,
#    fp32, so that "identical decisions" is a fair test);
# 2. the reward server's load test (bf16, then fp32): one request at a time against 16 concurrent clients;
# 3. BT training of a ~1B Llama in bf16: TRL's RewardTrainer against this trainer padded, padding-free and
#    prefix-sharing, with MFU against --peak_tflops (PEAK_TFLOPS, default 989: H100/H200 SXM dense bf16).
# STEPS picks some of them by kind or by name (default "attention smoke eval server train"; smoke: a short bf16 BT
# and PM training run each; names such as attention_tiny or eval_30m pick one step), e.g. to split the run in two;
# PYTHON names the interpreter (default python3); QUICK=1 runs every step at toy sizes (a smoke test of the script,
# on any machine); EVAL_PAIRS, REQUESTS (per client), TRAIN_PAIRS and ATTENTION_PAIRS override the sizes. A step that fails is reported and the others still run; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_benchmarks.sh OUT_DIR [HH_DATA]}
data=${2:-../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}
peak=${PEAK_TFLOPS:-989}
python=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ] && [ ! -e "$data" ]; then  # a smoke test runs on any checkout: ../shared may be absent
    echo "$data not found: QUICK=1 uses the toy pairs"; data=assets/data/toy_preference
fi
if [ "${QUICK:-0}" = 1 ]; then
    eval_pairs=20; requests=4; train_model=tiny; train_pairs=32; held_out=16; attention_pairs=4; big_model=30m
else
    # 1200 pairs are 150 steps of 8: enough that the first steps' warm-up does not weigh on the 1B model's MFU
    eval_pairs=300; requests=20; train_model=1b; train_pairs=1200; held_out=200; attention_pairs=64; big_model=1b
fi
# sizes for a short device lease, e.g. TRAIN_PAIRS=400 ATTENTION_PAIRS=16
eval_pairs=${EVAL_PAIRS:-$eval_pairs}; requests=${REQUESTS:-$requests}; train_pairs=${TRAIN_PAIRS:-$train_pairs}
attention_pairs=${ATTENTION_PAIRS:-$attention_pairs}
# bf16 training where the GPU has it (TRL refuses bf16 on a CPU).
bf16=$("$python" -c "import torch; print(str(torch.cuda.is_available() and torch.cuda.is_bf16_supported()).lower())")
mkdir -p "$out"
"$python" - > "$out/environment.txt" 2>&1 <<'EOF'
import platform, torch, transformers, trl
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| trl", trl.__version__)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)")
EOF
cat "$out/environment.txt"
failed=()
steps=" ${STEPS:-attention smoke eval server train} "
step() {  # step NAME SCRIPT FLAGS...: run one benchmark, its whole output to OUT_DIR/NAME.log, its table to stdout
    local name=$1; shift
    [[ $steps == *" ${name%%_*} "* || $steps == *" $name "* ]] || return 0
    echo "== $name: $python $*"
    local start=$SECONDS
    if PYTHONUNBUFFERED=1 "$python" "$@" > "$out/$name.log" 2>&1; then
        grep -v -E "it/s\]|LOAD REPORT|^Key|^-+\+|UNEXPECTED|MISSING|^Notes|WARNING|^\s*$" "$out/$name.log" | tail -n 12
    else
        failed+=("$name"); tail -n 20 "$out/$name.log"
    fi
    echo "   ($((SECONDS - start)) s)"
}
step attention_tiny benchmarks/bench_attention_choices.py --model tiny --pairs "$attention_pairs" --data "$data"
step attention_$big_model benchmarks/bench_attention_choices.py --model "$big_model" --pairs "$attention_pairs" \
    --data "$data"
# The trainers' GPU path (bf16 mixed precision, SDPA or flash-attention, padding-free): a short BT and PM run each,
# whose reload checks must pass.
step smoke_bt bradley-terry-rm/train.py --output_path "$out/smoke_bt" --max_steps 40
step smoke_pm pair-pm/train.py --output_dir "$out/smoke_pm" --max_steps 40
step eval_tiny benchmarks/bench_eval_batching.py --model tiny --pairs "$eval_pairs" --data "$data"
step eval_30m benchmarks/bench_eval_batching.py --model 30m --pairs "$eval_pairs" --data "$data"
step server benchmarks/bench_reward_server.py --requests "$requests" --data "$data"
# fp32: batching must change no reward beyond fp32's rounding (bf16's differs by its own between batches)
step server_fp32 benchmarks/bench_reward_server.py --requests "$requests" --data "$data" --bf16 false
step train_$train_model benchmarks/bench_bt_training.py --model "$train_model" --bf16 "$bf16" --peak_tflops "$peak" \
    --pairs "$train_pairs" --held_out "$held_out" --data "$data" --json "$out/train_$train_model.json"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (logs in $out)"; exit 1
fi
echo "all steps passed; logs in $out"
