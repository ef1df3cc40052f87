#!/usr/bin/env bash
# Identity references for a refactor ("a refactor changes no number"): the README's default run,
# the recommended recipe on BANKING77 split 01, a tiny-llama LoRA-verbalizer MAML run, a tiny
# run killed with SIGKILL and resumed beside its uninterrupted twin, and every algorithm for a
# few steps on the tiny BERT and the tiny Llama. Record them before a change and after it, then
# compare with scripts/identity_compare.py (per-episode accuracies, metrics, summaries).
#
#   bash scripts/identity_runs.sh /tmp/id/before            # with the installed `metarun`
#   bash scripts/identity_runs.sh /tmp/id/after ./my_metarun   # any command that runs metarun
#   python scripts/identity_compare.py /tmp/id/before /tmp/id/after
#
# Three processes at a time, one thread each, all in fp32 (`hardware.precision=auto` would pick
# bf16 on some CPUs, whose numbers differ between CPU kernels): about 10 minutes on 2 CPU cores.
set -u
out=$1; M=${2:-metarun}; repo=$(cd "$(dirname "$0")/.." && pwd)
data=${METARUN_DATA:-$repo/../shared/data}
mkdir -p "$out"; cd "$out"
python -c "
import json, sys; sys.path.insert(0, '$repo')
from tests.conftest import synthetic_rows
open('d.jsonl', 'w').write(''.join(json.dumps(r) + '\n' for r in synthetic_rows()))"
B="task=banking77 task.data_dir=$data/banking77 task.split=01"
T="backbone=tiny task=local task.path=d.jsonl task.way=3 task.shots=2 task.queries=2
   task.class_split=[0.5,0.25,0.25] task.val_episodes=4 task.test_episodes=20
   train.val_interval=10 train.checkpoint_interval=5 logger.progress=false hardware.threads=1 hardware.precision=fp32"
L="backbone=tiny-llama $B task.shots=1 task.test_episodes=12 task.val_episodes=4
   train.val_interval=2 hardware.threads=1 hardware.precision=fp32 logger.progress=false"
(
  $M hardware.threads=1 hardware.precision=fp32 logger.progress=false run_dir=default > default.log 2>&1
  $M backbone=tiny-llama algo=maml algo.head=verbalizer algo.adapt=lora backbone.trainable=none \
     $B task.shots=1 task.test_episodes=40 task.val_episodes=10 train.steps=6 train.val_interval=3 \
     hardware.threads=1 hardware.precision=fp32 logger.progress=false run_dir=llama > llama.log 2>&1
  $M $T train.steps=30 run_dir=tiny_ref > tiny_ref.log 2>&1
  $M $T train.steps=30 run_dir=tiny_killed > tiny_killed.log 2>&1 & pid=$!
  while ! grep -q '"step": 13' tiny_killed/metrics.jsonl 2>/dev/null; do sleep 0.05; done
  kill -9 $pid; wait $pid
  $M $T train.steps=30 run_dir=tiny_killed >> tiny_killed.log 2>&1
) &
(
  for a in maml fomaml anil reptile finetune protonet matchingnet relationnet hypernet ridge frozen; do
    $M $T algo=$a train.steps=4 train.val_interval=2 run_dir=enc_$a > enc_$a.log 2>&1
  done
  for a in "algo=finetune algo.head=verbalizer algo.adapt=lora" \
           "algo=reptile algo.head=verbalizer algo.adapt=lora backbone.trainable=none" \
           "algo=fomaml algo.head=verbalizer" "algo=icl" "algo=metaicl" "algo=prompt" \
           "algo=protonet" "algo=anil"; do
    n=$(echo "$a" | tr ' =.' '___')
    $M $L $a train.steps=3 run_dir=dec_$n > dec_$n.log 2>&1
  done
) &
$M +experiment=recommended $B task.shots=1 task.test_episodes=600 hardware.threads=1 hardware.precision=fp32 \
   logger.progress=false run_dir=recommended > recommended.log 2>&1
wait
