// A stand-in for libcublas.so on machines without a GPU (see fake_driver.cpp): the GEMMs
// arcface_rs calls, by cuBLAS's column-major definition, over host memory.

#include <cstring>

typedef int cublasStatus_t;
enum { OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { OP_N = 0, OP_T = 1 };
enum { R_32F = 0, R_16F = 2 };

// C = alpha op(A) op(B) + beta C (C not read when beta == 0), accumulated in double.
template <typename In, typename Out, typename Load>
static cublasStatus_t gemm(int ta, int tb, int m, int n, int k, double alpha, const In* a,
                           int lda, const In* b, int ldb, double beta, Out* c, int ldc, Load load) {
    if ((ta != OP_N && ta != OP_T) || (tb != OP_N && tb != OP_T)) return INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0 || ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    if (lda < ((ta == OP_N ? m : k) > 1 ? (ta == OP_N ? m : k) : 1)) return INVALID_VALUE;
    if (ldb < ((tb == OP_N ? k : n) > 1 ? (tb == OP_N ? k : n) : 1)) return INVALID_VALUE;
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            double acc = 0.0;
            for (int l = 0; l < k; ++l) {
                double x = load(a[ta == OP_N ? i + (long long)l * lda : l + (long long)i * lda]);
                double y = load(b[tb == OP_N ? l + (long long)j * ldb : j + (long long)l * ldb]);
                acc += x * y;
            }
            Out& out = c[i + (long long)j * ldc];
            out = (Out)(alpha * acc + (beta == 0.0 ? 0.0 : beta * (double)out));
        }
    return OK;
}

static double half_to_double(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (double)h;
}

extern "C" {

cublasStatus_t cublasCreate_v2(void** handle) {
    static int the_handle;
    *handle = &the_handle;
    return OK;
}

cublasStatus_t cublasSetStream_v2(void* handle, void*) { return handle ? OK : INVALID_VALUE; }

cublasStatus_t cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, const float* b, int ldb,
                              const float* beta, float* c, int ldc) {
    return gemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc,
                [](float v) { return (double)v; });
}

cublasStatus_t cublasDgemm_v2(void*, int ta, int tb, int m, int n, int k, const double* alpha,
                              const double* a, int lda, const double* b, int ldb,
                              const double* beta, double* c, int ldc) {
    return gemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc,
                [](double v) { return v; });
}

// Only what arcface_rs uses: float16 inputs, float32 output, float32 scalars.
cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha,
                            const void* a, int a_type, int lda, const void* b, int b_type,
                            int ldb, const void* beta, void* c, int c_type, int ldc, int, int) {
    if (a_type != R_16F || b_type != R_16F || c_type != R_32F) return NOT_SUPPORTED;
    return gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha),
                static_cast<const unsigned short*>(a), lda, static_cast<const unsigned short*>(b),
                ldb, *static_cast<const float*>(beta), static_cast<float*>(c), ldc,
                half_to_double);
}
}
