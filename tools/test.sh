#!/usr/bin/env bash
# The whole test suite, twice: a normal build and an AddressSanitizer +
# UndefinedBehaviorSanitizer build. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
export OMP_WAIT_POLICY=PASSIVE   # 2 cores shared by the test processes

echo "== normal build =="
tools/build.sh build
(cd build && ctest --output-on-failure)

echo "== ASan + UBSan build =="
# without the CUDA engine: the CUDA runtime is not instrumented and its
# driver allocations read as leaks (the normal build above has it when a
# CUDA toolkit is installed; docs/cuda.md)
tools/build.sh build-asan -DMTLZ_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DMTLZ_CUDA=OFF
(cd build-asan && ctest --output-on-failure)
