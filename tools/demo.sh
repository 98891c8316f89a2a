#!/usr/bin/env bash
# The main job on the bundled sample data: classify the real SDSS, BOSS and
# DESI spectra in tests/data and print the table. Installs and builds first.
#
# The model is a randomly initialised one (mtlz init, seed 1) until a
# trained model ships (mtlz-retrain): the table shows the pipeline working
# end to end on real files, not science-grade classes.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
tools/build.sh build
model=build/mtlz-random.safetensors
[ -f "$model" ] || build/tools/mtlz init -o "$model" --seed 1
build/tools/mtlz info "$model" | head -8
echo
build/tools/mtlz classify --model "$model" --mc 100 tests/data/spec-*.fits tests/data/coadd-*.fits
