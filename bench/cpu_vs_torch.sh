#!/usr/bin/env bash
# CPU engine vs PyTorch (Debian python3-torch, oneDNN) on the same model
# file, same machine, same thread counts and batch size, in one run.
# Prints each side's spectra/s and the ratio; targets (issue #3): >= 1.5x at
# 1 thread and >= 2x at 2 threads, batch 64. Also batch-1 latency.
#
# usage: bench/cpu_vs_torch.sh [SECONDS_PER_CONFIG (default 5)]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
[ -x build/tools/mtlz ] || { tools/install-deps.sh && tools/build.sh build; }
model=$(mktemp -d)/bench.safetensors
build/tools/mtlz init -o "$model" --seed 1 2>/dev/null
ncpu=$(nproc)
threads="1"
[ "$ncpu" -gt 1 ] && threads="1,$ncpu"

echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $ncpu cores"
echo "# mtlz: $(build/tools/mtlz --version)"
mtlz_out=$(build/tools/mtlz bench -m "$model" --threads "$threads" --batch 1,64 \
	--seconds "$secs" --no-preprocess)
echo "$mtlz_out"
torch_out=$(/usr/bin/python3 bench/bench_torch.py --model "$model" --threads "$threads" \
	--batch 64 --seconds "$secs" --latency)
echo "$torch_out"
echo "# side by side, batch 64"
for t in ${threads//,/ }; do
	ours=$(echo "$mtlz_out" | sed -n "s/.*threads=$t .*batch=64 .*: \([0-9.]*\) spectra\/s/\1/p")
	theirs=$(echo "$torch_out" | sed -n "s/^torch threads=$t batch=64: \([0-9.]*\) spectra\/s/\1/p")
	awk -v t="$t" -v a="$ours" -v b="$theirs" 'BEGIN {
		printf "threads=%s batch=64: mtlz %.1f spectra/s, torch %.1f spectra/s, ratio %.2fx\n", t, a, b, a / b }'
done
echo "# batch-1 latency"
echo "$mtlz_out" | sed -n 's/.*threads=\([0-9]*\) .*batch=1 .*p50_ms=\([0-9.]*\) p99_ms=\([0-9.]*\).*/mtlz threads=\1 batch=1 latency: p50=\2 ms p99=\3 ms/p'
echo "$torch_out" | grep latency || true
rm -rf "$(dirname "$model")"
