# bench/lib.sh - sourced by bench/e2e.sh, bench/backlog_rss.sh and bench/soak_rss.sh (bash):
# bench_init builds the tree into build/ when $B has no daemon yet, exports
# MTLZ_SCHEMA_DIR, lists the bundled real spectra in $files, and makes a
# temporary folder $work, an empty list $pids of
# background processes (a script appends what it starts) that are stopped
# in reverse order at exit (daemons before their brokers) before $work is
# removed, and a random untrained model $model (needs $B, the build folder).
# bench_broker starts a dev broker and sets $bootstrap and $broker_pid.
bench_cleanup() {
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[i]}" 2>/dev/null || true   # may have exited: go on (set -e)
		wait "${pids[i]}" 2>/dev/null || true
	done
	rm -rf "$work"
}

bench_init() {
	[ -x "$B/daemon/mtlzd" ] || { tools/install-deps.sh && tools/build.sh build; }
	export MTLZ_SCHEMA_DIR="$PWD/schemas"
	files=(tests/data/spec-*.fits tests/data/coadd-*.fits)   # the bundled real spectra
	work=$(mktemp -d)
	pids=()
	trap bench_cleanup EXIT
	model=$work/model.safetensors
	"$B/tools/mtlz" init -o "$model" --seed 1 2>/dev/null
}

# bench_broker PARTITIONS [TAG]: a dev broker with PARTITIONS partitions a
# topic; sets $bootstrap (HOST:PORT) and $broker_pid. Not in a subshell:
# the cleanup must know the pid.
bench_broker() {
	${INFRA_NICE:+nice -n "$INFRA_NICE"} "$B/tools/mtlz-devbroker" --partitions "$1" > "$work/broker${2:-}.out" 2>/dev/null &
	broker_pid=$!
	pids+=($broker_pid)
	for _ in $(seq 100); do grep -q '^bootstrap=' "$work/broker${2:-}.out" && break; sleep 0.1; done
	bootstrap=$(sed -n 's/^bootstrap=//p' "$work/broker${2:-}.out")
}
