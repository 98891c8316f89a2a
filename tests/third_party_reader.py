#!/usr/bin/python3
"""A downstream consumer of mtlzd's results that knows nothing of mtlz but
schemas/result.avsc: Debian's python3-avro decodes, python3-confluent-kafka
(librdkafka underneath, as any Kafka client) reads the topic. The tests use
it as the third-party reader the schema contract promises; it is also the
shortest example of reading mtlzd's output (docs/daemon.md).

  third_party_reader.py fingerprint SCHEMA.avsc...
      the CRC-64-AVRO fingerprint (hex) of each schema's Parsing Canonical
      Form, one per line

  third_party_reader.py consume --brokers B --topic T --schema result.avsc
                                [--count N] [--timeout S]
      reads T from the beginning until N messages or S seconds without one;
      one JSON line per message: the framing it found (single_object,
      confluent, container), the schema id or fingerprint in the frame, key,
      headers, partition, offset and the decoded record. Exit 1 when a message
      cannot be decoded with the schema.
"""
import argparse
import io
import json
import sys
import time

import avro.datafile
import avro.io
import avro.schema

EMPTY = 0xC15D213AA4D7A795


def _strip_logical(j):
    # python3-avro 1.11.1 keeps {"type": "long"} for a primitive with a
    # logicalType in its canonical form, against the spec's [PRIMITIVES]
    # rule: drop the logical types before it parses
    if isinstance(j, dict):
        j = {k: _strip_logical(v) for k, v in j.items() if k != "logicalType"}
        if list(j) == ["type"] and isinstance(j["type"], str):
            return j["type"]
        return j
    if isinstance(j, list):
        return [_strip_logical(v) for v in j]
    return j


def fingerprint(path):
    """CRC-64-AVRO of the schema's Parsing Canonical Form (Avro spec)."""
    with open(path) as f:
        pcf = avro.schema.parse(json.dumps(_strip_logical(json.load(f)))).canonical_form
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    fp = EMPTY
    for b in pcf.encode():
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


def decode(value, schema):
    """(framing, frame id, record) of one message value."""
    reader = avro.io.DatumReader(schema)
    if value[:2] == b"\xc3\x01":
        fp = int.from_bytes(value[2:10], "little")
        rec = reader.read(avro.io.BinaryDecoder(io.BytesIO(value[10:])))
        return "single_object", "%016x" % fp, rec
    if value[:1] == b"\x00":
        sid = int.from_bytes(value[1:5], "big")
        rec = reader.read(avro.io.BinaryDecoder(io.BytesIO(value[5:])))
        return "confluent", str(sid), rec
    if value[:4] == b"Obj\x01":
        with avro.datafile.DataFileReader(io.BytesIO(value), avro.io.DatumReader(None, schema)) as r:
            recs = list(r)
        if len(recs) != 1:
            raise ValueError("container holds %d records, not 1" % len(recs))
        return "container", "", recs[0]
    raise ValueError("unknown framing, first bytes %r" % value[:4])


def consume(args):
    import confluent_kafka

    with open(args.schema) as f:
        schema = avro.schema.parse(f.read())
    c = confluent_kafka.Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": "third-party-reader-%d" % time.time_ns(),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    c.subscribe([args.topic])
    n = bad = 0
    last = time.monotonic()
    while (args.count < 0 or n < args.count) and time.monotonic() - last < args.timeout:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            print("reader: %s" % m.error(), file=sys.stderr)
            continue
        last = time.monotonic()
        n += 1
        try:
            framing, frame_id, rec = decode(m.value(), schema)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported
            print("reader: %s[%d]@%d: %s" % (m.topic(), m.partition(), m.offset(), e),
                  file=sys.stderr)
            bad += 1
            continue
        rec["processed_at"] = rec["processed_at"].isoformat()
        print(json.dumps({
            "framing": framing, "frame_id": frame_id,
            "key": m.key().decode() if m.key() is not None else None,
            "headers": {k: v.decode() for k, v in (m.headers() or [])},
            "partition": m.partition(), "offset": m.offset(), "record": rec,
        }), flush=True)
    c.close()
    print("reader: %d messages, %d undecodable" % (n, bad), file=sys.stderr)
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fingerprint")
    f.add_argument("schemas", nargs="+")
    c = sub.add_parser("consume")
    c.add_argument("--brokers", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--schema", required=True)
    c.add_argument("--count", type=int, default=-1)
    c.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    if args.cmd == "fingerprint":
        for path in args.schemas:
            print("%016x" % fingerprint(path))
        return 0
    return consume(args)


if __name__ == "__main__":
    sys.exit(main())
