/*
 * common.cuh - error checks shared by the CUDA engine's files. Every CUDA and
 * cuBLAS call goes through one of these: a failure fills the caller's errstr
 * with the call as written, the file and line and the library's own words,
 * and returns MTLZ_ERR_IO from the enclosing function (which must have
 * `errstr` and `errstr_size` in scope).
 */
#ifndef MTLZ_GPU_COMMON_CUH
#define MTLZ_GPU_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "common.h"
}

/*
 * cuBLAS is loaded on demand (cublas_load.cu), not linked: linking it maps
 * and relocates ~215 MB into every process of a CUDA build, the CPU-only
 * ones included (measured: a process linked with cudart 1.3 MB resident,
 * with cudart + cuBLAS 216 MB). The calls below go through this table,
 * filled by mtlz_cublas_load() when a CUDA engine or trainer starts.
 */
struct mtlz_cublas_api {
	decltype(&cublasCreate_v2) Create;
	decltype(&cublasDestroy_v2) Destroy;
	decltype(&cublasGetStatusString) GetStatusString;
	decltype(&cublasSetMathMode) SetMathMode;
	decltype(&cublasSetStream_v2) SetStream;
	decltype(&cublasSetWorkspace_v2) SetWorkspace;
	decltype(&cublasSgemm_v2) Sgemm;
	decltype(&cublasSgemv_v2) Sgemv;
};
extern struct mtlz_cublas_api mtlz_cublas;
/* Loads libcublas.so.<major> once; MTLZ_OK or an error naming the library. */
int mtlz_cublas_load(char *errstr, size_t errstr_size);

#undef cublasCreate
#undef cublasDestroy
#undef cublasSetStream
#undef cublasSetWorkspace
#undef cublasSgemm
#undef cublasSgemv
#define cublasCreate(...) mtlz_cublas.Create(__VA_ARGS__)
#define cublasDestroy(...) mtlz_cublas.Destroy(__VA_ARGS__)
#define cublasGetStatusString(...) mtlz_cublas.GetStatusString(__VA_ARGS__)
#define cublasSetMathMode(...) mtlz_cublas.SetMathMode(__VA_ARGS__)
#define cublasSetStream(...) mtlz_cublas.SetStream(__VA_ARGS__)
#define cublasSetWorkspace(...) mtlz_cublas.SetWorkspace(__VA_ARGS__)
#define cublasSgemm(...) mtlz_cublas.Sgemm(__VA_ARGS__)
#define cublasSgemv(...) mtlz_cublas.Sgemv(__VA_ARGS__)

#define CU_TRY(call)                                                           \
	do {                                                                   \
		cudaError_t e_ = (call);                                       \
		if (e_ != cudaSuccess)                                         \
			return mtlz_err(errstr, errstr_size,                   \
					e_ == cudaErrorMemoryAllocation ?      \
						MTLZ_ERR_NOMEM : MTLZ_ERR_IO,  \
					"cuda: %s failed at %s:%d: %s (%s)",   \
					#call, __FILE__, __LINE__,             \
					cudaGetErrorString(e_),                \
					cudaGetErrorName(e_));                 \
	} while (0)

#define BLAS_TRY(call)                                                         \
	do {                                                                   \
		cublasStatus_t s_ = (call);                                    \
		if (s_ != CUBLAS_STATUS_SUCCESS)                               \
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,      \
					"cublas: %s failed at %s:%d: %s",      \
					#call, __FILE__, __LINE__,             \
					cublasGetStatusString(s_));            \
	} while (0)

/* After a kernel launch: launch errors (bad configuration) now, not at the
 * next synchronisation. */
#define LAUNCH_TRY(kernel)                                                     \
	do {                                                                   \
		cudaError_t e_ = cudaGetLastError();                           \
		if (e_ != cudaSuccess)                                         \
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,      \
					"cuda: launch of %s failed at %s:%d: " \
					"%s (%s)", kernel, __FILE__, __LINE__, \
					cudaGetErrorString(e_),                \
					cudaGetErrorName(e_));                 \
	} while (0)

static inline unsigned int mtlz_blocks(size_t n, unsigned int threads)
{
	return (unsigned int)((n + threads - 1) / threads);
}

#endif
