#!/usr/bin/env bash
# Builds the CUDA build here and packs what bench/device_check.sh needs into
# .devrun/ (git-ignored, carried to the GPU machine): the binaries, the
# Debian shared libraries they need that a CUDA image lacks, and a model.
# OpenBLAS (35 MB) does not fit the 64 MiB carry limit: the CPU engine's
# few cblas calls there go to Debian's reference BLAS (libblas3, 0.4 MB)
# behind a two-function libopenblas.so.0 shim; no GPU number depends on it.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-cuda}
cmake -S . -B "$B" -DMTLZ_CUDA=ON >/dev/null
cmake --build "$B" -j"$(nproc)" --target mtlz mtlz-retrain mtlzd mtlz-devbroker mtlz-replay test_cuda test_engine
rm -rf .devrun && mkdir -p .devrun/tools .devrun/daemon .devrun/tests .devrun/lib
cp "$B/tools/mtlz" "$B/tools/mtlz-retrain" "$B/tools/mtlz-devbroker" "$B/tools/mtlz-replay" .devrun/tools/
cp "$B/daemon/mtlzd" .devrun/daemon/
cp "$B/tests/test_cuda" "$B/tests/test_engine" .devrun/tests/
for b in .devrun/tools/* .devrun/daemon/* .devrun/tests/*; do ldd "$b"; done | awk '/=>/ { print $3 }' | sort -u |
	grep -vE 'libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|ld-linux|cuda|cublas|libstdc\+\+|libgcc_s|openblas' |
	xargs -I{} cp -L {} .devrun/lib/
cp -L /usr/lib/x86_64-linux-gnu/blas/libblas.so.3 .devrun/lib/
strip .devrun/tools/* .devrun/daemon/* .devrun/tests/*
strip --strip-unneeded .devrun/lib/*
printf 'void openblas_set_num_threads(int n) { (void)n; }\nint openblas_get_num_threads(void) { return 1; }\n' >.devrun/shim.c
gcc -shared -fPIC -O2 -o .devrun/lib/libopenblas.so.0 -Wl,-soname,libopenblas.so.0 .devrun/shim.c \
	-Wl,--no-as-needed -L.devrun/lib -l:libblas.so.3 -Wl,-rpath,'$ORIGIN'
LD_LIBRARY_PATH=.devrun/lib .devrun/tools/mtlz init -o .devrun/model.safetensors
grep -qx '/.devrun/' .git/info/exclude 2>/dev/null || echo '/.devrun/' >>.git/info/exclude
# the working tree and the carried paths travel under 64 MiB together: ship
# the bundle xz-compressed (device_check.sh unpacks it)
tar -C .devrun -cf - . | xz -T0 -6 >/tmp/mtlz-devrun.tar.xz
rm -rf .devrun && mkdir .devrun && mv /tmp/mtlz-devrun.tar.xz .devrun/bundle.tar.xz
du -shL .devrun
