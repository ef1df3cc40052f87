#!/usr/bin/env bash
# The GPU check, in one go (under 8 minutes: every step has its own time limit):
#   1. the CUDA test tier (tests/test_cuda.py), a 2-process torchrun NCCL run (needs 2 GPUs) and
#      one protocol run (the recommended recipe, BANKING77 split 01, 1 shot, 600 test episodes),
#      side by side: none of them is a timing;
#   2. scripts/bench.py --device cuda --precision bf16 (bert-base-random, minilm), alone;
#   3. scripts/bench_llm.py --device cuda --precision bf16 (SmolLM2's architecture), alone.
# Writes each step's log, the two results files, a copy of docs/BENCHMARKS.md with the new
# `bench:cuda` and `bench-llm:cuda` blocks, and gpu-check.json (each step's exit code and
# seconds, the GPU, versions); prints a table last. Exits 0 when every step that ran passed.
#
#   scripts/gpu_check.sh [OUT_DIR]          # default outputs/gpu-check-<date>-<time>
#   METARUN_DATA=/path/to/data              # holds banking77/ (default ../shared/data)
#
# Without a CUDA GPU it refuses at once with exit code 2 and one line.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${1:-outputs/gpu-check-$(date +%Y%m%d-%H%M%S)}
data=${METARUN_DATA:-../shared/data}

if ! gpus=$("$python" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.device_count())' 2>/dev/null); then
    echo "gpu_check: no CUDA GPU is visible to $python (torch.cuda.is_available() is false); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
: >"$out/steps.tsv"

# step NAME LIMIT_SECONDS COMMAND...: runs it with its log in $out/NAME.log, records the result.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$out/steps.tsv"
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$out/steps.tsv"; }

nvidia-smi >"$out/nvidia-smi.log" 2>&1 || true
cp docs/BENCHMARKS.md "$out/BENCHMARKS.md"

# 1. Correctness, side by side.
step tests 120 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py &
if [ "$gpus" -ge 2 ]; then
    step torchrun-nccl 120 "$python" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m metarun hardware=ddp backbone=tiny task=icd10 train.steps=4 train.meta_batch_size=4 \
        train.val_interval=2 task.val_episodes=8 task.test_episodes=20 logger.progress=false \
        "run_dir=$out/ddp" &
else
    skip torchrun-nccl "one GPU: NCCL refuses two ranks on one device"
fi
if [ -f "$data/banking77/full.jsonl" ]; then
    step protocol 120 "$python" -m metarun +experiment=recommended task=banking77 \
        "task.data_dir=$data/banking77" task.split=01 task.shots=1 task.test_episodes=600 \
        hardware=cuda logger.progress=false "run_dir=$out/protocol" &
else
    skip protocol "no $data/banking77 (set METARUN_DATA)"
fi
wait

# 2 and 3. Timings, each alone on the GPU. A cell is a fresh process (about 30 s on the H200
# machine, start-up included): --budget ends each script in time, cells past it listed as not
# run, so what did run is written. bert-base first: the memory targets name it.
step bench 200 "$python" scripts/bench.py --device cuda --precision bf16 \
    --backbones bert-base-random,minilm --algos maml,maml-lora,fomaml,protonet,anil \
    --steps 3 --warmup 1 --eval-backbones minilm --uncached 100 --budget 175 \
    --out "$out/results-cuda.json" --markdown "$out/BENCHMARKS.md"
step bench-llm 160 "$python" scripts/bench_llm.py --device cuda --precision bf16 \
    --backbone smollm2-random --steps 1 --warmup 1 --episodes 20 --unshared 3 --budget 135 \
    --train maml-lora-verbalizer --adapt-layers 2 --episode-batch 4 --adapt-episodes 0 \
    --out "$out/results-llm-cuda.json" --markdown "$out/BENCHMARKS.md"

"$python" scripts/gpu_summary.py "$out"
