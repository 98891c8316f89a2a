#!/usr/bin/env bash
# Training speed: mtlz-retrain's step (mtlz bench --train) vs the same step in
# PyTorch (Debian python3-torch) on the same model, machine, threads and
# batch, in one run. Prints spectra/s, the projected seconds per epoch of
# 60,000 spectra (the paper's training split) and the ratio (issue #6
# target: >= 1.5x). mtlz runs twice: its default channels-last trunk and
# the im2col + OpenBLAS trunk it replaced (MTLZ_TRAIN_TRUNK=im2col).
#
# usage: bench/train_vs_torch.sh [SECONDS_PER_CONFIG (default 20)] [BATCH (128)]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
batch=${2:-128}
[ -x build/tools/mtlz ] || { tools/install-deps.sh && tools/build.sh build; }
model=$(mktemp -d)/bench.safetensors
build/tools/mtlz init -o "$model" --seed 1 2>/dev/null
ncpu=$(nproc)
threads="1"
[ "$ncpu" -gt 1 ] && threads="1,$ncpu"
echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $ncpu cores"
ours=$(build/tools/mtlz bench -m "$model" --train --threads "$threads" --batch "$batch" \
	--seconds "$secs")
echo "$ours"
old=$(MTLZ_TRAIN_TRUNK=im2col build/tools/mtlz bench -m "$model" --train --threads "$threads" \
	--batch "$batch" --seconds "$secs")
echo "$old"
theirs=$(/usr/bin/python3 bench/torch_train.py --model "$model" --threads "$threads" \
	--batch "$batch" --seconds "$secs")
echo "$theirs"
echo "# side by side, batch $batch"
for t in ${threads//,/ }; do
	a=$(echo "$ours" | sed -n "s/^train engine=cpu .* threads=$t batch=$batch: \([0-9.]*\) spectra\/s.*/\1/p")
	c=$(echo "$old" | sed -n "s/^train engine=cpu .* threads=$t batch=$batch: \([0-9.]*\) spectra\/s.*/\1/p")
	b=$(echo "$theirs" | sed -n "s/^torch train device=cpu threads=$t batch=$batch: \([0-9.]*\) spectra\/s.*/\1/p")
	awk -v t="$t" -v a="$a" -v b="$b" -v c="$c" 'BEGIN {
		if (a == "" || b == "" || c == "") { print "threads=" t ": a run printed no rate"; exit 1 }
		printf "threads=%s: mtlz %.1f spectra/s (%.0f s/epoch of 60000), torch %.1f spectra/s (%.0f s/epoch), ratio %.2fx; im2col trunk %.1f spectra/s (%.2fx torch)\n",
			t, a, 60000 / a, b, 60000 / b, a / b, c, c / b }'
done
rm -rf "$(dirname "$model")"
