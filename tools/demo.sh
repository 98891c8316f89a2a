#!/usr/bin/env bash
# The main job on the bundled sample data, end to end through Kafka:
#   1. start the embedded dev broker (librdkafka's mock cluster, loopback),
#   2. start mtlzd (etc/mtlzd.yaml, pointed at it) with the shipped default
#      model (models/default.safetensors; models/README.md says how it was
#      trained and how well it does),
#   3. replay the bundled real SDSS, BOSS and DESI spectra (tests/data) as
#      Avro with mtlz-replay,
#   4. read the results back from the output topic and print them,
#   5. replay the 768 labelled SDSS DR18 spectra of the sample training
#      archive (data/sdss-atlas/archive, docs/labels.md) and summarise the
#      results (count, rate, latency).
# Installs the Debian packages and builds first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
tools/build.sh build
B=build
work=$(mktemp -d)
cleanup() {
	[ -n "${daemon_pid:-}" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
	[ -n "${broker_pid:-}" ] && kill -TERM "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
export MTLZ_SCHEMA_DIR="$PWD/schemas"

$B/tools/mtlz-devbroker --partitions 4 > "$work/broker.out" 2> "$work/broker.log" &
broker_pid=$!
for _ in $(seq 100); do grep -q '^bootstrap=' "$work/broker.out" && break; sleep 0.1; done
brokers=$(sed -n 's/^bootstrap=//p' "$work/broker.out")
echo "== dev broker at $brokers"

# model.path is empty in etc/mtlzd.yaml: the daemon takes the default model
# and logs which file (event=default_model)
$B/daemon/mtlzd --config etc/mtlzd.yaml --set kafka.brokers="$brokers" \
	--set batch.max_delay_ms=20 \
	--set status.interval_ms=2000 2> "$work/mtlzd.log" &
daemon_pid=$!

files=(tests/data/spec-*.fits tests/data/coadd-*.fits)
echo "== replaying ${#files[@]} real spectrum files"
$B/tools/mtlz-replay --brokers "$brokers" --topic spectra "${files[@]}"

echo "== results from topic 'results'"
$B/tools/mtlz consume --brokers "$brokers" --topic results --count "${#files[@]}" --timeout 30
echo "== replaying the sample training archive (768 SDSS DR18 spectra)"
$B/tools/mtlz-replay --brokers "$brokers" --topic spectra data/sdss-atlas/archive
echo "== all results so far (topic 'results'): summary"
$B/tools/mtlz consume --brokers "$brokers" --topic results --stats --timeout 10
echo "== mtlzd log"
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=
cat "$work/mtlzd.log"
