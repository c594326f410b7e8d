#!/usr/bin/env bash
# Loss curves of the 125M byte Mamba (configs/mamba-125m.yaml) at 8192 bytes of context with the
# fused Triton scan and with the plain-PyTorch reference scan: same seed, same data, same steps.
# Batch 1 so that the reference (which holds (length, batch, channels, state) fp32 tensors)
# fits in memory; everything else is the config as shipped (bf16-mixed on the GPU).
#   bash benchmarks/backend_parity.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:?usage: backend_parity.sh OUT_DIR [STEPS]}
steps=${2:-200}
for backend in triton ref; do
  python train.py --config configs/mamba-125m.yaml --name "parity-$backend" --overwrite \
    --train.out_dir "$out" --model.scan_backend "$backend" --data.batch_size 1 \
    --trainer.max_steps "$steps" --optim.decay_steps 20000 --trainer.log_every_n_steps 1 \
    --train.eval_every 100000 --train.ckpt_every 100000 --data.val_bytes 65536 \
    --train.sample_bytes 200 --trainer.enable_progress_bar false
done
python benchmarks/compare_curves.py "$out/parity-triton" "$out/parity-ref" --every 20
