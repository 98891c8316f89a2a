# bench/lib.sh - sourced by bench/e2e.sh and bench/backlog_rss.sh (bash):
# bench_init makes a temporary folder $work, an empty list $pids of
# background processes (a script appends what it starts) that are stopped
# in reverse order at exit (daemons before their brokers) before $work is
# removed, and a random untrained model $model (needs $B, the build folder).
bench_cleanup() {
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[i]}" 2>/dev/null; wait "${pids[i]}" 2>/dev/null
	done
	rm -rf "$work"
}

bench_init() {
	work=$(mktemp -d)
	pids=()
	trap bench_cleanup EXIT
	model=$work/model.safetensors
	"$B/tools/mtlz" init -o "$model" --seed 1 2>/dev/null
}
