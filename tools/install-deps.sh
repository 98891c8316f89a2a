#!/usr/bin/env bash
# Installs the Debian 12 packages mtlz builds, tests and benchmarks with.
# Idempotent: does nothing (and needs no network) when all are present.
# Run as root, or with sudo available.
set -euo pipefail

# build + core library
PKGS="cmake make gcc pkg-config libcfitsio-dev libopenblas-dev libjansson-dev"
# daemon and tools: Kafka client (+ its mock cluster), Avro C, YAML config,
# systemd notifications; kcat to read topics by hand
PKGS="$PKGS librdkafka-dev libavro-dev libyaml-dev libsystemd-dev libssl-dev zlib1g-dev kcat"
# evaluation report figures (core/report.c): PLplot, because it gives axes,
# labels, legends, histograms, shade/image plots, colour bars and colour maps
# out of the box through a plain C API, and is packaged in Debian; its cairo
# driver provides the pngcairo device (anti-aliased PNG, UTF-8 text), and
# DejaVu is the font it draws with when the machine has no other
PKGS="$PKGS libplplot-dev plplot-driver-cairo fonts-dejavu-core"
# tests (test_report reads the PNGs back with libpng)
PKGS="$PKGS libcriterion-dev libpng-dev"
# PyTorch reference for the cross-check test and the benchmark (Debian's
# python3-torch runs on the system /usr/bin/python3)
PKGS="$PKGS python3 python3-numpy python3-torch"
# a third-party Avro reader and Kafka client for the schema-contract tests
# (tests/third_party_reader.py)
PKGS="$PKGS python3-avro python3-confluent-kafka"

missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "mtlz: installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
