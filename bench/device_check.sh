#!/usr/bin/env bash
# The CUDA checks, in one call on a GPU machine (docs/cuda.md): the CUDA
# test suite, the CPU engine's tests, and the side-by-side inference
# benchmark against PyTorch. Expects .devrun/ (made by bench/device_bundle.sh
# on the build machine: bin/, lib/, model.safetensors); logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
[ -f .devrun/bundle.tar.xz ] && tar -C .devrun -xJf .devrun/bundle.tar.xz
py_lib() { python3 -c "import os, $1 as m; print(os.path.join(list(m.__path__)[0], 'lib'))" 2>/dev/null; }
export LD_LIBRARY_PATH="$PWD/.devrun/lib:/usr/local/cuda/lib64:$(py_lib nvidia.cu13):$(py_lib nvidia.cublas):$(py_lib nvidia.cuda_runtime):${LD_LIBRARY_PATH:-}"
export MTLZ_SCHEMA_DIR="$PWD/schemas" MTLZ_DATA_DIR="$PWD/data"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
ldd .devrun/tests/test_cuda | grep -E "not found|cublas|cudart"
cuda_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
echo "== test_cuda"
timeout 150 .devrun/tests/test_cuda --verbose --jobs 2 >"$OUT/test_cuda.log" 2>&1
cuda_rc=$?
echo "rc=$cuda_rc"
grep -E "^\[(PASS|FAIL|SKIP)|Synthesis|rel err|cannot reserve|Assert|\[ERR" "$OUT/test_cuda.log" | cut -c1-300
echo "== test_engine"
timeout 60 .devrun/tests/test_engine --jobs 4 2>&1 | tail -1
fi
if [ -n "${SANITIZE:-}" ]; then
	echo "== compute-sanitizer memcheck: the CUDA tests on the small shapes"
	timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 .devrun/tests/test_cuda \
		--jobs 1 --filter "${SANITIZE_FILTER:-cuda/*other_shapes}" >"$OUT/sanitizer.log" 2>&1
	echo "rc=$?"
	tail -5 "$OUT/sanitizer.log"
fi
[ -n "${SKIP_BENCH:-}" ] || {
echo "== profile (events between stages, no graphs)"
for conv in ${PROFILE_CONV:-auto gemm direct}; do
	echo "-- MTLZ_CUDA_CONV=$conv"
	MTLZ_CUDA_CONV=$conv MTLZ_CUDA_PROFILE=1 timeout 60 .devrun/tools/mtlz bench --engine cuda \
		--precision ${PROFILE_PREC:-fp32} --batch ${PROFILE_BATCH:-1,64,4096} --threads 1 \
		--seconds 1 --no-preprocess 2>&1
done | tee "$OUT/profile.log"
echo "== bench"
timeout "${BENCH_TIMEOUT:-280}" python3 -u bench/gpu_vs_torch.py --mtlz .devrun/tools/mtlz \
	--model .devrun/model.safetensors --seconds 1 --compile-budget 100 2>&1 | tee "$OUT/bench.log"
}
if [ -n "${TRAIN:-}" ]; then
	echo "== training step, batch 128: mtlz cuda trainer (fp32, tf32) vs PyTorch on the same GPU"
	for prec in fp32 tf32; do
		timeout 60 .devrun/tools/mtlz bench --train --engine cuda --precision $prec --batch 128 \
			--threads 4 --seconds 3 --model .devrun/model.safetensors 2>&1 | grep -v '^#'
	done | tee "$OUT/train.log"
	timeout 60 python3 bench/torch_train.py --device cuda --batch 128 --seconds 3 \
		--model .devrun/model.safetensors 2>&1 | tee -a "$OUT/train.log"
	for prec in ${TRAIN_PROFILE_PREC:-fp32 tf32}; do
		echo "-- profile ($prec, events around each convolution's passes)"
		MTLZ_CUDA_PROFILE=1 timeout 60 .devrun/tools/mtlz bench --train --engine cuda \
			--precision $prec --batch 128 --threads 4 --seconds 2 \
			--model .devrun/model.safetensors 2>&1 | grep -v '^#'
	done | tee -a "$OUT/train.log"
fi
if [ -n "${TRAIN_RETRAIN:-}" ]; then
	echo "== mtlz-retrain --engine cuda on a synthetic archive"
	rm -rf /tmp/synth && timeout 90 .devrun/tools/mtlz synth -n "${SYNTH_N:-6000}" --seed 7 \
		--threads 16 --per-file 500 --ssp-dir data/emiles-ssp -o /tmp/synth 2>&1 | tail -2
	timeout 150 .devrun/tools/mtlz-retrain --data /tmp/synth -o /tmp/synth.safetensors \
		--epochs "${EPOCHS:-3}" --engine cuda --threads 16 2>&1 | tail -8 | tee -a "$OUT/train.log"
fi
if [ -n "${E2E:-}" ]; then
	echo "== daemon end to end through the dev broker (engine cuda)"
	B=.devrun ENGINE=cuda EXTRA="${E2E_EXTRA:-}" timeout 200 bench/e2e.sh 4000 16 100 200 2>&1 |
		tee "$OUT/e2e.log"
fi
if [ -n "${PRETRAIN:-}" ] && [ "$cuda_rc" != 0 ] && [ -z "${PRETRAIN_ANYWAY:-}" ]; then
	echo "== pretraining skipped: test_cuda failed"
elif [ -n "${PRETRAIN:-}" ]; then
	echo "== pretraining on ${PRETRAIN_N:-60000} synthetic spectra with the CUDA trainer"
	rm -rf /tmp/pre && timeout 120 .devrun/tools/mtlz synth -n "${PRETRAIN_N:-60000}" --seed 11 \
		--threads 16 --per-file 2000 --ssp-dir data/emiles-ssp -o /tmp/pre 2>&1 | tail -2
	s0=$SECONDS
	timeout "${PRETRAIN_TIMEOUT:-170}" .devrun/tools/mtlz-retrain --data /tmp/pre \
		-o "$OUT/synth-gpu.safetensors" --epochs "${PRETRAIN_EPOCHS:-40}" --engine cuda \
		--precision "${PRETRAIN_PRECISION:-fp32}" --threads 16 --seed 1 \
		--checkpoint "$OUT/synth-gpu.ckpt" >"$OUT/pretrain-full.log" 2>&1
	echo "rc=$?" | tee "$OUT/pretrain.log"
	tail -14 "$OUT/pretrain-full.log" | tee -a "$OUT/pretrain.log"
	echo "mtlz-retrain wall $((SECONDS - s0)) s" | tee -a "$OUT/pretrain.log"
fi
