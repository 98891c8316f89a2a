#!/usr/bin/env bash
# Memory of mtlzd draining a large backlog (issue #4: "memory stays bounded
# whatever the backlog", target RSS <= 256 MB with a 1,000,000-message
# backlog on the CPU engine).
#
# What it does:
#   1. starts the dev broker (mtlz-devbroker) with P partitions per topic;
#   2. produces a backlog of N tiny but valid spectra and checks that the
#      broker kept every one of them (on every partition low watermark 0,
#      high watermarks summing to N, via kcat; each message read back once);
#   3. starts mtlzd on the CPU engine (batch 64, MC passes MC) and lets it
#      drain the backlog, sampling its VmRSS (and the broker's) about once a
#      second;
#   4. reports drain time, results and dead letters (daemon status line and
#      the output topics' watermarks, then every result decoded with
#      `mtlz consume`), peak RSS (VmHWM) and min / median / max RSS.
#
# Why tiny messages and many partitions: the dev broker is librdkafka
# 2.0.2's mock cluster, which keeps at most 5 MiB of record batches and at
# most 100,000 record batches per partition and silently drops the oldest
# batches beyond that (src/rdkafka_mock.c, rd_kafka_mock_msgset_new: max_size
# 5 MiB, max_cnt 100000). Real spectra (46-93 KB) allow ~100 per partition,
# so a 1,000,000-message backlog must be made of small messages spread over
# many partitions. Each spectrum here is the smallest that preprocessing
# accepts: 2 pixels on a linear grid at 3840 and 9000 A (coverage 100 %;
# flagged LARGE_GAP, not rejected), 62-69 bytes of single-object Avro. The
# results (~140 bytes + key + 3 headers, ~300 bytes a record) go to a topic
# with the same partition count, so N/P * 300 B must stay well under 5 MiB
# too: P=256 for N=1,000,000 (~1.2 MB of results, ~0.3 MB of input per
# partition). The engine's work does not depend on the input size (every
# spectrum becomes 5161 floats), so the daemon's own buffers are those of
# real spectra; librdkafka's per-message overhead weighs relatively more,
# which is the harder case for the prefetch bound (queued.max.messages.kbytes
# counts payload bytes).
#
# Producer (PRODUCER=bulk, the default): the mock answers a Fetch with one
# record batch per partition (rdkafka_mock_handlers.c, "FIXME: Multiple
# messageSets?"), a real broker with up to max.partition.fetch.bytes (1 MB)
# per partition and fetch.max.bytes (50 MB) in all. To get fetches as large
# as a real broker's, every message is queued in librdkafka before the first
# batch is sent (linger.ms 60 s, then flush), so each partition holds one
# batch of up to 10,000 messages / 1 MB (~3,900 messages, ~300 KB at N=1M,
# P=256) and a Fetch may bring ~50 MB, ~650,000 messages (librdkafka's
# fetch.max.bytes; mtlzd now caps it at 4 MB). mtlz-replay
# does not: paced and with linger.ms=5 by default, its batches hold ~30
# messages. PRODUCER=replay uses `mtlz-replay --loop` (small fetches).
# PRODUCER=real replays the bundled real spectra instead (tests/data: four
# SDSS spec files and the DESI coadd, 46-93 KB each) with `mtlz-replay
# --loop`: the backlog the prefetch bound meets in production, limited by
# the mock's 5 MiB a partition to ~50 spectra a partition (N=12000 with
# P=256).
# COMPRESSION=lz4|zstd|gzip|snappy (bulk only) compresses the batches, as a
# pipeline's producer may: fetch.max.bytes and max.partition.fetch.bytes
# then count compressed bytes and one Fetch can bring many more messages.
#
# usage: bench/backlog_rss.sh [N (default 1000000)]
# environment: B=build folder (build), P=partitions (256), MC=MC-dropout
#   passes (10), T=engine threads (all cores), PRODUCER=bulk|replay|real (bulk),
#   COMPRESSION (none),
#   MAX_S=longest drain before giving up (3600), STALL_S=no progress for
#   that long = stalled (120), EXTRA=more mtlzd options
# needs: kcat, python3 with the avro module (Debian kcat, python3-avro)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
B=${B:-build}
P=${P:-256}
MC=${MC:-10}
T=${T:-$(nproc)}
PRODUCER=${PRODUCER:-bulk}
COMPRESSION=${COMPRESSION:-none}
MAX_S=${MAX_S:-3600}
STALL_S=${STALL_S:-120}
command -v kcat >/dev/null || { echo "needs kcat (apt-get install kcat)" >&2; exit 2; }
/usr/bin/python3 -c 'import avro' 2>/dev/null ||
	{ echo "needs python3-avro (apt-get install python3-avro)" >&2; exit 2; }
. bench/lib.sh
bench_init

# 16 base spectra (spec_id bl0..bl15; pass k > 0 of the backlog sends
# "bl<i>#k": distinct ids and keys, as mtlz-replay --loop does)
if [ "$PRODUCER" = replay ]; then
	/usr/bin/python3 - "$PWD/schemas/spectrum.avsc" "$work/tiny.avro" <<'EOF'
import sys, avro.schema, avro.io, avro.datafile
schema = avro.schema.parse(open(sys.argv[1]).read())
with avro.datafile.DataFileWriter(open(sys.argv[2], "wb"), avro.io.DatumWriter(), schema) as w:
    for i in range(16):
        w.append({"spec_id": "bl%d" % i, "survey": "bench", "redshift": 0.05, "zwarning": 0,
                  "sn_median": None, "wavelength": {"start": 3840.0, "step": 5160.0},
                  "flux": [1.0 + 0.1 * i, 2.0], "ivar": None, "mask": None, "metadata": {}})
EOF
fi
# PRODUCER=bulk: the same messages as mtlz-replay would send (single-object
# Avro, key = spec_id, librdkafka's default partitioner), produced with
# librdkafka itself through ctypes, all queued before the first batch goes
# out (linger.ms 60 s, then flush), so that each partition's backlog is one
# record batch of up to 10,000 messages / 1 MB
cat > "$work/bulk.py" <<'EOF'
import ctypes, ctypes.util, io, os, sys, time
import avro.io, avro.schema

schema_path, bootstrap, topic, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
schema = avro.schema.parse(open(schema_path).read())
# single-object encoding: C3 01 + CRC-64-AVRO of the parsing canonical form (LE)
sys.path.insert(0, os.path.join(os.path.dirname(schema_path), "..", "tests"))
from third_party_reader import fingerprint
header = b"\xc3\x01" + fingerprint(schema_path).to_bytes(8, "little")

def enc(rec):
    buf = io.BytesIO()
    avro.io.DatumWriter(schema).write(rec, avro.io.BinaryEncoder(buf))
    return buf.getvalue()

def zz_str(s):  # Avro string: zigzag varint length + bytes
    b, v, out = s.encode(), len(s.encode()) << 1, bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out) + b

# 16 base spectra; spec_id is the first field, so a message is
# header + string(spec_id) + the rest of its base record's encoding
bases = []
for i in range(16):
    rec = {"spec_id": "bl%d" % i, "survey": "bench", "redshift": 0.05, "zwarning": 0,
           "sn_median": None, "wavelength": {"start": 3840.0, "step": 5160.0},
           "flux": [1.0 + 0.1 * i, 2.0], "ivar": None, "mask": None, "metadata": {}}
    full = enc(rec)
    assert full.startswith(zz_str(rec["spec_id"]))
    bases.append(full[len(zz_str(rec["spec_id"])):])

lib = ctypes.CDLL(ctypes.util.find_library("rdkafka") or "librdkafka.so.1")
lib.rd_kafka_conf_new.restype = ctypes.c_void_p
lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
lib.rd_kafka_new.restype = ctypes.c_void_p
lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
lib.rd_kafka_topic_new.restype = ctypes.c_void_p
lib.rd_kafka_topic_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
lib.rd_kafka_produce.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
lib.rd_kafka_poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
DR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p)
lib.rd_kafka_conf_set_dr_msg_cb.argtypes = [ctypes.c_void_p, DR]
counts = [0, 0]

def on_dr(rk, msg, opaque):  # rd_kafka_message_t starts with its error code
    counts[1 if msg[0] else 0] += 1

dr = DR(on_dr)
conf = lib.rd_kafka_conf_new()
err = ctypes.create_string_buffer(512)
for k, v in [("bootstrap.servers", bootstrap), ("enable.idempotence", "true"),
             ("linger.ms", "60000"), ("batch.num.messages", "10000"),
             ("queue.buffering.max.messages", "10000000")] + [a.split("=", 1) for a in sys.argv[5:]]:
    if lib.rd_kafka_conf_set(conf, k.encode(), v.encode(), err, 512) != 0:
        sys.exit("producer: %s" % err.value.decode())
lib.rd_kafka_conf_set_dr_msg_cb(conf, dr)
rk = lib.rd_kafka_new(0, conf, err, 512)
if not rk:
    sys.exit("producer: %s" % err.value.decode())
rkt = lib.rd_kafka_topic_new(rk, topic.encode(), None)
t0 = time.time()
for k in range(n):  # spec_id "bl<i>" then "bl<i>#<pass>", as mtlz-replay --loop
    i, p = k % 16, k // 16
    sid = "bl%d" % i if p == 0 else "bl%d#%d" % (i, p)
    v = header + zz_str(sid) + bases[i]
    while lib.rd_kafka_produce(rkt, -1, 2, v, len(v), sid.encode(), len(sid), None) != 0:
        lib.rd_kafka_flush(rk, 100)  # queue full (N > 10,000,000): send what is queued
    if k % 10000 == 0:
        lib.rd_kafka_poll(rk, 0)
t1 = time.time()
while lib.rd_kafka_outq_len(rk) > 0:
    lib.rd_kafka_flush(rk, 1000)  # flush sends at once, ignoring linger.ms
print("producer: queued %d in %.1f s, delivered=%d failed=%d in %.1f s" % (n, t1 - t0, counts[0], counts[1], time.time() - t0))
sys.exit(0 if counts[0] == n else 1)
EOF

rss_kb() { awk -v k="$2:" '$1 == k { v = $2 } END { print v + 0 }' /proc/"$1"/status 2>/dev/null || echo 0; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f MB", k / 1024 }'; }
# watermarks of topic $1 over its P partitions: prints "records (sum of high
# - low), partitions whose low watermark is > 0 (dropped batches), partitions
# answered (low), partitions answered (high), highest high watermark"
watermarks() {
	local lo=() hi=() p
	for ((p = 0; p < P; p++)); do lo+=(-t "$1:$p:-2"); hi+=(-t "$1:$p:-1"); done
	{ kcat -Q -b "$bootstrap" "${lo[@]}" | sed 's/^/lo /'
	  kcat -Q -b "$bootstrap" "${hi[@]}" | sed 's/^/hi /'; } |
		awk '$1 == "lo" && $NF != 0 { nz++ } $1 == "lo" { lo += $NF; nlo++ }
		     $1 == "hi" { hi += $NF; nhi++; if ($NF > max) max = $NF }
		     END { printf "%d %d %d %d %d\n", hi - lo, nz, nlo, nhi, max }'
}

echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; N=$N partitions=$P engine=cpu" \
	"threads=$T batch=64 mc=$MC; producer=$PRODUCER compression=$COMPRESSION${EXTRA:+; mtlzd $EXTRA}"

bench_broker "$P"

t0=$(date +%s.%N)
if [ "$PRODUCER" = replay ] || [ "$PRODUCER" = real ]; then
	src="$work/tiny.avro"
	[ "$PRODUCER" = real ] && src="tests/data/spec-0266-51602-0001.fits tests/data/spec-0266-51630-0174.fits
		tests/data/spec-0266-51602-0573.fits tests/data/spec-3586-55181-0003.fits
		tests/data/coadd-4-80613.fits"
	# shellcheck disable=SC2086
	$B/tools/mtlz-replay --brokers "$bootstrap" --topic spectra --loop --count "$N" \
		$src > "$work/replay.log" 2>&1 || { cat "$work/replay.log"; exit 1; }
	delivered=$(sed -n 's/.*delivered=\([0-9]*\).*/\1/p' "$work/replay.log" | tail -1)
else
	/usr/bin/python3 "$work/bulk.py" "$PWD/schemas/spectrum.avsc" "$bootstrap" spectra "$N" \
		compression.type="$COMPRESSION" > "$work/replay.log" 2>&1 || { cat "$work/replay.log"; exit 1; }
	delivered=$(sed -n 's/.*delivered=\([0-9]*\).*/\1/p' "$work/replay.log" | tail -1)
fi
t1=$(date +%s.%N)
awk -v n="$delivered" -v a="$t0" -v b="$t1" \
	'BEGIN { printf "backlog: produced %d spectra in %.1f s (%.0f/s)\n", n, b - a, n / (b - a) }'

# what the broker holds: watermarks (exact; low 0 = nothing dropped) and the
# payload (values + keys) read back once
read -r held lo_nz nlo nhi maxp <<< "$(watermarks spectra)"
kcat -C -b "$bootstrap" -t spectra -o beginning -e -q -f '%p %S %K\n' > "$work/in.txt"
awk -v P="$P" '{ n++; b += $2 + $3; pb[$1] += $2 + $3; if ($2 > vmax) vmax = $2 }
	END { for (p in pb) if (pb[p] > m) m = pb[p]
	      printf "broker: %d messages read back, %.1f MB of values + keys uncompressed (value <= %d B), " \
		     "largest partition %.2f MB of payload (mock limit 5 MiB of record batches)\n",
		     n, b / 1e6, vmax, m / 1e6 }' "$work/in.txt"
echo "broker watermarks: $held records over $nhi partitions, largest partition $maxp records," \
	"partitions with low watermark > 0 (dropped): $lo_nz of $nlo"
[ "$held" -eq "$N" ] && [ "$lo_nz" -eq 0 ] && [ "$delivered" -eq "$N" ] ||
	{ echo "FAIL: the broker does not hold the whole backlog (held=$held delivered=$delivered N=$N)"; exit 1; }
rm -f "$work/in.txt"
echo "dev broker RSS with the backlog: $(mb "$(rss_kb "$broker_pid" VmRSS)")"

$B/daemon/mtlzd --config etc/mtlzd.yaml --set kafka.brokers="$bootstrap" --set model.path="$model" \
	--set engine.kind=cpu --set engine.threads="$T" --set engine.mc_samples="$MC" \
	--set batch.max_size=64 --set batch.max_delay_ms=50 --set log.level=info \
	--set status.interval_ms=1000 --set kafka.consumer.fetch.wait.max.ms=10 \
	${EXTRA:-} 2> "$work/mtlzd.log" &
pids+=($!)
dpid=$!
ts=$(date +%s.%N)

# sample once a second until results + dead letters reach N (or MAX_S / stall)
: > "$work/rss.txt"
ready=""
outcome="timeout after ${MAX_S} s"
last_done=-1
last_change=$(date +%s)
while :; do
	sleep 1
	kill -0 "$dpid" 2>/dev/null || { outcome="daemon exited"; break; }
	now=$(date +%s.%N)
	[ -n "$ready" ] || ! grep -q 'event=ready' "$work/mtlzd.log" || ready=$now
	st=$(grep 'event=status' "$work/mtlzd.log" | tail -1 || true)
	res=$(echo "$st" | sed -n 's/.* results=\([0-9]*\).*/\1/p'); res=${res:-0}
	dl=$(echo "$st" | sed -n 's/.* dead_letter=\([0-9]*\).*/\1/p'); dl=${dl:-0}
	done_n=$((res + dl))
	echo "$(awk -v a="$ts" -v b="$now" 'BEGIN { printf "%.0f", b - a }') $(rss_kb "$dpid" VmRSS)" \
		"$(rss_kb "$broker_pid" VmRSS) $res $dl" >> "$work/rss.txt"
	if [ "$done_n" -ne "$last_done" ]; then last_done=$done_n; last_change=$(date +%s); fi
	[ "$done_n" -ge "$N" ] && { outcome="drained"; break; }
	[ $(($(date +%s) - last_change)) -lt "$STALL_S" ] || { outcome="stalled (no progress for ${STALL_S} s)"; break; }
	awk -v a="$ts" -v b="$now" -v m="$MAX_S" 'BEGIN { exit !(b - a > m) }' && break
done
te=$(date +%s.%N)
hwm=$(rss_kb "$dpid" VmHWM)
st=$(grep 'event=status' "$work/mtlzd.log" | tail -1 || true)
echo "drain: $outcome; $(awk -v a="$ts" -v r="${ready:-$ts}" -v b="$te" -v n="$last_done" \
	'BEGIN { printf "%d of the backlog done in %.1f s after the daemon started (%.1f s after READY), %.0f/s", n, b - a, b - r, n / (b - r) }')"
echo "daemon status: ${st#*event=status }"
grep -E 'event=(warn|error|engine_error|delivery)' "$work/mtlzd.log" | head -5 || true

# RSS over the drain (one sample a second)
# (VmHWM can read a little below a VmRSS sample: the kernel syncs the
# per-thread RSS counters lazily; the peak is the larger of the two)
sort -n -k2 "$work/rss.txt" | awk -v hwm="$hwm" '{ r[NR] = $2 }
	END { pk = hwm > r[NR] ? hwm : r[NR]
	      printf "daemon RSS over %d samples: min %.1f MB, median %.1f MB, max %.1f MB; VmHWM %.1f MB; peak %.1f MB vs target <= 256 MB: %s\n",
		NR, r[1] / 1024, r[int((NR + 1) / 2)] / 1024, r[NR] / 1024, hwm / 1024, pk / 1024, pk <= 256 * 1024 ? "met" : "NOT met" }'
awk '{ print $1, $2, $3, $4 + $5 }' "$work/rss.txt" | awk -v n="$(wc -l < "$work/rss.txt")" '
	BEGIN { step = n > 12 ? int(n / 12) : 1; print "samples (s since start, daemon RSS, broker RSS, results + dead letters):" }
	NR <= 6 || NR % step == 0 || NR == n { printf "  t=%4ds  daemon %6.1f MB  broker %7.1f MB  done %d\n", $1, $2 / 1024, $3 / 1024, $4 }'
echo "dev broker RSS: $(sort -n -k3 "$work/rss.txt" | tail -1 | awk '{ printf "%.1f MB", $3 / 1024 }') at most (holds the backlog and the results)"

# what the output topics hold, then every result decoded
read -r nres lo_nz _ _ _ <<< "$(watermarks results)"
read -r ndlq _ _ _ _ <<< "$(watermarks spectra.dlq)"
echo "output topics: results $nres records (partitions with low watermark > 0: $lo_nz), dead letters $ndlq records"
c0=$(date +%s.%N)
cons=$($B/tools/mtlz consume --brokers "$bootstrap" --count "$nres" --timeout 30 --stats 2>/dev/null) || true
echo "mtlz consume: $cons ($(awk -v a="$c0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f s", b - a }'))"
kill -TERM "$dpid"; wait "$dpid" 2>/dev/null || true; unset 'pids[-1]'
[ "$outcome" = drained ] && [ "$((nres + ndlq))" -eq "$N" ]
