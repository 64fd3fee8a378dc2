// A stand-in for libcublas.so on machines without a GPU (see fake_driver.cpp): the GEMMs
// arcface_rs calls, by cuBLAS's column-major definition (reference_gemm.h), over host
// memory.

#include "../../../src/cuda/reference_gemm.h"

typedef int cublasStatus_t;

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

// Only what arcface_rs uses: float16, bfloat16 or float32 inputs (TF32 with
// CUBLAS_COMPUTE_32F_FAST_TF32), a float32 output or one of the inputs' type, float32
// scalars.
enum { COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };

cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha,
                            const void* a, int a_type, int lda, const void* b, int b_type,
                            int ldb, const void* beta, void* c, int c_type, int ldc,
                            int compute, int) {
    if (a_type != b_type || (c_type != TYPE_R_32F && c_type != a_type)) return GEMM_NOT_SUPPORTED;
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_FAST_TF32) return GEMM_NOT_SUPPORTED;
    return typed_gemm(a_type, c_type, compute == COMPUTE_32F_FAST_TF32, ta, tb, m, n, k,
                      *static_cast<const float*>(alpha), a, lda, b, ldb,
                      *static_cast<const float*>(beta), c, ldc);
}

// Products made by strided batched GEMMs of more than one product (the tests count them).
static int batched_products;
int fake_batched_products() { return batched_products; }

static int count_batch(int batch, int status) {
    if (status == GEMM_OK && batch > 1) batched_products += batch;
    return status;
}

cublasStatus_t cublasSgemmStridedBatched(void*, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* a, int lda,
                                         long long stride_a, const float* b, int ldb,
                                         long long stride_b, const float* beta, float* c,
                                         int ldc, long long stride_c, int batch) {
    return count_batch(batch, batched_gemm(TYPE_R_32F, TYPE_R_32F, false, ta, tb, m, n, k,
                                           *alpha, a, lda, stride_a, b, ldb, stride_b, *beta,
                                           c, ldc, stride_c, batch));
}

cublasStatus_t cublasDgemmStridedBatched(void*, int ta, int tb, int m, int n, int k,
                                         const double* alpha, const double* a, int lda,
                                         long long stride_a, const double* b, int ldb,
                                         long long stride_b, const double* beta, double* c,
                                         int ldc, long long stride_c, int batch) {
    return count_batch(batch, batched_gemm(TYPE_R_64F, TYPE_R_64F, false, ta, tb, m, n, k,
                                           *alpha, a, lda, stride_a, b, ldb, stride_b, *beta,
                                           c, ldc, stride_c, batch));
}

cublasStatus_t cublasGemmStridedBatchedEx(void*, int ta, int tb, int m, int n, int k,
                                          const void* alpha, const void* a, int a_type,
                                          int lda, long long stride_a, const void* b,
                                          int b_type, int ldb, long long stride_b,
                                          const void* beta, void* c, int c_type, int ldc,
                                          long long stride_c, int batch, int compute, int) {
    if (a_type != b_type || (c_type != TYPE_R_32F && c_type != a_type)) return GEMM_NOT_SUPPORTED;
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_FAST_TF32) return GEMM_NOT_SUPPORTED;
    return count_batch(batch, batched_gemm(a_type, c_type, compute == COMPUTE_32F_FAST_TF32, ta,
                                           tb, m, n, k, *static_cast<const float*>(alpha), a,
                                           lda, stride_a, b, ldb, stride_b,
                                           *static_cast<const float*>(beta), c, ldc, stride_c,
                                           batch));
}
}
