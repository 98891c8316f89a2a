#!/usr/bin/env bash
# Does mtlzd's memory creep? A long steady stream through the dev broker:
# mtlz-replay sends the bundled real SDSS/DESI spectra in a loop at RATE
# spectra/s (below the engine's capacity, so there is no backlog) for
# SECONDS; mtlzd (CPU engine) classifies them. Every INTERVAL seconds the
# daemon's VmRSS and its result count (from its status line) are sampled.
# Prints the samples, then the least-squares slope of RSS against results
# over the second half of the run (after warm-up, caches and librdkafka's
# buffers have filled), in MB per million results, each quarter's minimum
# and mean RSS, and the first/last/peak RSS. (bench/backlog_rss.sh measures the other case: a backlog drained as
# fast as the engine goes.)
#
# usage: bench/soak_rss.sh [SECONDS (600)] [RATE (500)] [THREADS (all cores)]
#                          [MC (10)] [INTERVAL (10)]
# environment: B=build folder (build)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-600}
RATE=${2:-500}
T=${3:-$(nproc)}
MC=${4:-10}
IV=${5:-10}
B=${B:-build}
. bench/lib.sh
bench_init

bench_broker 16
$B/daemon/mtlzd --config etc/mtlzd.yaml --set kafka.brokers="$bootstrap" \
	--set model.path="$model" --set engine.kind=cpu --set engine.threads="$T" \
	--set engine.mc_samples="$MC" --set batch.max_size=64 --set batch.max_delay_ms=50 \
	--set log.level=info --set status.interval_ms=$((IV * 1000 / 2)) \
	2> "$work/mtlzd.log" &
pids+=($!)
daemon=$!
sleep 8   # group join on the mock cluster takes a few seconds
$B/tools/mtlz-replay --brokers "$bootstrap" --topic spectra --loop --count $((RATE * D)) \
	--rate "$RATE" "${files[@]}" > "$work/replay.log" 2>&1 &
pids+=($!)
replay=$!

echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; ${D} s at ${RATE} spectra/s," \
	"engine threads=$T mc=$MC batch=64; sample every ${IV} s"
echo "# t_s results rss_kb"
t0=$(date +%s)
samples=$work/samples
: > "$samples"
while kill -0 "$replay" 2>/dev/null; do
	sleep "$IV"
	kill -0 "$daemon" 2>/dev/null || { echo "mtlzd exited:"; tail -5 "$work/mtlzd.log"; exit 1; }
	rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/"$daemon"/status)
	res=$(grep 'event=status' "$work/mtlzd.log" | tail -1 | sed -n 's/.* results=\([0-9]*\).*/\1/p')
	echo "$(($(date +%s) - t0)) ${res:-0} $rss" | tee -a "$samples"
done
tail -1 "$work/replay.log"
echo "daemon: $(grep 'event=status' "$work/mtlzd.log" | tail -1 | grep -o 'results=[0-9]* dead_letter=[0-9]*')"
echo "peak RSS (VmHWM): $(sed -n 's/^VmHWM:[[:space:]]*//p' /proc/"$daemon"/status)"
# RSS swings by several MB with the batch and fetch buffers in use at the
# sampling instant, so a trend shows best in each quarter's minimum (the
# resting level) and mean, next to the least-squares slope of the second half
awk '{ t[NR] = $1; r[NR] = $2; m[NR] = $3 / 1024; n = NR }
END {
	if (n < 8) { print "too few samples"; exit 1 }
	printf "RSS first %.1f MB, last %.1f MB; results %d -> %d\n", m[1], m[n], r[1], r[n]
	for (q = 0; q < 4; q++) {
		lo = int(q * n / 4) + 1; hi = int((q + 1) * n / 4); mn = 1e9; s = 0
		for (i = lo; i <= hi; i++) { s += m[i]; if (m[i] < mn) mn = m[i] }
		printf "quarter %d (results %d -> %d): min %.1f MB, mean %.1f MB\n", q + 1, r[lo], r[hi], mn, s / (hi - lo + 1)
	}
	h = int(n / 2) + 1; k = 0; sx = sy = sxx = sxy = 0
	for (i = h; i <= n; i++) { x = r[i] / 1e6; k++; sx += x; sy += m[i]; sxx += x * x; sxy += x * m[i] }
	d = k * sxx - sx * sx
	if (d > 0)
		printf "second half (%d samples): least-squares slope %.2f MB per million results\n", k, (k * sxy - sx * sy) / d
}' "$samples"
