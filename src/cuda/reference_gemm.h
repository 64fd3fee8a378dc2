// cuBLAS's GEMM by its definition, for the CPU stand-ins of the tests: the kernel emulator
// (emulator.cpp, for the launch sequences) and the fake libcublas (tests/fake_cuda/).
//
// Column-major C = alpha op(A) op(B) + beta C, with C m x n, op(A) m x k, op(B) k x n,
// accumulated in double; C is not read when beta == 0 (it may hold anything), as in cuBLAS.

#pragma once

#include <cstring>

enum { GEMM_OK = 0, GEMM_INVALID_VALUE = 7, GEMM_NOT_SUPPORTED = 15 };
enum { GEMM_OP_N = 0, GEMM_OP_T = 1 };

static double half_bits_to_double(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (double)h;
}

template <typename In, typename Out, typename Load>
static int reference_gemm(int ta, int tb, int m, int n, int k, double alpha, const In* a,
                          int lda, const In* b, int ldb, double beta, Out* c, int ldc,
                          Load load) {
    auto at_least = [](int ld, int rows) { return ld >= (rows > 1 ? rows : 1); };
    if ((ta != GEMM_OP_N && ta != GEMM_OP_T) || (tb != GEMM_OP_N && tb != GEMM_OP_T))
        return GEMM_INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0 || !at_least(ldc, m)) return GEMM_INVALID_VALUE;
    if (!at_least(lda, ta == GEMM_OP_N ? m : k) || !at_least(ldb, tb == GEMM_OP_N ? k : n))
        return GEMM_INVALID_VALUE;
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            double acc = 0.0;
            for (int l = 0; l < k; ++l) {
                double x = load(a[ta == GEMM_OP_N ? i + (long long)l * lda : l + (long long)i * lda]);
                double y = load(b[tb == GEMM_OP_N ? l + (long long)j * ldb : j + (long long)l * ldb]);
                acc += x * y;
            }
            Out& out = c[i + (long long)j * ldc];
            out = (Out)(alpha * acc + (beta == 0.0 ? 0.0 : beta * (double)out));
        }
    return GEMM_OK;
}
