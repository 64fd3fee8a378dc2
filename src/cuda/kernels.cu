// CUDA kernels of the fused margin head and the gallery search, compiled at run time with
// NVRTC (see cuda/mod.rs). The GEMMs run in cuBLAS; these kernels do everything between
// them: the margin on the target cosines, the online log-sum-exp of each row over class
// tiles, dL/dcos, the normalisation Jacobians, and the per-query top-k of score tiles.
//
// Layouts are row-major. A class tile holds `ct` columns starting at class `lo`; `labels`
// are int64 with -1 for ignored rows. The math mirrors margin.rs and head/ exactly.

#define PI_D 3.141592653589793
#define THETA_EPS 1e-3
// No headers: NVRTC compiles this without the CUDA toolkit's include files. (The CPU
// emulator that tests these kernels brings its own definitions.)
#ifndef INFINITY
#define INFINITY __longlong_as_double(0x7ff0000000000000LL)
#endif
#define NAN_D __longlong_as_double(0x7ff8000000000000LL)

// 16-bit storage (the half-precision head: GEMM inputs, the stash, dL/dcos) as raw bits:
// NVRTC has no cuda_bf16.h / cuda_fp16.h here. Arithmetic widens to float (`widen`) and
// rounds back to nearest even on store (`put`); float and double pass through unchanged.
struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

template <typename S> struct Acc { typedef S type; };  // the type arithmetic on S runs in
template <> struct Acc<bf16> { typedef float type; };
template <> struct Acc<f16> { typedef float type; };

#ifdef __CUDACC_RTC__
__device__ unsigned f32_bits(float x) { return __float_as_uint(x); }
__device__ float bits_f32(unsigned u) { return __uint_as_float(u); }
#else
static unsigned f32_bits(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
static float bits_f32(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
#endif

__device__ unsigned short f32_to_f16(float x);
__device__ float f16_to_f32(unsigned short h);

__device__ float widen(float v) { return v; }
__device__ double widen(double v) { return v; }
__device__ float widen(bf16 v) { return bits_f32((unsigned)v.bits << 16); }
__device__ float widen(f16 v) { return f16_to_f32(v.bits); }

__device__ void put(float* p, float v) { *p = v; }
__device__ void put(double* p, double v) { *p = v; }
__device__ void put(bf16* p, float v) {
#if defined(__CUDACC_RTC__) && __CUDA_ARCH__ >= 800
    // one instruction instead of the six below (the logits pass stores one per class)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(p->bits) : "f"(v));
#else
    unsigned u = f32_bits(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p->bits = 0x7fc0; return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                      // nearest even
    p->bits = (unsigned short)(u >> 16);
#endif
}
__device__ void put(f16* p, float v) { p->bits = f32_to_f16(v); }

// exp and max in the arithmetic type: float ones on the float32 and 16-bit paths (the
// float64 versions cost the logits pass several times its memory traffic). The exp of an
// entry of a stash of type S: a 16-bit stash keeps 8 or 11 bits, so there the hardware's
// approximation does (2 ulp near the tile max, a few more far below it, where the terms
// are negligible; 2 instructions instead of 9); the float32 and float64 paths stay exact.
template <typename S> __device__ float stash_exp(float v) {
#ifdef __CUDACC_RTC__
    if (sizeof(S) == 2) return __expf(v);
#endif
    return expf(v);
}
template <typename S> __device__ double stash_exp(double v) { return exp(v); }
__device__ float amax(float a, float b) { return fmaxf(a, b); }
__device__ double amax(double a, double b) { return fmax(a, b); }
// A cosine clamped to [-1, 1] in the arithmetic type (NaN stays NaN).
template <typename A> __device__ A clamp_cos(A c) {
    return c > (A)1 ? (A)1 : (c < (A)-1 ? (A)-1 : c);
}

// A margin is a parameter block of MARGIN_PARAMS doubles, [kind, s, p0, p1, ...], as
// Margin::encode in margin.rs writes it; the MARGIN_<KIND> codes and MARGIN_PARAMS are
// #defined in front of this file from margin.rs (cuda/mod.rs, margin_defines).
#ifndef MARGIN_PARAMS
#error "compile with the margin definitions of cuda::margin_defines"
#endif

__device__ void angular(double c, double m1, double m2, double m3, double* psi, double* dpsi) {
    double theta = acos(c);
    double theta_star = (PI_D - m2) / m1;
    if (theta > theta_star) {
        double k = fmax(m2 * sin(m2), 1.0 + cos(theta_star));
        *psi = c - m3 - k;
        *dpsi = 1.0;
        return;
    }
    *psi = cos(m1 * theta + m2) - m3;
    double t = fmin(fmax(theta, THETA_EPS), PI_D - THETA_EPS);
    *dpsi = m1 * sin(m1 * t + m2) / sin(t);
}

__device__ void sphere(double c, int m, double* psi, double* dpsi) {
    double theta = acos(c);
    int k = (int)floor(m * theta / PI_D);
    if (k > m - 1) k = m - 1;
    double sign = (k % 2 == 0) ? 1.0 : -1.0;
    double t, u;
    if (m == 1) { t = c; u = 1.0; }
    else if (m == 2) { t = 2.0 * c * c - 1.0; u = 2.0 * c; }
    else if (m == 3) { t = 4.0 * c * c * c - 3.0 * c; u = 4.0 * c * c - 1.0; }
    else { double c2 = c * c; t = 8.0 * c2 * c2 - 8.0 * c2 + 1.0; u = 8.0 * c2 * c - 4.0 * c; }
    *psi = sign * t - 2.0 * k;
    *dpsi = sign * m * u;
}

#define ADAFACE_EPS 1e-3

// The margins' one switch: psi, psi' and d psi / d norm of block `p` at target cosine c for
// a row whose feature norm is `norm` (Margin::target in margin.rs).
__device__ void psi_dpsi(const double* p, double c, double norm, double* psi, double* dpsi,
                         double* dnorm) {
    c = fmin(fmax(c, -1.0), 1.0);
    *dnorm = 0.0;
    const double* a = p + 2;  // the parameters after [kind, s]
    switch ((int)p[0]) {
        case MARGIN_SOFTMAX: *psi = c; *dpsi = 1.0; return;
        case MARGIN_COSFACE: *psi = c - a[0]; *dpsi = 1.0; return;
        case MARGIN_ARCFACE:
            if (a[1] != 0.0 && c <= 0.0) { *psi = c; *dpsi = 1.0; return; }  // easy_margin
            angular(c, 1.0, a[0], 0.0, psi, dpsi);
            if (a[2] != 0.0) *dpsi = 1.0;  // straight-through
            return;
        case MARGIN_COMBINED:
            angular(c, a[0], a[1], a[2], psi, dpsi);
            if (a[3] != 0.0) *dpsi = 1.0;
            return;
        case MARGIN_ADAFACE: {
            double m = a[0], z = a[1];
            double cc = fmin(fmax(c, -1.0 + ADAFACE_EPS), 1.0 - ADAFACE_EPS);
            double theta = acos(cc), shifted = theta - m * z;
            double t = fmin(fmax(shifted, ADAFACE_EPS), PI_D - ADAFACE_EPS);
            *psi = cos(t) - (m + m * z);
            *dpsi = (cc == c && t == shifted) ? sin(t) / sin(theta) : 0.0;
            return;
        }
        case MARGIN_MAGFACE: {
            double l_a = a[0], u_a = a[1], l_m = a[2], u_m = a[3];
            double n = fmin(fmax(norm, l_a), u_a);
            double slope = (u_m - l_m) / (u_a - l_a), m = l_m + slope * (n - l_a);
            if (a[4] != 0.0 && c <= 0.0) { *psi = c; *dpsi = 1.0; return; }
            angular(c, 1.0, m, 0.0, psi, dpsi);
            double theta = acos(c), dm;
            if (theta > PI_D - m)
                dm = (m * sin(m) >= 1.0 - cos(m)) ? -(sin(m) + m * cos(m)) : -sin(m);
            else
                dm = -sin(theta + m);
            *dnorm = (norm >= l_a && norm <= u_a) ? dm * slope : 0.0;
            return;
        }
        case MARGIN_CURRICULARFACE: angular(c, 1.0, a[0], 0.0, psi, dpsi); return;
        case MARGIN_MVSOFTMAX:
            if (a[2] != 0.0) {  // angular: cos(theta + m) where c > 0
                if (c > 0.0) angular(c, 1.0, a[0], 0.0, psi, dpsi);
                else { *psi = c; *dpsi = 1.0; }
            } else {
                *psi = c > a[0] ? c - a[0] : c;
                *dpsi = 1.0;
            }
            return;
        case MARGIN_SPHEREFACE: {
            double s, d, lambda = a[1];
            sphere(c, (int)a[0], &s, &d);
            *psi = (lambda * c + s) / (1.0 + lambda);
            *dpsi = (lambda + d) / (1.0 + lambda);
            return;
        }
        default: *psi = NAN_D; *dpsi = NAN_D;  // Margin::decode refuses unknown kinds
    }
}

// The rule for a row's hard negatives (Margin::hard_negatives in margin.rs): non-target
// cosines above `above` become c (t + c) (CurricularFace) or t c + t - 1 (MV-Softmax);
// above = +inf for the margins that leave non-targets alone.
__device__ void hard_rule(const double* p, double c, double* above, double* t,
                          double* curricular) {
    c = fmin(fmax(c, -1.0), 1.0);
    const double* a = p + 2;
    double shifted = cos(acos(c) + a[0]);  // cos(theta + m), without ArcFace's fallback
    *t = a[1];
    *curricular = 0.0;
    switch ((int)p[0]) {
        case MARGIN_CURRICULARFACE: *above = shifted; *curricular = 1.0; return;
        case MARGIN_MVSOFTMAX: *above = a[2] != 0.0 ? shifted : c - a[0]; return;
        default: *above = INFINITY; *t = 0.0;
    }
}

// h(c) and h'(c) of a non-target cosine (kernels::NonTarget::apply in kernels.rs): above
// `filter` it becomes 0 without gradient (inter-class filtering), then the hard-negative rule.
template <typename T>
__device__ void nontarget(T c, T filter, T above, T t, bool curricular, T* h, T* dh) {
    T d = (T)1;
    if (c > filter) { c = (T)0; d = (T)0; }
    if (c <= above) { *h = c; *dh = d; }
    else if (curricular) { *h = c * (t + c); *dh = d * (t + c + c); }
    else { *h = t * c + t - (T)1; *dh = d * t; }
}

// A row's loss term besides the softmax and its d / d norm: MagFace's regulariser
// lambda_g (a / u_a^2 + 1 / a), a = clamp(norm, l_a, u_a) (Margin::penalty in margin.rs).
__device__ void penalty(const double* p, double norm, double* value, double* dvalue) {
    *value = 0.0;
    *dvalue = 0.0;
    if ((int)p[0] != MARGIN_MAGFACE) return;
    const double* a = p + 2;
    double l_a = a[0], u_a = a[1], lambda_g = a[5];
    double n = fmin(fmax(norm, l_a), u_a);
    *value = lambda_g * (n / (u_a * u_a) + 1.0 / n);
    if (norm >= l_a && norm <= u_a) *dvalue = lambda_g * (1.0 / (u_a * u_a) - 1.0 / (n * n));
}

// One thread per point: psi and psi' of one margin block over n cosines and norms (the
// margin-grid test compares this switch with margin.rs).
extern "C" __global__ void margin_grid(const double* margin, const double* c,
                                       const double* norm, int n, double* psi, double* dpsi,
                                       double* dnorm) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) psi_dpsi(margin, c[i], norm[i], psi + i, dpsi + i, dnorm + i);
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024) of one double per thread.
__device__ double block_sum(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    double out = shared[0];
    __syncthreads();
    return out;
}

__device__ double block_max(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : -INFINITY;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffff, v, o));
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    double out = shared[0];
    __syncthreads();
    return out;
}

// a · b over d elements, summed in float64 by the whole block.
template <typename A, typename B>
__device__ double row_dot(const A* a, const B* b, int d, double* shared) {
    double s = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        s += (double)widen(a[j]) * (double)widen(b[j]);
    return block_sum(s, shared);
}

// The block's row norm in float64; a zero or non-finite one raises bad[0] to r + 1.
template <typename T>
__device__ double checked_norm(const T* row, int d, int r, int* bad, double* shared) {
    double n = sqrt(row_dot(row, row, d, shared));
    if (threadIdx.x == 0 && (!(n > 0.0) || !isfinite(n))) atomicMax(bad, r + 1);
    return n;
}

// One block per row: x̂ = x / ||x|| stored as S (the GEMMs' operand), norms in float64.
template <typename X, typename S>
__device__ void normalize_rows(const X* x, S* xhat, double* norms, int rows, int d, int* bad) {
    typedef typename Acc<S>::type A;
    __shared__ double shared[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const X* row = x + (long long)r * d;
    double n = checked_norm(row, d, r, bad, shared);
    if (threadIdx.x == 0) norms[r] = n;
    A inv = (A)(1.0 / n);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        put(xhat + (long long)r * d + j, (A)widen(row[j]) * inv);
}

// V consecutive elements of T loaded or stored as one access of V * sizeof(T) bytes (8 or
// 16): a warp whose lanes each move one float32 moves 128 bytes per instruction, too few in
// flight for the passes over the logits or the weight to reach the memory bandwidth; 16
// bytes a lane move 512. Used where the row is a multiple of V and the pointers are aligned
// for it (the buffers are 256-byte aligned and tiles hold 16384 classes); else element by
// element.
template <typename T, int V> struct alignas(V * sizeof(T)) Vec { T v[V]; };
template <typename T, int V> __device__ bool vec_aligned(const T* p) {
    return ((unsigned long long)p & (V * sizeof(T) - 1)) == 0;
}
template <typename T, int V> __device__ Vec<T, V> load_vec(const T* p) {
    return *(const Vec<T, V>*)p;
}
template <typename T, int V> __device__ void store_vec(T* p, const Vec<T, V>& q) {
    *(Vec<T, V>*)p = q;
}
// 16-byte accesses a lane (or thread) of a streaming pass issues before it uses any: the
// loads of one warp then keep up to 2 KiB in flight, not 512 bytes.
#define LANE_VECS 4
template <typename T> using Quad = Vec<T, 4>;
template <typename T> __device__ bool quad_aligned(const T* p) { return vec_aligned<T, 4>(p); }
template <typename T> __device__ Quad<T> load_quad(const T* p) { return load_vec<T, 4>(p); }
template <typename T> __device__ void store_quad(T* p, const Quad<T>& q) { store_vec<T, 4>(p, q); }

// One warp per class centre of a tile (rows `first` .. `first + rows` of the weight): its
// inverse norm when `w_inv` is not null (a zero or non-finite centre raises bad[0] to its
// class + 1), and its copy rounded to S when `copy` is not null (the operand of the
// half-precision GEMMs, one tile at a time: a whole 16-bit copy of a float32 weight would
// cost half its size again in device memory).
// Each lane moves 16 bytes of the weight per access where the row allows (see Vec).
template <typename W, typename S, typename A>
__device__ void weights_tile(const W* w, S* copy, A* w_inv, int rows, int d, int first,
                             int* bad, int block) {
    typedef typename Acc<W>::type WA;
    typedef typename Acc<S>::type SA;
    const int V = 16 / sizeof(W);
    int lane = threadIdx.x & 31;
    int r = block * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // the whole warp leaves: no barrier is left waiting
    const W* row = w + (long long)r * d;
    S* out = copy ? copy + (long long)r * d : nullptr;
    double ss = 0.0;
    if (d % V == 0 && vec_aligned<W, V>(row) && (out == nullptr || vec_aligned<S, V>(out))) {
        // a lane's LANE_VECS accesses loaded before any is used or stored: the compiler
        // cannot move a load above a store to `out`, which might alias the row
        const int vecs = d / V;
        for (int q0 = lane; q0 < vecs; q0 += 32 * LANE_VECS) {
            Vec<W, V> wv[LANE_VECS] = {};
#pragma unroll
            for (int u = 0; u < LANE_VECS; ++u)
                if (q0 + 32 * u < vecs) wv[u] = load_vec<W, V>(row + (q0 + 32 * u) * V);
#pragma unroll
            for (int u = 0; u < LANE_VECS; ++u) {
                int q = q0 + 32 * u;
                if (q >= vecs) break;
                for (int i = 0; i < V; ++i) {
                    WA v = widen(wv[u].v[i]);
                    ss += (double)v * (double)v;
                }
                if (out) {
                    Vec<S, V> sv;
                    for (int i = 0; i < V; ++i) put(&sv.v[i], (SA)widen(wv[u].v[i]));
                    store_vec<S, V>(out + q * V, sv);
                }
            }
        }
    } else {
        for (int j = lane; j < d; j += 32) {
            WA v = widen(row[j]);
            ss += (double)v * (double)v;
            if (out) put(out + j, (SA)v);
        }
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_down_sync(0xffffffff, ss, o);
    if (lane == 0 && w_inv) {
        double n = sqrt(ss);
        if (!(n > 0.0) || !isfinite(n)) atomicMax(bad, first + r + 1);
        w_inv[r] = (A)(1.0 / n);
    }
}

// Per row with a label: the target's cosine, psi and psi', and the scaled target logit
// rounded to A as the logits are computed. `xh` holds x̂, or when `raw_x` the rows of x
// themselves (the half-precision path keeps x̂ only in 16 bits; the cosine is then
// (x · w) / (||x|| ||w||) in float64). Row r's margin block is margins + r * margin_stride
// (stride 0: one margin for all rows). Labels are -1 (ignored) or, for one shard of a
// sharded head (`sharded`), REMOTE_TARGET: `target_cos` (null unless the margin has hard
// negatives) then gives every row's target cosine. Any other label outside [0, classes)
// raises bad[2] to r + 1 (the caller raises; the row is treated as ignored meanwhile).
// norm_extra[3r..3r+3]: d psi / d norm, the row's penalty and its d / d norm (MagFace;
// zeros for the others). rules[3r..3r+3]: the row's hard-negative rule (above, t,
// curricular; above = +inf: none).
template <typename XH, typename W, typename A>
__device__ void targets(const XH* xh, int raw_x, const W* weight, const long long* labels,
                        int classes, int k, int sharded, const double* row_scale,
                        const double* norms, int rows, int d, const double* margins,
                        int margin_stride, const double* target_cos, double* target_logit,
                        double* target_dpsi, double* norm_extra, double* rules, int* target_sub,
                        int* bad) {
    __shared__ double shared[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    long long y = labels[r];
    bool remote = sharded && y == REMOTE_TARGET;
    if (y >= classes || (y < 0 && y != -1 && !remote)) {
        if (threadIdx.x == 0) atomicMax(bad + 2, r + 1);
        y = -1;
    }
    if (y < 0) {
        if (threadIdx.x == 0) {
            target_sub[r] = 0;
            target_logit[r] = 0.0;
            target_dpsi[r] = 0.0;
            norm_extra[3 * r] = norm_extra[3 * r + 1] = norm_extra[3 * r + 2] = 0.0;
            rules[3 * r] = INFINITY;
            rules[3 * r + 1] = rules[3 * r + 2] = 0.0;
            if (remote) {
                // another shard holds the target: the row still pays its penalty, and its
                // hard negatives here follow the target cosine that shard measured
                const double* p = margins + (long long)r * margin_stride;
                penalty(p, norms[r], norm_extra + 3 * r + 1, norm_extra + 3 * r + 2);
                if (target_cos)
                    hard_rule(p, target_cos[r], rules + 3 * r, rules + 3 * r + 1, rules + 3 * r + 2);
            }
        }
        return;
    }
    // the class's cosine: its closest centre's (the first of equals), as head/prepare.rs takes it
    double c = -INFINITY;
    int sub = 0;
    for (int a = 0; a < k; ++a) {
        const W* w = weight + (y * k + a) * d;
        double dot = row_dot(xh + (long long)r * d, w, d, shared);
        double ww = row_dot(w, w, d, shared);
        double ca = dot / sqrt(ww);
        if (raw_x) ca /= norms[r];
        if (!isfinite(ca)) ca = 0.0;
        if (ca > c) { c = ca; sub = a; }
    }
    if (threadIdx.x == 0) {
        target_sub[r] = sub;
        const double* p = margins + (long long)r * margin_stride;
        double psi, dpsi, dnorm;
        psi_dpsi(p, c, norms[r], &psi, &dpsi, &dnorm);
        target_logit[r] = (double)(A)(row_scale[r] * psi);
        target_dpsi[r] = dpsi;
        norm_extra[3 * r] = dnorm;
        penalty(p, norms[r], norm_extra + 3 * r + 1, norm_extra + 3 * r + 2);
        hard_rule(p, c, rules + 3 * r, rules + 3 * r + 1, rules + 3 * r + 2);
    }
}

// One block per row of a tile of raw dot products x̂·w (cuBLAS, type Z) over the weight rows
// lo.. lo + ct, k per class (sub-centres; k = 1 without): a class's cosine is its closest
// centre's (the first of equals; the target class's is `target_sub`'s, the centre its
// logit was computed from), c = clamp(dot * inv), z = scale * h(c) under the row's
// non-target rule (`rules`, `filter`; h(c) = c for plain heads), the target logit for the
// target class; the tile's row statistics over classes (max, Σe, Σe·z) go to stats[row * 3
// ..] and the stash (type S, one entry per centre; the same memory as z on the float32 and
// float64 paths) gets e h'(c) / ||w||, e = exp(z - tile max), on the class's chosen centre
// and 0 on its others and on the target's centre. dL/dcos / ||w|| of a non-target centre is
// then that times a factor of the row and tile alone (tile_factor), which the gradient pass
// folds into the GEMMs' other operand instead of rewriting the stash; target_grads adds the
// target's term. Elements are computed in A (each thread's sums too: at most ct / blockDim.x
// terms), the block's sums in float64.
template <bool PLAIN = false, typename Z, typename A>
__device__ A tile_logit(const Z* row, int j, int k, const A* w_inv, A scale, A filter, A above,
                        A t, bool curricular, int target, int target_sub, A target_logit,
                        A* dh, int* arg) {
    int first = j * k;
    A c = (A)widen(row[first]) * w_inv[first];
    *arg = 0;
    if (j == target) {
        *arg = target_sub;
        c = (A)widen(row[first + target_sub]) * w_inv[first + target_sub];
    } else {
        for (int a = 1; a < k; ++a) {
            A ca = (A)widen(row[first + a]) * w_inv[first + a];
            if (ca > c) { c = ca; *arg = a; }
        }
    }
    c = clamp_cos(c);
    A h;
    if (PLAIN) {  // what nontarget gives when no filter or rule applies
        h = c;
        *dh = (A)1;
    } else {
        nontarget(c, filter, above, t, curricular, &h, dh);
    }
    return j == target ? target_logit : scale * h;
}

// body(q, z, w) for each quad q of a row of nq quads that this thread takes (block size
// apart), with the quad z of the row and w of the inverse norms: LANE_VECS quads loaded
// before the first is used.
template <typename Z, typename A, typename Body>
__device__ void each_quad(const Z* row, const A* w_inv, int nq, Body body) {
    for (int q0 = threadIdx.x; q0 < nq; q0 += LANE_VECS * blockDim.x) {
        Quad<Z> zq[LANE_VECS] = {};
        Quad<A> wq[LANE_VECS] = {};
#pragma unroll
        for (int u = 0; u < LANE_VECS; ++u) {
            int q = q0 + u * blockDim.x;
            if (q < nq) {
                zq[u] = load_quad(row + 4 * q);
                wq[u] = load_quad(w_inv + 4 * q);
            }
        }
#pragma unroll
        for (int u = 0; u < LANE_VECS; ++u) {
            int q = q0 + u * blockDim.x;
            if (q >= nq) break;
            body(q, zq[u], wq[u]);
        }
    }
}

// logits_tile's passes over a row of one centre per class, four classes per access (the
// target's index in quad q is target - 4q): the tile max (over the block), then this
// thread's sums of e and e z, writing its stash quads. Each thread loads LANE_VECS quads
// before it uses any, in both passes (the second writes the stash, which the compiler
// cannot tell from the row: on the float32 path it is the row). PLAIN: the row has no
// filter or hard-negative rule, so a non-target logit is scale * clamp(c), which never
// decreases with c (scale > 0): the first pass takes the max of the non-target c alone, and
// the tile max is that logit or the target's, the same value for a fraction of the work.
template <bool PLAIN, typename Z, typename S, typename A>
__device__ void logits_quads(const Z* row, S* out, int ct, const A* w_inv, A scale, A f,
                             A above, A t, bool curricular, int target, A tl, double* shared,
                             A* m_out, A* s_out, A* sz_out) {
    const int nq = ct >> 2;
    A m = (A)-INFINITY, c_max = (A)-INFINITY, dh;
    int arg;
    each_quad(row, w_inv, nq, [&](int q, const Quad<Z>& zq, const Quad<A>& wq) {
        for (int i = 0; i < 4; ++i) {
            if (PLAIN) {
                if (4 * q + i != target) c_max = amax(c_max, (A)widen(zq.v[i]) * wq.v[i]);
            } else {
                m = amax(m, tile_logit(zq.v, i, 1, wq.v, scale, f, above, t, curricular,
                                       target - 4 * q, 0, tl, &dh, &arg));
            }
        }
    });
    if (PLAIN) {
        if (c_max > (A)-INFINITY) m = scale * clamp_cos(c_max);
        if (target >= 0 && threadIdx.x == 0) m = amax(m, tl);
    }
    m = (A)block_max((double)m, shared);
    A s = (A)0, sz = (A)0;
    // the same thread recomputes its own elements: the row still holds the dot products
    each_quad(row, w_inv, nq, [&](int q, const Quad<Z>& zq, const Quad<A>& wq) {
        Quad<S> sq;
        for (int i = 0; i < 4; ++i) {
            A v = tile_logit<PLAIN>(zq.v, i, 1, wq.v, scale, f, above, t, curricular,
                                    target - 4 * q, 0, tl, &dh, &arg);
            A e = stash_exp<S>(v - m);
            s += e;
            sz += e * v;
            put(&sq.v[i], i == target - 4 * q ? (A)0 : e * dh * wq.v[i]);
        }
        store_quad(out + 4 * q, sq);
    });
    *m_out = m;
    *s_out = s;
    *sz_out = sz;
}

template <typename Z, typename S, typename A>
__device__ void logits_tile(const Z* z, S* stash, int rows, int ct, int lo, int k,
                            const A* w_inv, const double* row_scale, const long long* labels,
                            const double* target_logit, const int* target_sub,
                            const double* rules, double filter, A* tile_max, double* stats,
                            int block) {
    __shared__ double shared[32];
    int r = block;
    if (r >= rows) return;
    const Z* row = z + (long long)r * ct;
    S* out = stash + (long long)r * ct;
    A scale = (A)row_scale[r], f = (A)filter;
    const double* rule = rules + 3 * r;
    A above = (A)rule[0], t = (A)rule[1];
    bool curricular = rule[2] != 0.0;
    long long y = labels[r];
    int classes = ct / k, class_lo = lo / k;
    int target = (y >= class_lo && y < (long long)class_lo + classes) ? (int)(y - class_lo) : -1;
    int sub = target_sub[r];
    A tl = (A)target_logit[r];
    A m = (A)-INFINITY, dh;
    int arg;
    A s = (A)0, sz = (A)0;
    if (k == 1 && (ct & 3) == 0 && quad_aligned(row) && quad_aligned(out) &&
        quad_aligned(w_inv)) {
        // the whole block takes the same branch: the row's rule is the block's
        if (f >= (A)1 && above >= (A)1)
            logits_quads<true>(row, out, ct, w_inv, scale, f, above, t, curricular, target, tl,
                               shared, &m, &s, &sz);
        else
            logits_quads<false>(row, out, ct, w_inv, scale, f, above, t, curricular, target, tl,
                                shared, &m, &s, &sz);
    } else {
#pragma unroll 4
        for (int j = threadIdx.x; j < classes; j += blockDim.x)
            m = amax(m, tile_logit(row, j, k, w_inv, scale, f, above, t, curricular, target, sub,
                                   tl, &dh, &arg));
        m = (A)block_max((double)m, shared);
#pragma unroll 4
        for (int j = threadIdx.x; j < classes; j += blockDim.x) {
            A v = tile_logit(row, j, k, w_inv, scale, f, above, t, curricular, target, sub, tl,
                             &dh, &arg);
            A e = stash_exp<S>(v - m);
            s += e;
            sz += e * v;
            A g = j == target ? (A)0 : e * dh * w_inv[j * k + arg];
            for (int a = 0; a < k; ++a) put(out + j * k + a, a == arg ? g : (A)0);
        }
    }
    double sum = block_sum((double)s, shared);
    double sum_z = block_sum((double)sz, shared);
    if (threadIdx.x == 0) {
        tile_max[r] = m;
        stats[r * 3] = (double)m;
        stats[r * 3 + 1] = sum;
        stats[r * 3 + 2] = sum_z;
    }
}

// One thread per element: out[i] = v.
extern "C" __global__ void fill_f64(double* out, double v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = v;
}

// A gradient times the upstream gradient `*scale` (a float64 scalar on the device), in
// place. Every block returns at once when the scalar is exactly 1 (what loss.backward()
// passes), so the common step pays one launch rather than a pass over the (C, D) weight
// gradient, and the host never reads the scalar (that would wait for the GPU). The product
// is taken in the accumulator type with the scalar rounded to it first, as torch's
// `g * upstream.to(g.dtype)` would for float32.
template <typename T>
__device__ void scale_unless_one(T* g, long long n, const double* scale) {
    typedef typename Acc<T>::type A;
    const double s = *scale;
    if (s == 1.0) return;
    const A a = (A)s;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
        put(g + i, (A)(widen(g[i]) * a));
}

#define ENTRY_SCALE(T, N)                                                                      \
    extern "C" __global__ void scale_unless_one_##N(T* g, long long n, const double* scale) { \
        scale_unless_one(g, n, scale);                                                         \
    }
ENTRY_SCALE(float, f32)
ENTRY_SCALE(double, f64)
ENTRY_SCALE(bf16, bf16)
ENTRY_SCALE(f16, f16)

// One thread per row: the tiles' statistics merged into the row's part over this set of
// classes, parts[4r..4r+4] = [max, Σe, Σe·z, target logit] (head/shard.rs RowPart); a sharded
// head merges the shards' parts between this kernel and finish_stats.
extern "C" __global__ void merge_stats(const double* stats, int tiles, int rows,
                                       const double* target_logit, double* parts) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    double m = -INFINITY;
    for (int t = 0; t < tiles; ++t) m = fmax(m, stats[((long long)t * rows + r) * 3]);
    double s = 0.0, sz = 0.0;
    for (int t = 0; t < tiles; ++t) {
        const double* st = stats + ((long long)t * rows + r) * 3;
        double f = exp(st[0] - m);
        s += st[1] * f;
        sz += st[2] * f;
    }
    double* part = parts + 4 * (long long)r;
    part[0] = m;
    part[1] = s;
    part[2] = sz;
    part[3] = target_logit[r];
}

// One thread per row: lse and Σ p z from the row's part over all classes, whose target
// logit (another shard's, when that shard holds the target) the row losses read.
extern "C" __global__ void finish_stats(const double* parts, int rows, double* lse, double* pz,
                                        double* target_logit) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const double* part = parts + 4 * (long long)r;
    lse[r] = part[0] + log(part[1]);
    pz[r] = part[2] / part[1];
    target_logit[r] = part[3];
}

// One thread per row: the row's loss (0 when ignored, plus its penalty) and the term of
// d loss / d x along x̂: row_weight (Σ p z - z_target) / ||x|| when the scale is ||x||, and
// MagFace's row_weight (s (p_target - 1) d psi / d norm + d penalty / d norm). Of a sharded
// head's shards, each returns the whole loss but only the first adds the terms that do not
// split over classes (the scale's and the penalty's); d psi / d norm is the target shard's.
extern "C" __global__ void row_losses(const double* lse, const double* pz,
                                      const double* target_logit, const long long* labels,
                                      const double* row_weight, const double* row_scale,
                                      const double* norm_extra, int feature_norm,
                                      int first_shard, int rows, double* loss,
                                      double* norm_term) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    bool valid = labels[r] != -1;
    const double* extra = norm_extra + 3 * r;
    loss[r] = valid ? lse[r] - target_logit[r] + extra[1] : 0.0;
    double term = 0.0;
    if (valid) {
        if (first_shard) {
            if (feature_norm) term = row_weight[r] * (pz[r] - target_logit[r]) / row_scale[r];
            term += row_weight[r] * extra[2];
        }
        double p = exp(target_logit[r] - lse[r]);
        term += row_weight[r] * row_scale[r] * (p - 1.0) * extra[0];
    }
    norm_term[r] = term;
}

// The factor that turns a row's stash entries of one tile into dL/dcos / ||w||: the row's
// weight times its scale times exp(tile max - lse) (so that with the stash's exp(z - tile
// max) it makes the softmax's p). 0 for an ignored row, whose lse may not be finite.
__device__ double tile_factor(double weight, double scale, double tile_max, double lse) {
    return weight == 0.0 ? 0.0 : weight * scale * exp(tile_max - lse);
}

// One block per row of a chunk, between two class tiles of the gradient pass. The stash of a
// tile is dL/dcos up to the factor of each (row, tile), so the two GEMMs take the factor on
// their B-sized side instead of a pass over the stash: when `dxt` is not null it holds the
// previous tile's stash times its centres (a dX̂ GEMM into scratch), added to dX̂ times that
// tile's factor (`prev_max`); when `xs` is not null it gets this tile's factor times x̂ = x /
// ||x|| (type S, rounded once), the dW GEMM's operand.
template <typename X, typename S, typename A>
__device__ void tile_rows(const A* dxt, const A* prev_max, A* dxhat, const X* x,
                          const double* norms, const A* tile_max, S* xs, const double* lse,
                          const double* row_weight, const double* row_scale, int rows, int d,
                          int block) {
    int r = block;
    if (r >= rows) return;
    long long at = (long long)r * d;
    if (dxt != 0) {
        A f = (A)tile_factor(row_weight[r], row_scale[r], (double)prev_max[r], lse[r]);
        for (int j = threadIdx.x; j < d; j += blockDim.x) dxhat[at + j] += f * dxt[at + j];
    }
    if (xs != 0) {
        A f = (A)tile_factor(row_weight[r], row_scale[r], (double)tile_max[r], lse[r]);
        A inv = (A)(1.0 / norms[r]);
        for (int j = threadIdx.x; j < d; j += blockDim.x)
            put(xs + at + j, (A)widen(x[at + j]) * inv * f);
    }
}

// Row r's target centre (its class times k plus its chosen sub-centre), or -1 when the row
// is ignored or its target is not among these `classes` (another shard's).
__device__ long long target_centre(const long long* labels, const int* target_sub,
                                   const double* row_weight, int classes, int k, int r) {
    long long y = labels[r];
    if (y < 0 || y >= classes || row_weight[r] == 0.0) return -1;
    return y * k + target_sub[r];
}

// The target's dL/dcos / ||w_y|| of row r: weight · scale · (p - 1) psi'(cos), p from the
// target logit and the row's lse, in float64 (the stash holds 0 there).
__device__ double target_grad(const double* row_weight, const double* row_scale,
                              const double* target_logit, const double* lse,
                              const double* target_dpsi, double w_inv, int r) {
    double p = exp(target_logit[r] - lse[r]);
    return row_weight[r] * row_scale[r] * (p - 1.0) * target_dpsi[r] * w_inv;
}

// One block per row of a chunk, after its class tiles: the target terms the stash leaves
// out, in float64 from the weight itself (type W, not its 16-bit copy). dX̂ of row r (when
// `dxhat` is not null) gets g w_y; the row of dW of the target centre (when `dw` is not
// null; already projected) gets g (x̂ - ŵ_y cos), the projection of g x̂, summed
// over the chunk's rows of that centre by the block of the first of them (no atomics, no
// race). dW is in the weight's type W.
template <typename X, typename W, typename A>
__device__ void target_grads(const X* x, const double* norms, const W* weight, const A* w_inv,
                             const long long* labels, const int* target_sub, int classes,
                             int k, const double* lse, const double* target_logit,
                             const double* target_dpsi, const double* row_weight,
                             const double* row_scale, int rows, int d, A* dxhat, W* dw) {
    __shared__ double shared[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    long long centre = target_centre(labels, target_sub, row_weight, classes, k, r);
    if (centre < 0) return;
    const W* wr = weight + centre * d;
    double w_inv_y = (double)w_inv[centre];
    if (dxhat != 0) {
        double g = target_grad(row_weight, row_scale, target_logit, lse, target_dpsi, w_inv_y, r);
        for (int j = threadIdx.x; j < d; j += blockDim.x)
            dxhat[(long long)r * d + j] += (A)(g * (double)widen(wr[j]));
    }
    if (dw == 0) return;
    for (int q = 0; q < r; ++q)  // an earlier row of this centre adds its terms
        if (target_centre(labels, target_sub, row_weight, classes, k, q) == centre) return;
    W* out = dw + centre * d;
    for (int q = r; q < rows; ++q) {
        if (target_centre(labels, target_sub, row_weight, classes, k, q) != centre) continue;
        double g = target_grad(row_weight, row_scale, target_logit, lse, target_dpsi, w_inv_y, q);
        const X* xq = x + (long long)q * d;
        double inv_x = 1.0 / norms[q];
        double cos = row_dot(xq, wr, d, shared) * inv_x * w_inv_y;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            double along = (double)widen(xq[j]) * inv_x - (double)widen(wr[j]) * w_inv_y * cos;
            put(out + j, (typename Acc<W>::type)((double)widen(out[j]) + g * along));
        }
    }
}

// One warp per row of dW (type G, 8 rows a block): removes the component along w_j (the
// normalisation's Jacobian); w holds the tile's centres in W (the weight itself, or on the
// half-precision path its 16-bit copy). A row of up to PROJECT_VECS accesses per lane (d up
// to 1024 in float32) is read once, by 16-byte accesses (see Vec), into registers, and
// written back from them; other rows are read twice, an element at a time.
#define PROJECT_VECS 8
template <typename G, typename W, typename A>
__device__ void project_out_rows(G* g, const W* w, const A* w_inv, int rows, int d, int block) {
    typedef typename Acc<G>::type GA;
    const int V = 16 / (sizeof(G) > sizeof(W) ? sizeof(G) : sizeof(W));
    int lane = threadIdx.x & 31;
    int r = block * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // the whole warp leaves
    G* gr = g + (long long)r * d;
    const W* wr = w + (long long)r * d;
    const int n = d / V;
    const bool in_registers = d % V == 0 && n <= 32 * PROJECT_VECS && vec_aligned<G, V>(gr) &&
                              vec_aligned<W, V>(wr);
    double dot = 0.0;
    Vec<G, V> gv[PROJECT_VECS];
    Vec<W, V> wv[PROJECT_VECS];
    if (in_registers) {
#pragma unroll
        for (int t = 0; t < PROJECT_VECS; ++t) {  // every load issued before any is used
            int q = lane + 32 * t;
            if (q < n) {
                gv[t] = load_vec<G, V>(gr + q * V);
                wv[t] = load_vec<W, V>(wr + q * V);
            }
        }
#pragma unroll
        for (int t = 0; t < PROJECT_VECS; ++t)
            if (lane + 32 * t < n)
                for (int i = 0; i < V; ++i)
                    dot += (double)widen(gv[t].v[i]) * (double)widen(wv[t].v[i]);
    } else {
#pragma unroll 4
        for (int j = lane; j < d; j += 32) dot += (double)widen(gr[j]) * (double)widen(wr[j]);
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
    GA k = (GA)(dot * (double)w_inv[r] * (double)w_inv[r]);
    if (in_registers) {
#pragma unroll
        for (int t = 0; t < PROJECT_VECS; ++t) {
            int q = lane + 32 * t;
            if (q < n) {
                Vec<G, V> out;
                for (int i = 0; i < V; ++i)
                    put(&out.v[i], (GA)widen(gv[t].v[i]) - (GA)widen(wv[t].v[i]) * k);
                store_vec<G, V>(gr + q * V, out);
            }
        }
    } else {
#pragma unroll 4
        for (int j = lane; j < d; j += 32) put(gr + j, (GA)widen(gr[j]) - (GA)widen(wr[j]) * k);
    }
}

// One block per row: dx = (dx̂ - x̂ (x̂·dx̂)) / ||x|| + x̂ * norm_term, with x̂ = x / ||x||
// rounded as normalize_rows rounds it.
template <typename T>
__device__ void finish_grad_emb(T* dxhat, const T* x, const double* norms,
                                const double* norm_term, int rows, int d) {
    __shared__ double shared[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    T* g = dxhat + (long long)r * d;
    const T* xr = x + (long long)r * d;
    T inv = (T)(1.0 / norms[r]);
    double s = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += (double)g[j] * (double)(xr[j] * inv);
    double dot = block_sum(s, shared);
    T extra = (T)norm_term[r];
    T dt = (T)dot;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        T xh = xr[j] * inv;
        g[j] = (g[j] - xh * dt) * inv + xh * extra;
    }
}

// The entry points. S names the storage of the GEMM operands and the stash: f32 and f64 are
// the exact paths (everything in T, the stash in place of the logits); bf16 and f16 the
// half-precision path (x in float32, 16-bit operands, float32 logits, dW and dX̂, row
// statistics in float64). Entries named <weight>_<S> read the weight in its own dtype.
#define ENTRY_COMMON(X, S, N)                                                                  \
    extern "C" __global__ void normalize_rows_##N(const X* x, S* xhat, double* norms, int rows, \
                                                  int d, int* bad) {                           \
        normalize_rows<X, S>(x, xhat, norms, rows, d, bad);                                     \
    }

// targets_<weight> and target_grads_<weight>: x̂ (or x) in X, the weight (and dW) in W.
#define ENTRY_TARGETS(X, W, A, N)                                                              \
    extern "C" __global__ void targets_##N(                                                    \
        const X* xh, int raw_x, const W* weight, const long long* labels, int classes, int k,  \
        int sharded, const double* row_scale, const double* norms, int rows, int d,            \
        const double* margins, int margin_stride, const double* target_cos,                   \
        double* target_logit, double* target_dpsi, double* norm_extra, double* rules,          \
        int* target_sub, int* bad) {                                                           \
        targets<X, W, A>(xh, raw_x, weight, labels, classes, k, sharded, row_scale, norms,     \
                         rows, d, margins, margin_stride, target_cos, target_logit,            \
                         target_dpsi, norm_extra, rules, target_sub, bad);                     \
    }                                                                                          \
    extern "C" __global__ void target_grads_##N(                                               \
        const X* x, const double* norms, const W* weight, const A* w_inv,                      \
        const long long* labels, const int* target_sub, int classes, int k,                    \
        const double* lse, const double* target_logit, const double* target_dpsi,              \
        const double* row_weight, const double* row_scale, int rows, int d, A* dxhat, W* dw) { \
        target_grads<X, W, A>(x, norms, weight, w_inv, labels, target_sub, classes, k, lse,    \
                              target_logit, target_dpsi, row_weight, row_scale, rows, d,       \
                              dxhat, dw);                                                      \
    }

// The class tiles' passes run side by side, two or three to a launch, each in its own range
// of blocks and seeing its own block index: a launch costs the GPU a ramp up and down (and
// the host a driver call), a class tile had seven of them, and passes that neither read
// what the other writes need not wait for each other. Each takes 256 threads a block (one
// per row: logits_tile, tile_rows; or 8 centres of a warp each: weights_tile,
// project_out_rows). W is the weight's (and dW's) type, S the GEMM operands', A the
// arithmetic's (and the logits', dX̂'s and x's on these paths).
//
// logits_and_weights_<weight>_<S>, around tile t's logits GEMM: tile t's logits pass
// (blocks 0 .. rows; rows = 0 for none), then the weights pass (next_rows centres; 0 for
// none) of tile t + 1 (its inverse norms, on a call's first row chunk, and its 16-bit copy
// where the weight is staged), which tile t + 1's GEMM reads. The logits pass has the first
// blocks, which a GPU starts first: it reads the logits its GEMM has just written, likely
// still in L2, before the weights pass streams the next tile's centres through it.
#define ENTRY_LOGITS_WEIGHTS(W, S, A, N)                                                       \
    extern "C" __global__ void logits_and_weights_##N(                                         \
        const A* z, S* stash, int rows, int ct, int lo, int k, const A* w_inv,                 \
        const double* row_scale, const long long* labels, const double* target_logit,          \
        const int* target_sub, const double* rules, double filter, A* tile_max,                \
        double* stats, const W* w, S* copy, A* next_w_inv, int next_rows, int d, int next_lo,  \
        int* bad) {                                                                            \
        int block = blockIdx.x;                                                                \
        if (block < rows)                                                                      \
            logits_tile<A, S, A>(z, stash, rows, ct, lo, k, w_inv, row_scale, labels,          \
                                 target_logit, target_sub, rules, filter, tile_max, stats,     \
                                 block);                                                       \
        else                                                                                   \
            weights_tile<W, S, A>(w, copy, next_w_inv, next_rows, d, next_lo, bad,             \
                                  block - rows);                                               \
    }

// between_tiles_<weight>_<S>, between tile t - 1's gradient GEMMs and tile t's: tile t - 1's
// projection of dW along the centres its GEMMs read (proj_rows centres; 0 for none), tile
// t's row factors (tile_rows: `rows` blocks; 0 for none) and, where the weight is staged
// into scratch (B > D), tile t's 16-bit centres (copy_rows; 0 for none), into the other of
// the two scratch copies than the one the projection reads.
#define ENTRY_BETWEEN(W, S, A, N)                                                              \
    extern "C" __global__ void between_tiles_##N(                                              \
        W* dw, const S* centres, const A* w_inv, int proj_rows, const A* dxt,                  \
        const A* prev_max, A* dxhat, const A* x, const double* norms, const A* tile_max,       \
        S* xs, const double* lse, const double* row_weight, const double* row_scale, int rows, \
        const W* w, S* copy, int copy_rows, int d) {                                           \
        int warps = blockDim.x >> 5;                                                           \
        int proj_blocks = (proj_rows + warps - 1) / warps;                                     \
        int block = blockIdx.x;                                                                \
        if (block < proj_blocks)                                                               \
            project_out_rows<W, S, A>(dw, centres, w_inv, proj_rows, d, block);                \
        else if ((block -= proj_blocks) < rows)                                                \
            tile_rows<A, S, A>(dxt, prev_max, dxhat, x, norms, tile_max, xs, lse, row_weight,  \
                               row_scale, rows, d, block);                                     \
        else                                                                                   \
            weights_tile<W, S, A>(w, copy, nullptr, copy_rows, d, 0, nullptr, block - rows);   \
    }

#define ENTRY_FINISH(T, N)                                                                     \
    extern "C" __global__ void finish_grad_emb_##N(T* dxhat, const T* x, const double* norms,  \
                                                   const double* norm_term, int rows, int d) { \
        finish_grad_emb<T>(dxhat, x, norms, norm_term, rows, d);                               \
    }

#define ENTRY_TILES(W, S, A, N)                                                                \
    ENTRY_LOGITS_WEIGHTS(W, S, A, N)                                                           \
    ENTRY_BETWEEN(W, S, A, N)

ENTRY_COMMON(float, float, f32)
ENTRY_COMMON(double, double, f64)
ENTRY_COMMON(float, bf16, bf16)
ENTRY_COMMON(float, f16, f16)
ENTRY_TARGETS(float, float, float, f32)
ENTRY_TARGETS(double, double, double, f64)
ENTRY_TARGETS(float, bf16, float, bf16)
ENTRY_TARGETS(float, f16, float, f16)
ENTRY_TILES(float, float, float, f32_f32)
ENTRY_TILES(double, double, double, f64_f64)
ENTRY_TILES(float, bf16, float, f32_bf16)
ENTRY_TILES(bf16, bf16, float, bf16_bf16)
ENTRY_TILES(float, f16, float, f32_f16)
ENTRY_TILES(f16, f16, float, f16_f16)
ENTRY_FINISH(float, f32)
ENTRY_FINISH(double, f64)

// ---------------------------------------------------------------------------------------
// Search. A (queries x stride) score tile covers gallery rows lo.. lo + width; its columns
// are cut into `splits` runs of `sub`. One block per (query, run) keeps the best K
// (<= TOPK_MAX) of its run merged with its own running list at best_s / best_i (descending,
// ties to the lower row), so one query still spreads over many blocks. At the end
// `topk_merge` merges each query's run lists into its final K on the device: only (Q, K)
// crosses to the host.

#define TOPK_MAX 64
#define TOPK_THREADS 128
#define NO_ROW 0x7fffffffffffffffLL

__device__ bool better(float s, long long i, float t, long long j) {
    return s > t || (s == t && i < j);
}

// Sets n entries of a search's running lists to empty (-inf, -1).
extern "C" __global__ void topk_reset(float* best_s, long long* best_i, long long n) {
    long long at = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (at < n) {
        best_s[at] = -INFINITY;
        best_i[at] = -1;
    }
}

// Whether gallery row i may be returned: bit i of `allowed` (one bit per row, from an
// allow/deny filter), or every row when there is no filter.
__device__ bool row_allowed(const unsigned* allowed, long long i) {
    return allowed == nullptr || ((allowed[i >> 5] >> (i & 31)) & 1u) != 0;
}

// Inserts (s, i) into a thread's sorted list of at most k (ls, li: n entries), unless the
// list is full and it is not better than the list's k-th; whether it entered. I: row
// numbers, or offsets.
template <typename I>
__device__ bool keep_sorted(float* ls, I* li, int& n, int k, float s, I i) {
    if (n == k && !better(s, i, ls[k - 1], li[k - 1])) return false;
    int at = n < k ? n : k - 1;
    for (; at > 0 && better(s, i, ls[at - 1], li[at - 1]); --at) {
        ls[at] = ls[at - 1];
        li[at] = li[at - 1];
    }
    ls[at] = s;
    li[at] = i;
    if (n < k) ++n;
    return true;
}

// One warp per (query, run of `sub` columns of the tile): the run's best k merged with the
// run's list from the previous tiles (best_s / best_i, k per pair, sorted). Scores are T:
// float32, or float16 (a rescored float16 gallery's). Each score is read once: every lane
// keeps the best k of its columns (16 bytes of them in every 32 such), sorted by insertion,
// as 32-bit offsets into the run (half the local memory of row numbers, and one shuffle a
// move); once the running list is full (after the first tile) most scores fail the
// comparison with its k-th. Then the lanes' candidates join the running list: many of them
// (the first tile) by `merge_rounds`, a few (the later tiles: about k / (t + 1) of them in
// tile t on random data) by `insert_into_list`. (A block per pair met 8 block barriers a
// round: at 1024 queries the selection took 14.7 ms of the H200's 31.8 ms search.)
#define TOPK_WARPS (TOPK_THREADS / 32)
#define NO_OFFSET 0x7fffffff

// k rounds, each taking the best of the lanes' list heads (a butterfly of shuffles, no
// block barrier) or the running list's next entry (of its first `old`: 0 on the first
// tile, whose lists hold nothing yet), whichever is better; round r's pick goes
// to lane r % 32 (k <= 64: two slots a lane), written after every lane has read the
// running list. About 10 shuffles a round.
__device__ void merge_rounds(const float* mine_s, const int* mine_o, int mine, long long base,
                             int k, int old, float* bs, long long* bi) {
    const unsigned all = 0xffffffffu;
    int lane = threadIdx.x % 32;
    float out_s[2] = {-(float)INFINITY, -(float)INFINITY};
    long long out_i[2] = {-1, -1};
    int head = 0, from_old = 0;
    for (int round = 0; round < k; ++round) {
        float my_s = head < mine ? mine_s[head] : -INFINITY;
        int my_o = head < mine ? mine_o[head] : NO_OFFSET;
        float s = my_s;
        int o = my_o;
        // every lane ends with the best (offsets are distinct across lanes; NO_OFFSET ties
        // only among exhausted lanes)
        for (int x = 16; x > 0; x >>= 1) {
            float other_s = __shfl_xor_sync(all, s, x);
            int other_o = __shfl_xor_sync(all, o, x);
            if (better(other_s, other_o, s, o)) {
                s = other_s;
                o = other_o;
            }
        }
        long long i = o == NO_OFFSET ? NO_ROW : base + o;
        if (from_old < old && bi[from_old] >= 0 && better(bs[from_old], bi[from_old], s, i)) {
            s = bs[from_old];
            i = bi[from_old];
            ++from_old;
        } else if (o != NO_OFFSET && o == my_o) {
            ++head;  // the winner's lane (it alone holds that offset) moves to its next
        }
        if (i == NO_ROW) {
            s = -INFINITY;
            i = -1;
        }
        if (round % 32 == lane) {
            out_s[round / 32] = s;
            out_i[round / 32] = i;
        }
    }
    __syncwarp(all);
    for (int slot = 0; slot < 2; ++slot) {
        int r = lane + 32 * slot;
        if (r < k) {
            bs[r] = out_s[slot];
            bi[r] = out_i[slot];
        }
    }
}

// Each lane's candidates inserted, one at a time, into the full running list of k <= 64
// entries, held in registers: lane j holds entries j and j + 32. A candidate's place is
// the number of entries better than it (two votes, as they are a prefix of the sorted
// list); the entries from there on move down one place (shuffles up by one lane, entry 31
// to lane 0's second), the k-th falls off. About 14 shuffles and votes a candidate, and
// none for scores that never beat the list's k-th, where `merge_rounds` pays all k rounds.
__device__ void insert_into_list(const float* mine_s, const int* mine_o, int mine,
                                 long long base, int k, float* bs, long long* bi) {
    const unsigned all = 0xffffffffu;
    int lane = threadIdx.x % 32;
    float s0 = lane < k ? bs[lane] : -INFINITY;
    float s1 = lane + 32 < k ? bs[lane + 32] : -INFINITY;
    long long i0 = lane < k ? bi[lane] : NO_ROW;
    long long i1 = lane + 32 < k ? bi[lane + 32] : NO_ROW;
    int head = 0;
    for (;;) {
        unsigned waiting = __ballot_sync(all, head < mine);
        if (waiting == 0) break;
        int from = __ffs(waiting) - 1;
        float cs = __shfl_sync(all, head < mine ? mine_s[head] : 0.0f, from);
        long long ci = base + __shfl_sync(all, head < mine ? mine_o[head] : 0, from);
        if (lane == from) ++head;
        int at = __popc(__ballot_sync(all, better(s0, i0, cs, ci))) +
                 __popc(__ballot_sync(all, better(s1, i1, cs, ci)));
        if (at >= k) continue;  // the same in every lane: it does not enter
        float up_s0 = __shfl_up_sync(all, s0, 1), up_s1 = __shfl_up_sync(all, s1, 1);
        long long up_i0 = __shfl_up_sync(all, i0, 1), up_i1 = __shfl_up_sync(all, i1, 1);
        float last_s0 = __shfl_sync(all, s0, 31);
        long long last_i0 = __shfl_sync(all, i0, 31);
        if (lane == 0) {
            up_s1 = last_s0;
            up_i1 = last_i0;
        }
        if (lane + 32 >= at) {
            s1 = lane + 32 == at ? cs : up_s1;
            i1 = lane + 32 == at ? ci : up_i1;
        }
        if (lane >= at) {
            s0 = lane == at ? cs : up_s0;
            i0 = lane == at ? ci : up_i0;
        }
    }
    __syncwarp(all);
    if (lane < k) {
        bs[lane] = s0;
        bi[lane] = i0;
    }
    if (lane + 32 < k) {
        bs[lane + 32] = s1;
        bi[lane + 32] = i1;
    }
}

template <typename T>
__device__ void topk_tile_of(const T* scores, int queries, int stride, int sub, int width,
                             int splits, long long lo, int k, float* best_s, long long* best_i,
                             const unsigned* allowed) {
    const unsigned all = 0xffffffffu;
    int lane = threadIdx.x % 32;
    long long pair = (long long)blockIdx.x * TOPK_WARPS + threadIdx.x / 32;
    if (pair >= (long long)queries * splits) return;  // the whole warp leaves
    int q = (int)(pair / splits), run = (int)(pair % splits);
    int first = run * sub;
    int count = width - first < sub ? width - first : sub;  // <= 0: nothing new this tile
    const T* row = scores + (long long)q * stride + first;
    long long base = lo + first;
    float* bs = best_s + pair * k;
    long long* bi = best_i + pair * k;
    // NVRTC's front end warns that these are read before they are set (#549): keep_sorted
    // reads only slots below `mine`, which it has written, but the check cannot see that.
#ifdef __CUDACC_RTC__
#pragma nv_diagnostic push
#pragma nv_diag_suppress 549
#endif
    float mine_s[TOPK_MAX];
    int mine_o[TOPK_MAX];
    int mine = 0;
    float worst_s = -INFINITY;  // the lane's k-th, once it has k
    int worst_o = NO_OFFSET;
    // A score that does not beat the running list's k-th cannot enter the merged k: once
    // the list is full (after the first tiles), it turns most scores away at one compare,
    // where the lane's own k-th, from its share of one run, would let most of them in for
    // k near a lane's share (a rescored search keeps k + 32 or 2k).
    // The first tile (lo = 0) starts the lists: what their memory holds is not read (so no
    // kernel has to reset them first) but written over.
    bool first_tile = lo == 0;
    bool full = !first_tile && bi[k - 1] >= 0;
    float floor_s = full ? bs[k - 1] : -INFINITY;
    long long floor_i = full ? bi[k - 1] : NO_ROW;
    auto keep = [&](float s, int o) {
        if (full && !better(s, base + o, floor_s, floor_i)) return;
        // the lane's k-th, kept in registers: most scores leave without a local-memory read
        if (mine == k && !better(s, o, worst_s, worst_o)) return;
        if (s != s || !row_allowed(allowed, base + o)) return;  // NaN: an unusable query
        keep_sorted(mine_s, mine_o, mine, k, s, o);
        if (mine == k) {
            worst_s = mine_s[k - 1];
            worst_o = mine_o[k - 1];
        }
    };
#ifdef __CUDACC_RTC__
#pragma nv_diagnostic pop
#endif
    // 16 bytes of scores per load where the run is aligned for it (runs start at multiples
    // of 2048 columns), the tail one by one. A lane issues LANE_VECS loads before it uses
    // any: with few queries the GPU runs only a warp per run, and each load's latency would
    // add up in turn.
    const int V = 16 / sizeof(T);
    int vecs = vec_aligned<T, V>(row) && count > 0 ? count / V : 0;
    for (int at = lane; at < vecs; at += 32 * LANE_VECS) {
        Vec<T, V> v[LANE_VECS];
#pragma unroll
        for (int u = 0; u < LANE_VECS; ++u)
            if (at + 32 * u < vecs) v[u] = load_vec<T, V>(row + V * (at + 32 * u));
#pragma unroll
        for (int u = 0; u < LANE_VECS; ++u)
            for (int h = 0; h < V && at + 32 * u < vecs; ++h)
                keep(widen(v[u].v[h]), V * (at + 32 * u) + h);
    }
    for (int j = V * vecs + lane; j < count; j += 32) keep(widen(row[j]), j);
    int total = mine;
    for (int x = 16; x > 0; x >>= 1) total += __shfl_xor_sync(all, total, x);
    if (total == 0) {  // the running list stands as it is, or starts empty
        for (int r = lane; first_tile && r < k; r += 32) {
            bs[r] = -INFINITY;
            bi[r] = -1;
        }
        return;
    }
    // an insertion costs about 1.4 rounds; a full list's few newcomers are inserted
    if (full && 2 * total <= k)
        insert_into_list(mine_s, mine_o, mine, base, k, bs, bi);
    else
        merge_rounds(mine_s, mine_o, mine, base, k, first_tile ? 0 : k, bs, bi);
}


// Few queries (<= SCAN_QUERIES): the tile's scores without a GEMM, reading each stored row
// once. Lanes of a warp share a row: each widens its elements to float in registers and
// accumulates their products with every query in float (the CPU search's arithmetic:
// float32 query against the stored value), then the row's lanes sum theirs. int8 rows are
// codes: their sums are multiplied by the row's scale, as on the CPU. Where a row is a
// whole number of 16-byte packs (8 float16, 16 int8, 4 float32), it takes as few lanes as
// hold it in LANE_VECS packs each (a warp then scores 32 / lanes rows at once), and each
// lane loads its packs of a step before using any: one element per lane (64 bytes of
// float16 a warp), then one pack per lane (512 bytes), left too few bytes in flight to
// read the gallery at the memory bandwidth; now a warp has 2 KiB of rows in flight (a
// float16 row of 512 is 1 KiB: two rows of 16 lanes). Other rows take the whole warp, an
// element a lane. The accumulators are unrolled over SCAN_QUERIES so that they stay in
// registers.
#define SCAN_QUERIES 16

__device__ float widen(signed char v) { return (float)v; }

template <typename S> using Pack = Vec<S, 16 / sizeof(S)>;  // 16 bytes of S
// A pack loaded as four 32-bit words: a conditional copy of sixteen int8 values compiled to
// byte shuffles under a branch, which kept the next load from being issued early.
template <typename S> union PackBits {
    Vec<unsigned, 4> words;
    Pack<S> pack;
};
template <typename S> __device__ Vec<unsigned, 4> pack_words(const S* p) {
    return *(const Vec<unsigned, 4>*)p;
}

template <typename S>
__device__ void score_rows(const S* rows, const float* scales, const float* queries, int q,
                           int d, long long lo, int width, float* scores, int stride) {
    const int P = 16 / sizeof(S);  // elements of a pack
    const bool packs =
        d % P == 0 && ((unsigned long long)rows & 15) == 0 && quad_aligned(queries);
    // lanes per row: a power of two, so that each lane holds at most LANE_VECS packs
    // of the row (a float16 row of 512: 16 lanes, two rows a warp); 32 without packs
    int per_row = 32;
    if (packs) {
        int need = (d / P + LANE_VECS - 1) / LANE_VECS;
        per_row = 1;
        while (per_row < need && per_row < 32) per_row *= 2;
    }
    const int lane = threadIdx.x % 32, sub = lane / per_row, at = lane % per_row;
    const int per_warp = 32 / per_row;
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r0 = warp * per_warp; r0 < width; r0 += warps * per_warp) {
        const long long r = r0 + sub;
        const bool live = r < width;  // the warp's last rows may be past the tile
        const S* row = rows + (lo + r) * d;
        float acc[SCAN_QUERIES];
#pragma unroll
        for (int a = 0; a < SCAN_QUERIES; ++a) acc[a] = 0.0f;
        if (packs) {
            const int step = per_row * P;  // elements between a lane's packs
            for (int j0 = at * P; live && j0 < d; j0 += step * LANE_VECS) {
                PackBits<S> bits[LANE_VECS] = {};
#pragma unroll
                for (int u = 0; u < LANE_VECS; ++u)
                    if (j0 + step * u < d)
                        bits[u].words = pack_words(row + j0 + step * u);
#pragma unroll
                for (int u = 0; u < LANE_VECS; ++u) {
                    int j = j0 + step * u;
                    if (j >= d) break;
                    for (int h = 0; h < P; h += 4) {
#pragma unroll
                        for (int a = 0; a < SCAN_QUERIES; ++a) {
                            if (a >= q) break;
                            Quad<float> qa = load_quad(queries + (long long)a * d + j + h);
                            for (int i = 0; i < 4; ++i)
                                acc[a] += widen(bits[u].pack.v[h + i]) * qa.v[i];
                        }
                    }
                }
            }
        } else if (live) {
            for (int j = lane; j < d; j += 32) {
                float v = widen(row[j]);
#pragma unroll
                for (int a = 0; a < SCAN_QUERIES; ++a) {
                    if (a >= q) break;
                    acc[a] += v * queries[(long long)a * d + j];
                }
            }
        }
        float scale = scales == nullptr || !live ? 1.0f : scales[lo + r];
#pragma unroll
        for (int a = 0; a < SCAN_QUERIES; ++a) {
            if (a >= q) break;
            float s = acc[a];
            // within the row's aligned group of lanes
            for (int o = per_row / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (at == 0 && live) scores[(long long)a * stride + r] = s * scale;
        }
    }
}

// Many queries over bfloat16 or int8 rows: a chunk of rows decoded to float32 (exact for
// bfloat16; code * scale rounded once for int8, so a score moves by at most 2^-24 of
// sum |g_j q_j| <= 6e-8 for unit vectors), then scored by an exact float32 GEMM.
// Where rows are whole 16-byte packs, a thread decodes a pack at a time and writes it as
// float quads, finding its row once per pack (one element a thread, with a 64-bit division
// for each, left the pass far from the memory bandwidth).
template <typename S>
__device__ void decode_rows(const S* rows, const float* scales, long long lo,
                            long long count, int d, float* out) {
    const int P = 16 / sizeof(S);  // elements of a pack
    const S* src = rows + lo * d;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (d % P == 0 && ((unsigned long long)src & 15) == 0 && quad_aligned(out)) {
        const int per_row = d / P;
        const long long packs = count * per_row;
        for (long long at = first; at < packs; at += stride) {
            long long r = packs <= 0xffffffffLL ? (unsigned)at / (unsigned)per_row : at / per_row;
            float scale = scales == nullptr ? 1.0f : scales[lo + r];
            PackBits<S> bits;
            bits.words = pack_words(src + at * P);
            for (int h = 0; h < P; h += 4) {
                Quad<float> quad;
                for (int i = 0; i < 4; ++i) quad.v[i] = widen(bits.pack.v[h + i]) * scale;
                store_quad(out + at * P + h, quad);
            }
        }
        return;
    }
    long long n = count * d;
    for (long long at = first; at < n; at += stride) {
        long long r = at / d;
        float scale = scales == nullptr ? 1.0f : scales[lo + r];
        out[at] = widen(src[at]) * scale;
    }
}

#define ENTRY_SCORE_ROWS(S, N)                                                                \
    extern "C" __global__ void score_rows_##N(const S* rows, const float* scales,            \
                                              const float* queries, int q, int d,             \
                                              long long lo, int width, float* scores,         \
                                              int stride) {                                   \
        score_rows<S>(rows, scales, queries, q, d, lo, width, scores, stride);                \
    }
ENTRY_SCORE_ROWS(float, f32)
ENTRY_SCORE_ROWS(f16, f16)
ENTRY_SCORE_ROWS(bf16, bf16)
ENTRY_SCORE_ROWS(signed char, i8)

#define ENTRY_DECODE_ROWS(S, N)                                                               \
    extern "C" __global__ void decode_rows_##N(const S* rows, const float* scales,           \
                                               long long lo, long long count, int d,          \
                                               float* out) {                                  \
        decode_rows<S>(rows, scales, lo, count, d, out);                                      \
    }
ENTRY_DECODE_ROWS(bf16, bf16)
ENTRY_DECODE_ROWS(signed char, i8)

// The warp's best k of its lanes' sorted lists (ls, li: n entries a lane; rows distinct
// across lanes) in k rounds of a butterfly, each round's pick written by lane round % 32 to
// out_s / out_i[round]: (-inf, -1) once the lists run out.
__device__ void warp_best_k(const float* ls, const long long* li, int n, int k, float* out_s,
                            long long* out_i) {
    const unsigned all = 0xffffffffu;
    int lane = threadIdx.x % 32;
    int head = 0;
    for (int round = 0; round < k; ++round) {
        float my_s = head < n ? ls[head] : -INFINITY;
        long long my_i = head < n ? li[head] : NO_ROW;
        float s = my_s;
        long long i = my_i;
        for (int x = 16; x > 0; x >>= 1) {
            float other_s = __shfl_xor_sync(all, s, x);
            long long other_i = __shfl_xor_sync(all, i, x);
            if (better(other_s, other_i, s, i)) {
                s = other_s;
                i = other_i;
            }
        }
        if (i != NO_ROW && i == my_i) ++head;  // the winner's lane moves to its next
        if (round % 32 == lane) {
            out_s[round] = i == NO_ROW ? -INFINITY : s;
            out_i[round] = i == NO_ROW ? -1 : i;
        }
    }
}

// One block per query: the best k of its `splits` run lists (each sorted, padded with row
// -1) into out_s / out_i (Q, k). Each thread takes lists j = thread, thread + blockDim.x, ...
// and keeps the best k of their entries, reading a list from its head only while its
// entries can still enter (the lists are sorted: the first that fails the thread's k-th
// ends it, so once a thread has k most lists are read one entry deep); each warp merges its
// lanes' lists, and the first warp the warps'. (Before, k rounds each re-read every list's
// head from memory and met 8 block barriers: latency that a one-query search, one block,
// waited for in full.)
extern "C" __global__ void topk_merge(const float* best_s, const long long* best_i,
                                      int splits, int k, float* out_s, long long* out_i) {
    __shared__ float warp_s[TOPK_WARPS * TOPK_MAX];
    __shared__ long long warp_i[TOPK_WARPS * TOPK_MAX];
    long long q = blockIdx.x;
    const float* bs = best_s + q * splits * k;
    const long long* bi = best_i + q * splits * k;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#ifdef __CUDACC_RTC__
#pragma nv_diagnostic push
#pragma nv_diag_suppress 549  // as in topk_tile_of
#endif
    float ls[TOPK_MAX];
    long long li[TOPK_MAX];
    int n = 0;
    for (int j = threadIdx.x; j < splits; j += blockDim.x) {
        for (int at = 0; at < k; ++at) {
            long long e = (long long)j * k + at;
            if (bi[e] < 0 || !keep_sorted(ls, li, n, k, bs[e], bi[e])) break;
        }
    }
    warp_best_k(ls, li, n, k, warp_s + warp * k, warp_i + warp * k);
    __syncthreads();
    if (warp != 0) return;
    n = 0;
    for (int e = lane; e < TOPK_WARPS * k; e += 32)
        if (warp_i[e] >= 0) keep_sorted(ls, li, n, k, warp_s[e], warp_i[e]);
    warp_best_k(ls, li, n, k, out_s + q * k, out_i + q * k);
#ifdef __CUDACC_RTC__
#pragma nv_diagnostic pop
#endif
}

// ---------------------------------------------------------------------------------------
// Large k (TOPK_MAX < k <= TOPK_LARGE_MAX): a register list per thread would spill, so a
// block keeps one running list in shared memory and a buffer of pending candidates: a
// candidate enters the buffer only if it beats the list's k-th entry (after the first k,
// few do), and a full buffer is sorted (bitonic) and merged into the list, each element's
// new place found by a binary search in the other sorted array (merge path). The same
// selection serves the tiles (`topk_tile_large`: the running list of a (query, run)) and the
// final merge (`topk_merge_large`: a query's run lists). Row numbers are 32-bit in shared
// memory (the caller keeps galleries on this path below 2^31 rows).

#define TOPK_LARGE_MAX 1024
#define LARGE_THREADS 256
#define LARGE_CAP 2048
#define NO_ROW32 0x7fffffff

struct LargeSelect {
    float buf_s[LARGE_CAP];
    int buf_i[LARGE_CAP];
    float list_s[TOPK_LARGE_MAX];
    int list_i[TOPK_LARGE_MAX];
    float out_s[TOPK_LARGE_MAX];
    int out_i[TOPK_LARGE_MAX];
    int pending, len;
};

// How many of sorted (descending) s[0..n), i[0..n) are better than (t, j).
__device__ int count_better(const float* s, const int* i, int n, float t, int j) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (better(s[mid], i[mid], t, j)) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Sorts the pending buffer, merges it into the list (keeping the best k), empties it.
// Called by every thread of the block.
__device__ void large_flush(LargeSelect& st, int k) {
    __syncthreads();
    int n = st.pending, len = st.len;
    int size = 1;
    while (size < n) size <<= 1;
    for (int t = n + threadIdx.x; t < size; t += blockDim.x) {
        st.buf_s[t] = -INFINITY;
        st.buf_i[t] = NO_ROW32;
    }
    __syncthreads();
    for (int span = 2; span <= size; span <<= 1) {
        for (int stride = span / 2; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < size / 2; t += blockDim.x) {
                int a = 2 * t - (t & (stride - 1)), b = a + stride;
                bool descending = (a & span) == 0;
                bool swap = descending ? better(st.buf_s[b], st.buf_i[b], st.buf_s[a], st.buf_i[a])
                                       : better(st.buf_s[a], st.buf_i[a], st.buf_s[b], st.buf_i[b]);
                if (swap) {
                    float s = st.buf_s[a];
                    int i = st.buf_i[a];
                    st.buf_s[a] = st.buf_s[b];
                    st.buf_i[a] = st.buf_i[b];
                    st.buf_s[b] = s;
                    st.buf_i[b] = i;
                }
            }
            __syncthreads();
        }
    }
    // each entry's place in the merged order is its index plus the other array's entries
    // that beat it; those past k drop out
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
        int at = t + count_better(st.buf_s, st.buf_i, n, st.list_s[t], st.list_i[t]);
        if (at < k) { st.out_s[at] = st.list_s[t]; st.out_i[at] = st.list_i[t]; }
    }
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
        int at = t + count_better(st.list_s, st.list_i, len, st.buf_s[t], st.buf_i[t]);
        if (at < k) { st.out_s[at] = st.buf_s[t]; st.out_i[at] = st.buf_i[t]; }
    }
    __syncthreads();
    int merged = len + n < k ? len + n : k;
    for (int t = threadIdx.x; t < merged; t += blockDim.x) {
        st.list_s[t] = st.out_s[t];
        st.list_i[t] = st.out_i[t];
    }
    __syncthreads();
    if (threadIdx.x == 0) { st.len = merged; st.pending = 0; }
    __syncthreads();
}

// Streams `count` candidates from `source.get(j, s, i)` (false: no candidate at j) through
// the list, in rounds of one candidate per thread.
template <typename Source>
__device__ void large_select(LargeSelect& st, int k, long long count, const Source& source) {
    for (long long base = 0; base < count; base += blockDim.x) {
        long long j = base + threadIdx.x;
        float s;
        int i;
        if (j < count && source.get(j, s, i) &&
            (st.len < k || better(s, i, st.list_s[k - 1], st.list_i[k - 1]))) {
            int slot = atomicAdd(&st.pending, 1);
            st.buf_s[slot] = s;
            st.buf_i[slot] = i;
        }
        __syncthreads();
        bool full = st.pending > LARGE_CAP - (int)blockDim.x;
        __syncthreads();  // everyone has read the count before the next round adds to it
        if (full) large_flush(st, k);
    }
    if (st.pending > 0) large_flush(st, k);
}

// Loads a running list (valid entries first, row -1 after) into the shared list.
__device__ void large_load(LargeSelect& st, const float* bs, const long long* bi, int k) {
    if (threadIdx.x == 0) { st.pending = 0; st.len = 0; }
    __syncthreads();
    for (int t = threadIdx.x; t < k; t += blockDim.x)
        if (bi[t] >= 0) {
            st.list_s[t] = bs[t];
            st.list_i[t] = (int)bi[t];
            atomicAdd(&st.len, 1);
        }
    __syncthreads();
}

// Writes the shared list to k entries (padded with -inf / -1).
__device__ void large_store(const LargeSelect& st, float* out_s, long long* out_i, int k) {
    __syncthreads();
    for (int t = threadIdx.x; t < k; t += blockDim.x) {
        bool have = t < st.len;
        out_s[t] = have ? st.list_s[t] : -INFINITY;
        out_i[t] = have ? (long long)st.list_i[t] : -1;
    }
}

template <typename T> struct TileColumns {
    const T* row;
    long long base;
    const unsigned* allowed;
    __device__ bool get(long long j, float& s, int& i) const {
        float v = widen(row[j]);
        if (v != v || !row_allowed(allowed, base + j)) return false;  // NaN
        s = v;
        i = (int)(base + j);
        return true;
    }
};

struct RunLists {
    const float* s;
    const long long* i;
    __device__ bool get(long long j, float& score, int& row) const {
        if (i[j] < 0) return false;
        score = s[j];
        row = (int)i[j];
        return true;
    }
};

// As topk_tile, for k > TOPK_MAX (LARGE_THREADS threads a block).
template <typename T>
__device__ void topk_tile_large_of(const T* scores, int queries, int stride, int sub,
                                   int width, int splits, long long lo, int k, float* best_s,
                                   long long* best_i, const unsigned* allowed) {
    __shared__ LargeSelect st;
    int q = blockIdx.x / splits, run = blockIdx.x % splits;
    if (q >= queries) return;
    int first = run * sub;
    int count = width - first < sub ? width - first : sub;
    if (count <= 0) return;  // the list stays as it is
    float* bs = best_s + (long long)blockIdx.x * k;
    long long* bi = best_i + (long long)blockIdx.x * k;
    large_load(st, bs, bi, k);
    TileColumns<T> source{scores + (long long)q * stride + first, lo + first, allowed};
    large_select(st, k, count, source);
    large_store(st, bs, bi, k);
}

// The tile selections' entry points: float32 score tiles, and (_f16) the float16 ones of a
// rescored float16 gallery.
#define TOPK_TILE_ENTRY(NAME, SELECT, T)                                                       \
    extern "C" __global__ void NAME(const T* scores, int queries, int stride, int sub,         \
                                    int width, int splits, long long lo, int k,                \
                                    float* best_s, long long* best_i,                          \
                                    const unsigned* allowed) {                                 \
        SELECT(scores, queries, stride, sub, width, splits, lo, k, best_s, best_i, allowed);   \
    }
TOPK_TILE_ENTRY(topk_tile, topk_tile_of, float)
TOPK_TILE_ENTRY(topk_tile_f16, topk_tile_of, f16)
TOPK_TILE_ENTRY(topk_tile_large, topk_tile_large_of, float)
TOPK_TILE_ENTRY(topk_tile_large_f16, topk_tile_large_of, f16)

// As topk_merge, for k > TOPK_MAX: one block per query selects from its splits * k entries.
extern "C" __global__ void topk_merge_large(const float* best_s, const long long* best_i,
                                            int splits, int k, float* out_s,
                                            long long* out_i) {
    __shared__ LargeSelect st;
    long long q = blockIdx.x;
    if (threadIdx.x == 0) { st.pending = 0; st.len = 0; }
    __syncthreads();
    RunLists source{best_s + q * splits * k, best_i + q * splits * k};
    large_select(st, k, (long long)splits * k, source);
    large_store(st, out_s + q * k, out_i + q * k, k);
}

// Queries given on the device: each row scaled to unit length (its norm summed in double,
// which no float32 row overflows). A zero or non-finite row becomes NaN, which scores NaN
// against every row and so finds nothing (the selection skips NaN): telling the caller
// would need the host to wait for the device.
extern "C" __global__ void unit_queries(const float* x, int q, int d, float* out) {
    int lane = threadIdx.x % 32;
    long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (r >= q) return;
    const float* row = x + r * d;
    double sum = 0.0;
    for (int j = lane; j < d; j += 32) sum += (double)row[j] * (double)row[j];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    double norm = sqrt(sum);
    bool usable = norm > 0.0 && isfinite(norm);
    for (int j = lane; j < d; j += 32)
        out[r * d + j] = usable ? (float)((double)row[j] / norm) : (float)NAN_D;
}

// Results for the caller: device rows to ids (a copy's rows are not the gallery's), finite
// scores clamped to [-1, 1] as on the CPU; -1 / -inf padding stays.
extern "C" __global__ void finish_results(float* scores, long long* rows,
                                          const long long* ids, long long n) {
    long long at = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= n) return;
    if (rows[at] >= 0) rows[at] = ids[rows[at]];
    float s = scores[at];
    if (isfinite(s)) scores[at] = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
}

// float32 queries to two float16 halves for a float16 gallery's GEMMs (cuBLAS has no
// f32 x f16 product): hi = f16(x), lo = f16((x - hi) * 2^12). Scores are
// hi·g + 2^-12 lo·g, as exact as a float32 query (lo keeps the 11 bits hi dropped).
#define SPLIT_SCALE 4096.0f

__device__ unsigned short f32_to_f16(float x) {
#ifdef __CUDACC_RTC__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    return emu_f32_to_f16(x);
#endif
}

__device__ float f16_to_f32(unsigned short h) {
#ifdef __CUDACC_RTC__
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h));
    return x;
#else
    return emu_f16_to_f32(h);
#endif
}

// ---------------------------------------------------------------------------------------
// Many queries, rescored: one GEMM on tensor cores ranks the rows (float16 / bfloat16 rows
// against the query rounded to their type; float32 and decoded int8 rows as TF32), the
// selection keeps kc > k candidates per query by those scores, and `rescore` recomputes
// the candidates' scores exactly (float32 query x stored row, float32 sums, times int8's
// scale, as `score_rows` does) and keeps the best k. The GEMM's score of a row is within
// `slack` of its exact one (the bound is derived in search.rs); so when the kc-th
// candidate's GEMM score plus `slack` is below the k-th exact score, no row left out could
// have entered the k best, and the query is sure. Otherwise `unsure[q]` is set and the
// query is searched again exactly (by the caller's exact route, or `redo_unsure`).

// The float32 queries rounded to the rows' 16-bit type S, for the GEMMs: `hi` the nearest
// S, and when `lo` is not null the remainder times SPLIT_SCALE rounded again (the exact
// route's split float16 query: hi + lo / SPLIT_SCALE is as exact as the float32 query,
// since cuBLAS has no float32 x float16 product).
template <typename S>
__device__ void round_queries(const float* x, S* hi, S* lo, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    put(hi + i, x[i]);
    if (lo) put(lo + i, (x[i] - widen(hi[i])) * SPLIT_SCALE);
}

#define RESCORE_THREADS 256
template <typename S>
__device__ void rescore(const S* rows, const float* scales, const float* queries, int d,
                        const float* cand_s, const long long* cand_i, int kc, int k,
                        double slack, float* out_s, long long* out_i, int* unsure) {
    __shared__ float exact[TOPK_LARGE_MAX];
    __shared__ long long row_of[TOPK_LARGE_MAX];
    __shared__ float kth[1];
    long long q = blockIdx.x;
    const float* query = queries + q * d;
    int lane = threadIdx.x % 32;
    // one warp per candidate: a row's elements over the lanes, summed by shuffles
    for (int c = threadIdx.x / 32; c < kc; c += blockDim.x / 32) {
        long long r = cand_i[q * kc + c];
        float s = 0.0f;
        if (r >= 0)
            for (int j = lane; j < d; j += 32) s += widen(rows[r * d + j]) * query[j];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) {
            if (r >= 0 && scales != nullptr) s *= scales[r];
            exact[c] = r >= 0 ? s : -INFINITY;
            row_of[c] = r >= 0 ? r : NO_ROW;
        }
    }
    if (threadIdx.x == 0) kth[0] = -INFINITY;
    __syncthreads();
    // each candidate's rank among the exact scores (ties to the lower row; the padding's
    // equal entries by position), then its place in the output
    for (int c = threadIdx.x; c < kc; c += blockDim.x) {
        int rank = 0;
        for (int o = 0; o < kc; ++o)
            rank += better(exact[o], row_of[o], exact[c], row_of[c]) ||
                    (o < c && exact[o] == exact[c] && row_of[o] == row_of[c]);
        if (rank < k) {
            out_s[q * k + rank] = exact[c];
            out_i[q * k + rank] = row_of[c] == NO_ROW ? -1 : row_of[c];
        }
        if (rank == k - 1) kth[0] = exact[c];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // fewer than kc rows could be selected: every one of them was rescored
        bool complete = cand_i[q * kc + kc - 1] < 0;
        unsure[q] = complete || (double)cand_s[q * kc + kc - 1] + slack < (double)kth[0] ? 0 : 1;
    }
}

#define ENTRY_ROUND_QUERIES(S, N)                                                             \
    extern "C" __global__ void round_queries_##N(const float* x, S* hi, S* lo, long long n) { \
        round_queries<S>(x, hi, lo, n);                                                       \
    }
#define ENTRY_RESCORE(S, N)                                                                   \
    extern "C" __global__ void rescore_##N(const S* rows, const float* scales,               \
                                           const float* queries, int d, const float* cand_s,  \
                                           const long long* cand_i, int kc, int k,            \
                                           double slack, float* out_s, long long* out_i,      \
                                           int* unsure) {                                     \
        rescore<S>(rows, scales, queries, d, cand_s, cand_i, kc, k, slack, out_s, out_i,      \
                   unsure);                                                                   \
    }
ENTRY_ROUND_QUERIES(f16, f16)
ENTRY_ROUND_QUERIES(bf16, bf16)
ENTRY_RESCORE(float, f32)
ENTRY_RESCORE(f16, f16)
ENTRY_RESCORE(bf16, bf16)
ENTRY_RESCORE(signed char, i8)

// A rescored search of queries on the device cannot hand its unsure queries to the host
// (that would wait for the device): each one is searched again here, exactly, one block per
// query over every row (a thread a row, its float32 dot product as `rescore` takes it) into
// the block-level top-k of the large selection. Slow, since each thread reads its own row,
// but rare; the blocks of sure queries return at once.
template <typename S>
struct ExactRows {
    const S* rows;
    const float* scales;
    const float* query;
    int d;
    const unsigned* allowed;
    __device__ bool get(long long j, float& s, int& i) const {
        if (!row_allowed(allowed, j)) return false;
        const S* row = rows + j * d;
        float acc = 0.0f;
        for (int c = 0; c < d; ++c) acc += widen(row[c]) * query[c];
        if (scales != nullptr) acc *= scales[j];
        if (acc != acc) return false;  // NaN: a query that is not usable
        s = acc;
        i = (int)j;
        return true;
    }
};

template <typename S>
__device__ void redo_unsure(const S* rows, const float* scales, const float* queries, int d,
                            long long n, int k, const unsigned* allowed, const int* unsure,
                            float* out_s, long long* out_i) {
    __shared__ LargeSelect st;
    long long q = blockIdx.x;
    if (unsure[q] == 0) return;  // the whole block: the flag is the query's
    if (threadIdx.x == 0) { st.pending = 0; st.len = 0; }
    __syncthreads();
    ExactRows<S> source{rows, scales, queries + q * d, d, allowed};
    large_select(st, k, n, source);
    large_store(st, out_s + q * k, out_i + q * k, k);
}

#define ENTRY_REDO_UNSURE(S, N)                                                               \
    extern "C" __global__ void redo_unsure_##N(const S* rows, const float* scales,           \
                                               const float* queries, int d, long long n,      \
                                               int k, const unsigned* allowed,                \
                                               const int* unsure, float* out_s,               \
                                               long long* out_i) {                            \
        redo_unsure<S>(rows, scales, queries, d, n, k, allowed, unsure, out_s, out_i);        \
    }
ENTRY_REDO_UNSURE(float, f32)
ENTRY_REDO_UNSURE(f16, f16)
ENTRY_REDO_UNSURE(bf16, bf16)
ENTRY_REDO_UNSURE(signed char, i8)
