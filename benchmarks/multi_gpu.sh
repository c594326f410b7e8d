#!/usr/bin/env bash
# DDP and FSDP on 2 GPUs against 1 GPU: the 125M byte Mamba (configs/mamba-125m.yaml, 8192 bytes
# of context, bf16-mixed), STEPS optimizer steps each, then a markdown report (OUT_DIR/report.md):
# step time, bytes/s and bytes/s per GPU of every run, scaling efficiency, and the loss curves
# compared with compare_curves.py. Runs, in OUT_DIR:
#   one          1 GPU, the global batch G = 2m windows as one micro-batch: the loss reference.
#                Training windows are a pure function of (seed, micro-step, rank): 2 ranks of m
#                windows at micro-step k take rows [0, m) and [m, 2m) of the 2m windows one
#                process of 2m draws at micro-step k (tests/test_distributed.py checks this), so
#                `one`, `ddp` and `fsdp` see the same bytes in every step. 1 GPU with m windows
#                accumulated twice would draw micro-steps 2k and 2k+1 instead: other windows, whose
#                loss differs by far more than bf16 noise.
#   one-accum    1 GPU, m windows x 2 accumulated (global batch G too): the throughput baseline,
#                each forward the shape a DDP rank runs. Efficiency is quoted against it and
#                against `one`. Fewer steps (STEPS/4, at least 10): only its step time is used.
#   ddp          2 GPUs, m windows each, no accumulation.
#   fsdp         2 GPUs, the same, sharded (one FSDP unit per block); a checkpoint at STEPS/2.
#   fsdp-resume  that checkpoint (written by FSDP on 2 GPUs) resumed on 1 GPU with 2m windows for
#                the remaining steps; compared with `one` from the resume point on.
#
#   bash benchmarks/multi_gpu.sh OUT_DIR [STEPS]       # on 2 GPUs (STEPS default 200)
#   BYTELM_MULTI_GPU_SMOKE=1 bash benchmarks/multi_gpu.sh OUT_DIR [STEPS]
#       the same runs on the CPU: 2 gloo processes, a tiny model and corpus (tests run this)
#
# Time on 2 H200s (m = 4, G = 8 windows = 65,536 bytes a step): the 90M Mamba runs 8 x 8192 in
# ~0.2 s (results/throughput-h200.md), so the 125M (33 blocks against 24) ~0.3 s a step at 8
# windows and ~0.2 s at 4. one: 200 x 0.3 = 60 s; one-accum: 50 x 0.4 = 20 s; ddp: 200 x 0.2 =
# 40 s; fsdp: 200 x 0.22 = 45 s; fsdp-resume: 100 x 0.3 = 30 s: ~3.5 min of steps, plus ~20-30 s
# a run to start (imports, NCCL, Triton's first compile) and ~5 s for each 1.5 GB checkpoint
# (one at the end of every run, one more mid-FSDP): ~6 min in all, inside one 10-minute call.
# Measured on 2 H200s: 384 and 423 s (one 0.30 s a step, ddp 0.21, fsdp 0.27-0.30).
set -euo pipefail
# NVLink multicast stays off on the lent machines (NCCL NVLS, symmetric memory, NVSHMEM).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

usage="usage: [BYTELM_MULTI_GPU_SMOKE=1] bash benchmarks/multi_gpu.sh OUT_DIR [STEPS]"
out=${1:?$usage}
smoke=${BYTELM_MULTI_GPU_SMOKE:-0}
command="bash benchmarks/multi_gpu.sh $*"
if [[ $smoke == 1 ]]; then command="BYTELM_MULTI_GPU_SMOKE=1 $command"; fi
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute before moving to the repository root
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

if [[ $smoke == 1 ]]; then
  steps=${2:-8}
  m=2
  # Lightning runs FSDP on GPUs only; tests/launch_train.py is train.py with the CPU changes
  # tests/test_distributed.py uses (gloo, FSDP on the CPU).
  launcher=("$python" tests/launch_train.py)
  export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
  "$python" - "$out/corpus.txt" <<'EOF'
import sys
import numpy as np
words = "the of and to in is was for on that with as by at from his her it an be".split()
text = " ".join(np.random.default_rng(0).choice(words, 3000))
open(sys.argv[1], "w").write("\n".join(text[i:i + 70] for i in range(0, len(text), 70)))
EOF
  size=(--data "$out/corpus.txt" --data.prepared_dir "$out/prepared" --data.seq_len 16
        --data.val_bytes 272 --model.d_model 16 --model.n_layer 1 --model.d_state 4
        --optim.warmup_steps 2 --trainer.accelerator cpu)
  log_every=1  # a few steps: every one logged
else
  steps=${2:-200}
  m=4
  launcher=("$python" train.py)
  gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
  if (( gpus < 2 )); then
    echo "error: multi_gpu.sh needs 2 GPUs, found $gpus (BYTELM_MULTI_GPU_SMOKE=1 for a CPU run)" >&2
    exit 1
  fi
  # val_bytes and sample_bytes small: the final validation and sample are not what is timed.
  size=(--data.val_bytes 65536)
  # train.py's default: StepTimer waits for the GPU on logged steps only (logging every step
  # adds a wait a step; the 2026-11-29 runs in results/multi-gpu-h200.md logged every step)
  log_every=10
fi
if (( steps < 4 || steps % 2 )); then
  echo "error: STEPS must be even and at least 4 (got $steps)" >&2
  exit 2
fi
half=$((steps / 2))
accum_steps=$((steps / 4 > 10 ? steps / 4 : 10))

# Everything but the batch layout and the devices is the same for every run. decay_steps fixed
# so that every run follows one schedule whatever its max_steps (as backend_parity.sh).
common=(--config configs/mamba-125m.yaml --train.out_dir "$out" --overwrite
        --optim.decay_steps 20000 --trainer.log_every_n_steps "$log_every" --train.eval_every 100000
        --train.ckpt_every 100000 --train.sample_bytes 0 --trainer.enable_progress_bar false
        --trainer.enable_model_summary false "${size[@]}")
one_gpu=(--trainer.devices 1 --trainer.strategy auto)

# train NAME ARGS...: one run, its output in OUT_DIR/NAME.log; a failed run stops the script.
train() {
  local name=$1
  shift
  local start=$SECONDS status=0
  echo "== $name: ${launcher[*]} $*" >&2
  "${launcher[@]}" "$@" > "$out/$name.log" 2>&1 || status=$?
  if (( status )); then
    echo "error: run $name failed (exit $status); the end of $out/$name.log:" >&2
    tail -n 25 "$out/$name.log" >&2
    exit "$status"
  fi
  echo "$name $((SECONDS - start))" >> "$out/wall_seconds.txt"
  echo "== $name: done in $((SECONDS - start)) s" >&2
}

: > "$out/wall_seconds.txt"
train one "${common[@]}" --name one --trainer.max_steps "$steps" \
  --data.batch_size $((2 * m)) "${one_gpu[@]}"
train one-accum "${common[@]}" --name one-accum --trainer.max_steps "$accum_steps" \
  --data.batch_size "$m" --trainer.accumulate_grad_batches 2 "${one_gpu[@]}"
train ddp "${common[@]}" --name ddp --trainer.max_steps "$steps" \
  --data.batch_size "$m" --trainer.devices 2 --trainer.strategy ddp
train fsdp "${common[@]}" --name fsdp --trainer.max_steps "$steps" --train.ckpt_every "$half" \
  --data.batch_size "$m" --trainer.devices 2 --trainer.strategy fsdp

# The resumed run gets a directory of its own holding the FSDP run's config, logs and step-half
# checkpoint (hard links where possible: checkpoints are never rewritten, only new ones added),
# so that fsdp keeps its whole 2-GPU curve. --resume continues from the newest checkpoint there.
resume=$out/fsdp-resume
rm -rf "$resume"
mkdir -p "$resume/checkpoints" "$resume/logs"
cp "$out/fsdp/config.yaml" "$resume/"
cp "$out/fsdp/logs/metrics.csv" "$resume/logs/"  # a copy: the resumed run appends to it
ckpt=$(printf 'step%07d.ckpt' "$half")
if [[ ! -f $out/fsdp/checkpoints/$ckpt ]]; then
  echo "error: the FSDP run wrote no $ckpt; its checkpoints: $(ls "$out/fsdp/checkpoints")" >&2
  exit 1
fi
for f in "$ckpt" "$ckpt.json"; do
  ln "$out/fsdp/checkpoints/$f" "$resume/checkpoints/$f" 2>/dev/null ||
    cp "$out/fsdp/checkpoints/$f" "$resume/checkpoints/$f"
done
train fsdp-resume --resume "$resume" --trainer.max_steps "$steps" --data.batch_size $((2 * m)) \
  "${one_gpu[@]}"

"$python" benchmarks/multi_gpu_report.py "$out" --steps "$steps" --resume-step "$half" \
  --command "$command" | tee "$out/report.md"
