#!/usr/bin/env bash
# End-to-end benchmark of mtlzd through the embedded dev broker, next to the
# engine-only throughput of `mtlz bench` at the same threads, batch and
# MC-dropout passes, in one run.
#
#   throughput: N spectra are produced first (a backlog), then mtlzd starts
#               and drains it: rate = results between the first and the last
#               processed_at. Target (issue #4): >= 90 % of engine-only.
#               The dev broker (librdkafka's mock cluster) keeps only ~5 MB
#               per partition and silently drops older messages, so the
#               topic gets 64 partitions (~320 MB) and N stays <= 4000
#               (~46-93 KB per spectrum); see docs/daemon.md.
#   latency:    a fresh broker and daemon, spectra produced at a steady
#               --rate well below capacity; latency = result processed_at -
#               input message timestamp (p50 / p99).
#
# usage: bench/e2e.sh [N (default 4000)] [THREADS (default: all cores)]
#                     [MC (default 100)] [LATENCY_RATE (default 200)]
# environment: ENGINE=cpu|cuda|auto (default cpu), B=build folder (build)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4000}
T=${2:-$(nproc)}
MC=${3:-100}
RATE=${4:-200}
B=${B:-build}
ENGINE=${ENGINE:-cpu}
. bench/lib.sh
bench_init

start_daemon() {
	$B/daemon/mtlzd --config etc/mtlzd.yaml --set kafka.brokers="$1" --set model.path="$model" \
		--set engine.kind="$ENGINE" --set engine.threads="$T" --set engine.mc_samples="$MC" --set batch.max_size=64 \
		--set batch.max_delay_ms=50 --set log.level=info --set status.interval_ms=100000 \
		--set kafka.consumer.fetch.wait.max.ms=10 ${EXTRA:-} 2> "$work/mtlzd$2.log" &
	pids+=($!)
}

# CPU seconds (user + system) a process has used so far
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' /proc/"$1"/stat; }

echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; N=$N threads=$T mc=$MC batch=64"
engine=$($B/tools/mtlz bench -m "$model" --engine "$ENGINE" --threads "$T" --batch 64 --mc "$MC" --seconds 5 --no-preprocess | grep '^engine')
echo "$engine"
engine_rate=$(echo "$engine" | sed 's/.*: \([0-9.]*\) spectra\/s/\1/')

bench_broker 64 1
b1=$bootstrap
$B/tools/mtlz-replay --brokers "$b1" --topic spectra --loop --count "$N" "${files[@]}" \
	> "$work/replay.log" 2>&1 || { cat "$work/replay.log"; exit 1; }
broker_cpu0=$(cpu_s "$broker_pid")
start_daemon "$b1" 1
tp=$($B/tools/mtlz consume --brokers "$b1" --count "$N" --timeout 30 --stats 2>"$work/consume1.log") || true
echo "e2e backlog of $N: $tp"
# where the cores went, daemon start to last result (startup included)
echo "cpu seconds: daemon $(cpu_s "${pids[-1]}"), dev broker $(awk -v a="$(cpu_s "$broker_pid")" -v b="$broker_cpu0" 'BEGIN { printf "%.2f", a - b }')"
e2e_rate=$(echo "$tp" | sed 's/.*rate=\([0-9.]*\) results.*/\1/')
awk -v a="$e2e_rate" -v b="$engine_rate" 'BEGIN { printf "e2e/engine throughput ratio: %.2f (%.1f / %.1f spectra/s)\n", a / b, a, b }'
echo "daemon peak RSS: $(sed -n 's/^VmHWM: *//p' /proc/"${pids[-1]}"/status)"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
echo "daemon time split: $(grep 'event=status' "$work/mtlzd1.log" | tail -1 | grep -o 'consume_busy_ms.*')"

bench_broker 64 2
b2=$bootstrap
start_daemon "$b2" 2
sleep 8   # group join on the mock cluster takes a few seconds
NL=$((RATE * 10))
$B/tools/mtlz-replay --brokers "$b2" --topic spectra --loop --count "$NL" --rate "$RATE" "${files[@]}" > "$work/replay.log" 2>&1 || { cat "$work/replay.log"; exit 1; }
lat=$($B/tools/mtlz consume --brokers "$b2" --count "$NL" --timeout 30 --stats 2>"$work/consume2.log") || true
echo "e2e at $RATE spectra/s: $lat"
