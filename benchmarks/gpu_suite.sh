#!/usr/bin/env bash
# Every kernel and model measurement of benchmarks/results/ in one go on one GPU, each stage
# with its own time limit, logs and tables under OUT_DIR (at most 9.5 minutes: the limits add up
# to 565 s, so the whole suite fits one 10-minute device call; on 2026-11-29 tests, profile,
# scan and throughput took 69, 19, 21 and 107 s; generation, conv1d and RMSNorm ran past the
# 50, 20 and 20 s they had then):
#
#   benchmarks/gpu_suite.sh OUT_DIR [PEER_SO]
#
# In order of what matters most if time runs short: 1. the Triton kernel tests at GPU sizes;
# 2. where a training step's time goes (profile); 3. the scan on the mixer's layout (against
# mamba_ssm's CUDA scan if PEER_SO, a built selective_scan_cuda extension, is given);
# 4. training throughput, Mamba vs Transformer, 90M and 350M at 2K/8K/32K; 5. generation speed
# and memory; 6. conv1d and RMSNorm. A stage that fails or runs out of time is reported and
# the next one runs. Each stage's wall time goes to OUT_DIR/times.txt.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [PEER_SO]}
peer=${2:-}
mkdir -p "$out"
out=$(realpath "$out")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

stage() {  # name seconds command...
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    local began=$SECONDS
    if ! timeout "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log"; then
        echo "   $name failed or timed out: $out/$name.log" >&2
        status=1
    fi
    echo "$name: $((SECONDS - began)) s (limit $limit s)" >> "$out/times.txt"
}

xdist=()
python -c "import xdist" 2> /dev/null && xdist=(-n 8)
stage tests 90 python -m pytest -q ${xdist[@]+"${xdist[@]}"} tests/test_triton_scan.py \
    tests/test_triton_conv1d.py tests/test_triton_rms_norm.py tests/test_triton_add_rms_norm.py \
    tests/test_triton_mixer.py tests/test_triton_rotary_swiglu.py tests/test_ssd.py \
    tests/test_channel_major.py tests/test_cuda_graph.py tests/test_graphed_loss.py \
    tests/test_metrics.py
stage profile 30 python benchmarks/profile_step.py --context 8192 --top 20
peer_args=()
[ -n "$peer" ] && peer_args=(--peer-so "$peer")
stage scan 45 python benchmarks/scan.py --layout channel-major ${peer_args[@]+"${peer_args[@]}"}
stage throughput 150 python benchmarks/throughput.py --sizes 90m,350m --steps 6
stage generate 130 python benchmarks/generate.py
stage conv1d 60 python benchmarks/conv1d.py --layout channel-major
stage rms_norm 60 python benchmarks/rms_norm.py
stage add_norm 60 python benchmarks/rms_norm.py --op add-norm
stage transformer_ops 60 python benchmarks/transformer_ops.py
stage ssd 90 python benchmarks/ssd.py
exit $status
