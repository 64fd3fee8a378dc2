// A stand-in for libcublas.so on machines without a GPU (see fake_driver.cpp): the GEMMs
// arcface_rs calls, by cuBLAS's column-major definition (reference_gemm.h), over host
// memory.

#include "../../src/cuda/reference_gemm.h"

typedef int cublasStatus_t;
enum { R_32F = 0, R_16F = 2 };

extern "C" {

cublasStatus_t cublasCreate_v2(void** handle) {
    static int the_handle;
    *handle = &the_handle;
    return GEMM_OK;
}

cublasStatus_t cublasSetStream_v2(void* handle, void*) {
    return handle ? GEMM_OK : GEMM_INVALID_VALUE;
}

cublasStatus_t cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, const float* b, int ldb,
                              const float* beta, float* c, int ldc) {
    return reference_gemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc,
                          [](float v) { return (double)v; });
}

cublasStatus_t cublasDgemm_v2(void*, int ta, int tb, int m, int n, int k, const double* alpha,
                              const double* a, int lda, const double* b, int ldb,
                              const double* beta, double* c, int ldc) {
    return reference_gemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc,
                          [](double v) { return v; });
}

// Only what arcface_rs uses: float16 inputs, float32 output, float32 scalars.
cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha,
                            const void* a, int a_type, int lda, const void* b, int b_type,
                            int ldb, const void* beta, void* c, int c_type, int ldc, int, int) {
    if (a_type != R_16F || b_type != R_16F || c_type != R_32F) return GEMM_NOT_SUPPORTED;
    return reference_gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha),
                          static_cast<const unsigned short*>(a), lda,
                          static_cast<const unsigned short*>(b), ldb,
                          *static_cast<const float*>(beta), static_cast<float*>(c), ldc,
                          half_bits_to_double);
}
}
