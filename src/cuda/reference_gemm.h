// cuBLAS's GEMM by its definition, for the CPU stand-ins of the tests: the kernel emulator
// (emulator.cpp, for the launch sequences) and the fake libcublas (tests/cuda/fake_cuda/).
//
// Column-major C = alpha op(A) op(B) + beta C, with C m x n, op(A) m x k, op(B) k x n,
// accumulated in double; C is not read when beta == 0 (it may hold anything), as in cuBLAS.

#pragma once

#include <cstring>
#include <utility>

enum { GEMM_OK = 0, GEMM_INVALID_VALUE = 7, GEMM_NOT_SUPPORTED = 15 };
enum { GEMM_OP_N = 0, GEMM_OP_T = 1 };

static double half_bits_to_double(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (double)h;
}

static double bf16_bits_to_double(unsigned short bits) {
    unsigned u = (unsigned)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return (double)f;
}

// A float32 input as the tensor cores read it under TF32 (cuBLAS's *_FAST_TF32 compute
// types): 10 mantissa bits, rounded to nearest even.
static double tf32_round(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
    float r;
    std::memcpy(&r, &u, 4);
    return (double)r;
}

// The element types of cuBLAS's cudaDataType_t that arcface_rs uses.
enum { TYPE_R_32F = 0, TYPE_R_64F = 1, TYPE_R_16F = 2, TYPE_R_16BF = 14 };

// C's elements are read with `get` (only when beta != 0) and written with `set`.
template <typename In, typename Out, typename Load, typename Get, typename Set>
static int reference_gemm_io(int ta, int tb, int m, int n, int k, double alpha, const In* a,
                             int lda, const In* b, int ldb, double beta, Out* c, int ldc,
                             Load load, Get get, Set set) {
    auto at_least = [](int ld, int rows) { return ld >= (rows > 1 ? rows : 1); };
    if ((ta != GEMM_OP_N && ta != GEMM_OP_T) || (tb != GEMM_OP_N && tb != GEMM_OP_T))
        return GEMM_INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0 || !at_least(ldc, m)) return GEMM_INVALID_VALUE;
    if (!at_least(lda, ta == GEMM_OP_N ? m : k) || !at_least(ldb, tb == GEMM_OP_N ? k : n))
        return GEMM_INVALID_VALUE;
    // cuBLAS leaves a C that overlaps A or B undefined (on a GPU tiles of C are written while
    // others still read the inputs): refused here, so a launch sequence that lets a GEMM
    // overwrite its own operand fails its tests instead of passing by this loop's order.
    if (m > 0 && n > 0 && k > 0) {
        auto span = [](const void* p, int ld, int rows, int cols, size_t size) {
            const char* lo = (const char*)p;
            return std::make_pair(lo, lo + ((long long)(cols - 1) * ld + rows) * size);
        };
        auto a_span = ta == GEMM_OP_N ? span(a, lda, m, k, sizeof(In))
                                      : span(a, lda, k, m, sizeof(In));
        auto b_span = tb == GEMM_OP_N ? span(b, ldb, k, n, sizeof(In))
                                      : span(b, ldb, n, k, sizeof(In));
        auto c_span = span(c, ldc, m, n, sizeof(Out));
        auto overlap = [](std::pair<const char*, const char*> x,
                          std::pair<const char*, const char*> y) {
            return x.first < y.second && y.first < x.second;
        };
        if (overlap(a_span, c_span) || overlap(b_span, c_span)) return GEMM_INVALID_VALUE;
    }
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            double acc = 0.0;
            for (int l = 0; l < k; ++l) {
                double x = load(a[ta == GEMM_OP_N ? i + (long long)l * lda : l + (long long)i * lda]);
                double y = load(b[tb == GEMM_OP_N ? l + (long long)j * ldb : j + (long long)l * ldb]);
                acc += x * y;
            }
            Out& out = c[i + (long long)j * ldc];
            set(out, alpha * acc + (beta == 0.0 ? 0.0 : beta * get(out)));
        }
    return GEMM_OK;
}

template <typename In, typename Out, typename Load>
static int reference_gemm(int ta, int tb, int m, int n, int k, double alpha, const In* a,
                          int lda, const In* b, int ldb, double beta, Out* c, int ldc,
                          Load load) {
    return reference_gemm_io(
        ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, load,
        [](const Out& v) { return (double)v; }, [](Out& o, double v) { o = (Out)v; });
}

static unsigned short double_to_bf16_bits(double v) {
    float f = (float)v;
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

static unsigned short double_to_half_bits(double v) {
    _Float16 h = (_Float16)(float)v;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}

// A GEMM whose inputs are `in_type` and output is float32, or the inputs' own 16-bit type
// (accumulated in float32, rounded once), or float64 with float64 inputs: cuBLAS's
// cublasGemmEx; `tf32`: float32 inputs rounded to TF32 first.
static int typed_gemm(int in_type, int out_type, bool tf32, int ta, int tb, int m, int n,
                      int k, double alpha, const void* a, int lda, const void* b, int ldb,
                      double beta, void* c, int ldc) {
    if (in_type == TYPE_R_64F && out_type == TYPE_R_64F)
        return reference_gemm(ta, tb, m, n, k, alpha, (const double*)a, lda, (const double*)b,
                              ldb, beta, (double*)c, ldc, [](double v) { return v; });
    if ((in_type == TYPE_R_16F || in_type == TYPE_R_16BF) && out_type == in_type) {
        auto load = in_type == TYPE_R_16F ? half_bits_to_double : bf16_bits_to_double;
        auto store = in_type == TYPE_R_16F ? double_to_half_bits : double_to_bf16_bits;
        return reference_gemm_io(
            ta, tb, m, n, k, alpha, (const unsigned short*)a, lda, (const unsigned short*)b,
            ldb, beta, (unsigned short*)c, ldc, load,
            [load](const unsigned short& v) { return load(v); },
            [store](unsigned short& o, double v) { o = store((double)(float)v); });
    }
    if (out_type != TYPE_R_32F) return GEMM_NOT_SUPPORTED;
    float* out = (float*)c;
    switch (in_type) {
        case TYPE_R_32F:
            if (tf32)
                return reference_gemm(ta, tb, m, n, k, alpha, (const float*)a, lda,
                                      (const float*)b, ldb, beta, out, ldc, tf32_round);
            return reference_gemm(ta, tb, m, n, k, alpha, (const float*)a, lda, (const float*)b,
                                  ldb, beta, out, ldc, [](float v) { return (double)v; });
        case TYPE_R_16F:
            return reference_gemm(ta, tb, m, n, k, alpha, (const unsigned short*)a, lda,
                                  (const unsigned short*)b, ldb, beta, out, ldc,
                                  half_bits_to_double);
        case TYPE_R_16BF:
            return reference_gemm(ta, tb, m, n, k, alpha, (const unsigned short*)a, lda,
                                  (const unsigned short*)b, ldb, beta, out, ldc,
                                  bf16_bits_to_double);
        default:
            return GEMM_NOT_SUPPORTED;
    }
}

static size_t type_size(int type) {
    return type == TYPE_R_64F ? 8 : type == TYPE_R_32F ? 4 : 2;
}

// `batch` products of typed_gemm, product i with A, B and C `stride_* · i` elements on
// (cuBLAS's strided batched GEMMs). The products may run at once on a GPU, so one whose C
// overlaps another's A, B or C is refused, like a C overlapping its own operands.
static int batched_gemm(int in_type, int out_type, bool tf32, int ta, int tb, int m, int n,
                        int k, double alpha, const void* a, int lda, long long stride_a,
                        const void* b, int ldb, long long stride_b, double beta, void* c,
                        int ldc, long long stride_c, int batch) {
    if (batch < 0 || stride_a < 0 || stride_b < 0 || stride_c < 0) return GEMM_INVALID_VALUE;
    size_t in = type_size(in_type), out = type_size(out_type);
    auto nth = [](const void* p, long long stride, int i, size_t size) {
        return (const char*)p + stride * i * (long long)size;
    };
    auto span = [](const char* p, int ld, int rows, int cols, size_t size) {
        return std::make_pair(p, p + ((long long)(cols - 1) * ld + rows) * size);
    };
    auto overlap = [](std::pair<const char*, const char*> x,
                      std::pair<const char*, const char*> y) {
        return x.first < y.second && y.first < x.second;
    };
    if (m > 0 && n > 0 && k > 0)
        for (int i = 0; i < batch; ++i)
            for (int j = 0; j < batch; ++j) {
                if (i == j) continue;  // typed_gemm checks a product against itself
                auto c_i = span(nth(c, stride_c, i, out), ldc, m, n, out);
                auto a_j = ta == GEMM_OP_N ? span(nth(a, stride_a, j, in), lda, m, k, in)
                                           : span(nth(a, stride_a, j, in), lda, k, m, in);
                auto b_j = tb == GEMM_OP_N ? span(nth(b, stride_b, j, in), ldb, k, n, in)
                                           : span(nth(b, stride_b, j, in), ldb, n, k, in);
                auto c_j = span(nth(c, stride_c, j, out), ldc, m, n, out);
                if (overlap(c_i, a_j) || overlap(c_i, b_j) || overlap(c_i, c_j))
                    return GEMM_INVALID_VALUE;
            }
    for (int i = 0; i < batch; ++i) {
        int status = typed_gemm(in_type, out_type, tf32, ta, tb, m, n, k, alpha,
                                nth(a, stride_a, i, in), lda, nth(b, stride_b, i, in), ldb,
                                beta, (void*)nth(c, stride_c, i, out), ldc);
        if (status != GEMM_OK) return status;
    }
    return GEMM_OK;
}
