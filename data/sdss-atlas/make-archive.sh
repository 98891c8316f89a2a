#!/bin/sh
# Rebuilds data/sdss-atlas/archive/ (the shipped sample training archive)
# from the atlas's JSON lines with `mtlz import`. tests/test_archive.c runs
# the same command and checks that the shipped files are identical.
# usage: data/sdss-atlas/make-archive.sh [BUILD_DIR]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../../build}
rm -rf "$here/archive"
exec "$build/tools/mtlz" import -o "$here/archive" \
	--source "galaxy-line-atlas (SDSS DR18 spectra, MPA-JHU labels)" --source-version DR18 \
	--metallicity o3n2 "$here/sdss_dr18_atlas.jsonl.gz"
