/*
 * cublas_load.cu - cuBLAS on demand (common.cuh says why): dlopen of
 * libcublas.so.<major of the headers we built with>, then every function
 * the engine and the trainer call, by its exported name.
 */
#include "common.cuh"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

struct mtlz_cublas_api mtlz_cublas;

#define STR_(x) #x
#define STR(x) STR_(x)

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int load_rc = 1; /* 1: not tried; MTLZ_OK or an error after */
static char load_err[256];

static int load(void)
{
	static const char *const names[] = { "libcublas.so." STR(CUBLAS_VER_MAJOR), "libcublas.so" };
	void *h = NULL;

	for (size_t i = 0; !h && i < sizeof(names) / sizeof(names[0]); i++)
		h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
	if (!h)
		return mtlz_err(load_err, sizeof(load_err), MTLZ_ERR_UNSUPPORTED,
				"cuda: cannot load cuBLAS (%s): %s", names[0], dlerror());
#define SYM(field, name)                                                                   \
	do {                                                                               \
		*(void **)&mtlz_cublas.field = dlsym(h, name);                             \
		if (!mtlz_cublas.field)                                                    \
			return mtlz_err(load_err, sizeof(load_err), MTLZ_ERR_UNSUPPORTED,  \
					"cuda: %s has no %s", names[0], name);             \
	} while (0)
	SYM(Create, "cublasCreate_v2");
	SYM(Destroy, "cublasDestroy_v2");
	SYM(GetStatusString, "cublasGetStatusString");
	SYM(SetMathMode, "cublasSetMathMode");
	SYM(SetStream, "cublasSetStream_v2");
	SYM(SetWorkspace, "cublasSetWorkspace_v2");
	SYM(Sgemm, "cublasSgemm_v2");
	SYM(Sgemv, "cublasSgemv_v2");
#undef SYM
	return MTLZ_OK;
}

int mtlz_cublas_load(char *errstr, size_t errstr_size)
{
	int rc;

	pthread_mutex_lock(&load_lock);
	if (load_rc == 1)
		load_rc = load();
	rc = load_rc;
	pthread_mutex_unlock(&load_lock);
	return rc ? mtlz_err(errstr, errstr_size, rc, "%s", load_err) : MTLZ_OK;
}
