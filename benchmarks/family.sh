#!/usr/bin/env bash
# The English compute-matched family (configs/english/*.yaml) on one GPU, then the evaluation
# suite on every run and one comparison report:
#
#   cat ../shared/corpora/shakespeare/*.txt ../shared/corpora/war_and_peace.txt > english.txt
#   benchmarks/family.sh english.txt family            # runs in family/runs, report in family/report
#
# Every member in MEMBERS (default: all of configs/english/) trains once with seed 1337;
# byte-mamba and bpe-transformer also with the seeds in EXTRA_SEEDS (default "1 2") to show the
# spread. All runs start at once (small models leave the GPU mostly idle one at a time), and so
# do the evaluations. MEMBERS and EXTRA_SEEDS split the family over several calls of a time-
# limited machine (e.g. MEMBERS="" EXTRA_SEEDS="1 2" for the extra seeds alone). A smoke test,
# not the experiment: MAX_STEPS=N shortens every run, EXTRA_ARGS adds train.py overrides to every
# run (e.g. a tiny model on the CPU) and BPE_VOCAB changes the BPE members' vocabulary.
# Evaluation per run: eval.bpb, eval.probes (--n PROBES_N), eval.robustness, on the GPU.
# Wall times of each phase go to OUT_DIR/logs/times.txt.
set -euo pipefail

corpus=${1:?usage: benchmarks/family.sh CORPUS OUT_DIR}
out=${2:?usage: benchmarks/family.sh CORPUS OUT_DIR}
extra_seeds=${EXTRA_SEEDS-"1 2"}
members=${MEMBERS-"byte-mamba byte-transformer byte-hybrid-3to1 bpe-transformer bpe-mamba"}
probes_n=${PROBES_N:-100}
bpe_vocab=${BPE_VOCAB:-4096}    # the BPE members' vocabulary (the configs plan for 4096)
device=${DEVICE:-cuda}
[ -f "$corpus" ] || { echo "error: corpus $corpus not found (see the comment at the top)" >&2; exit 2; }
corpus=$(realpath "$corpus")
out=$(realpath -m "$out")
cd "$(dirname "$0")/.."
mkdir -p "$out/logs"
for m in $members; do
    [ -f "configs/english/$m.yaml" ] || { echo "error: MEMBERS names $m; no configs/english/$m.yaml" >&2; exit 2; }
done
[ -n "$members$extra_seeds" ] || { echo "error: MEMBERS and EXTRA_SEEDS are both empty" >&2; exit 2; }
start=$SECONDS
phase() { echo "$1: $((SECONDS - start)) s" >> "$out/logs/times.txt"; }

# one prepared copy (byte shards + the BPE of the training split) shared by every run, so
# that concurrent runs do not prepare the same cache
python -m data.prepare --data "$corpus" --out "$out/prepared" --bpe-vocab "$bpe_vocab" \
    > "$out/logs/prepare.log" 2>&1 || { echo "data.prepare failed: $out/logs/prepare.log" >&2; exit 1; }
phase prepared

extra=()
[ -n "${MAX_STEPS:-}" ] && extra+=(--trainer.max_steps "$MAX_STEPS")
read -r -a more <<< "${EXTRA_ARGS:-}"
extra+=(${more[@]+"${more[@]}"})
pids=()
names=()
launch() {  # config seed
    local name
    name=$(basename "$1" .yaml)-s$2
    python train.py --config "$1" --data.source "$corpus" --data.prepared_dir "$out/prepared" \
        --data.bpe_vocab_size "$bpe_vocab" --seed "$2" --name "$name" --train.out_dir "$out/runs" \
        --trainer.enable_progress_bar false \
        --overwrite ${extra[@]+"${extra[@]}"} > "$out/logs/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
}
for m in $members; do launch "configs/english/$m.yaml" 1337; done
for seed in $extra_seeds; do
    launch configs/english/byte-mamba.yaml "$seed"
    launch configs/english/bpe-transformer.yaml "$seed"
done
failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then echo "run ${names[$i]} failed: $out/logs/${names[$i]}.log" >&2; failed=1; fi
done
[ "$failed" = 0 ] || exit 1

phase trained

evaluate() {  # run name: the three evaluations one after another
    local log="$out/logs/eval-$2.log" ev
    for ev in "eval.bpb" "eval.probes --n $probes_n" "eval.robustness"; do
        # shellcheck disable=SC2086  # ev holds the module and its options
        python -m $ev --ckpt "$1" --device "$device" > /dev/null 2>> "$log" \
            || { echo "$ev failed on $2: $log" >&2; return 1; }
    done
}
runs=()
pids=()
for name in "${names[@]}"; do
    runs+=("$out/runs/$name")
    evaluate "$out/runs/$name" "$name" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || exit 1
phase evaluated
python -m eval.compare "${runs[@]}" --out "$out/report" > /dev/null 2>> "$out/logs/compare.log" \
    || { echo "eval.compare failed: $out/logs/compare.log" >&2; exit 1; }
phase compared
cat "$out/report/compare.md"
