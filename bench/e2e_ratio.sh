#!/usr/bin/env bash
# The end-to-end / engine-only throughput ratio of bench/e2e.sh, K times
# (one run differs from the next by up to ~10 % on a shared 2-core
# machine): each run prints its ratio; then the median and range, with the
# dev broker and result reader at the daemon's priority and, alternating
# with those runs, at nice 19 (INFRA_NICE; close to production, where the
# broker runs elsewhere).
#
# usage: bench/e2e_ratio.sh [K (default 6)] [N (default 4000)] [THREADS] [MC]
# environment: NICES="0 19" (default) the nice levels to alternate; "0"
#              runs only the broker and reader at the daemon's priority
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-6}
N=${2:-4000}
T=${3:-$(nproc)}
MC=${4:-100}
NICES=${NICES:-0 19}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq "$K"); do
	for nice in $NICES; do
		r=$(INFRA_NICE=$nice bench/e2e.sh "$N" "$T" "$MC" 0 2>&1 | grep '^e2e/engine') ||
			{ echo "run $i nice $nice: no ratio"; continue; }
		echo "run $i, broker and reader at nice $nice: $r"
		echo "$nice $(echo "$r" | awk '{ print $4 }')" >> "$out"
	done
done
for nice in $NICES; do
	awk -v n="$nice" '$1 == n { print $2 }' "$out" | sort -n | awk -v n="$nice" '
		{ v[NR] = $1 } END { if (NR) printf "broker and reader at nice %s: median %.2f, range %.2f-%.2f over %d runs\n", n,
			NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2, v[1], v[NR], NR }'
done
