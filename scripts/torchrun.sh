#!/usr/bin/env bash
# Train with torchrun on this node's GPUs, or on several nodes (run it on each); arguments go to
# train.py, and the same command restarts a stopped run when it includes --resume auto:
#     scripts/torchrun.sh --config configs/mamba-125m.yaml --resume auto
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun.sh --config ... --resume auto  # node0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/torchrun.sh --config ... --resume auto  # node1
# NPROC_PER_NODE: processes (GPUs) per node, default all GPUs; MASTER_PORT default 29500;
# PYTHON: the interpreter, default python.
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NPROC_PER_NODE" -lt 1 ]; then
    echo "error: no GPU found; set NPROC_PER_NODE (and --trainer.accelerator cpu for CPUs)" >&2
    exit 2
fi
if [ "$NNODES" -eq 1 ]; then
    rendezvous=(--standalone)
else
    rendezvous=(--node-rank "${NODE_RANK:?set NODE_RANK on every node}"
                --master-addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}"
                --master-port "${MASTER_PORT:-29500}")
fi
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" "${rendezvous[@]}" \
    train.py --trainer.devices "$NPROC_PER_NODE" --trainer.num_nodes "$NNODES" "$@"
