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
