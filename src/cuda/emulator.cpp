// A CPU stand-in for the CUDA execution model, for tests on machines without a GPU: it
// compiles the real kernels.cu with a C++ compiler and runs every CUDA thread of a block as
// a fiber (ucontext). __syncthreads and the warp shuffles are barriers of the fiber
// scheduler; a barrier that not every thread of the block (or warp) reaches is reported as
// an error instead of hanging, since on a GPU it is undefined behaviour.
//
// Blocks of a grid run one after another, so __shared__ arrays can be plain statics.
// The margin definitions (MARGIN_*) come as -D flags from cuda::margin_defines.

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

using std::isfinite;

struct dim3 {
    unsigned x = 0, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __shared__ static

enum class State { Run, Warp, Block, Done };

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state = State::Run;
};

static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static int running = -1;
// A lane's shuffled value, its bytes as they are (64-bit row numbers stay exact).
static unsigned long long warp_slots[32][32];

template <typename V>
static void put_slot(unsigned warp, unsigned lane, V v) {
    static_assert(sizeof(V) <= 8, "shuffles move at most 64 bits");
    std::memcpy(&warp_slots[warp][lane], &v, sizeof(V));
}

template <typename V>
static V get_slot(unsigned warp, unsigned lane) {
    V v;
    std::memcpy(&v, &warp_slots[warp][lane], sizeof(V));
    return v;
}

// Suspends the running thread until the scheduler releases the barrier it waits at.
static void wait_at(State barrier) {
    Fiber& me = fibers[running];
    me.state = barrier;
    swapcontext(&me.ctx, &scheduler);
}

static void __syncthreads() { wait_at(State::Block); }
static void __syncwarp(unsigned = 0xffffffffu) { wait_at(State::Warp); }

// A shuffle: every lane of the warp offers v and gets the value of lane from(lane), or its
// own where that is outside the warp.
template <typename V, typename From>
static V exchange(V v, From from) {
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    put_slot(warp, lane, v);
    wait_at(State::Warp);
    int source = from((int)lane);
    V out = source >= 0 && source < 32 ? get_slot<V>(warp, (unsigned)source) : v;
    wait_at(State::Warp);  // nobody writes its slot again before every lane has read
    return out;
}

template <typename V>
static V __shfl_down_sync(unsigned, V v, int offset) {
    return exchange(v, [offset](int lane) { return lane + offset; });
}

template <typename V>
static V __shfl_up_sync(unsigned, V v, unsigned delta) {
    return exchange(v, [delta](int lane) { return lane - (int)delta; });
}

template <typename V>
static V __shfl_xor_sync(unsigned, V v, int mask) {
    return exchange(v, [mask](int lane) { return lane ^ mask; });
}

template <typename V>
static V __shfl_sync(unsigned, V v, int source) {
    return exchange(v, [source](int) { return source & 31; });
}

// Bit l of the result: lane l's predicate was true.
static unsigned __ballot_sync(unsigned, int predicate) {
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    put_slot(warp, lane, (unsigned)(predicate != 0));
    wait_at(State::Warp);
    unsigned out = 0;
    for (unsigned l = 0; l < 32; ++l) out |= get_slot<unsigned>(warp, l) << l;
    wait_at(State::Warp);
    return out;
}

static int __popc(unsigned x) { return __builtin_popcount(x); }
static int __ffs(int x) { return __builtin_ffs(x); }

static int atomicMax(int* address, int value) {
    std::atomic_ref<int> a(*address);
    int old = a.load();
    while (old < value && !a.compare_exchange_weak(old, value)) {
    }
    return old;
}

// Fibers of a block take turns, so a read-modify-write is atomic as it stands.
static int atomicAdd(int* address, int value) {
    int old = *address;
    *address = old + value;
    return old;
}
static double __longlong_as_double(long long bits) {
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
}

static unsigned short emu_f32_to_f16(float x) {
    _Float16 h = (_Float16)x;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}

static float emu_f16_to_f32(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}

#include "kernels.cu"
#include "reference_gemm.h"

// Calls kernel `f` with its arguments unpacked from CUDA's kernelParams layout (an array
// of pointers to each argument's value).
template <typename... A, std::size_t... I>
static void invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}

template <typename... A>
static std::function<void(void**)> entry(void (*f)(A...)) {
    return [f](void** args) { invoke(f, args, std::index_sequence_for<A...>{}); };
}

struct Entry {
    const char* name;
    std::function<void(void**)> run;
};

#define ENTRY(name) {#name, entry(name)}
#define ENTRY2(name) ENTRY(name##_f32), ENTRY(name##_f64)
#define ENTRY4(name) ENTRY2(name), ENTRY(name##_bf16), ENTRY(name##_f16)
#define TILE_ENTRIES(types) ENTRY(logits_and_weights_##types), ENTRY(between_tiles_##types)

static const Entry entries[] = {
    ENTRY4(normalize_rows),   ENTRY4(targets),         ENTRY4(target_grads),
    ENTRY2(finish_grad_emb),  TILE_ENTRIES(f32_f32),   TILE_ENTRIES(f64_f64),
    TILE_ENTRIES(f32_bf16),   TILE_ENTRIES(bf16_bf16), TILE_ENTRIES(f32_f16),
    TILE_ENTRIES(f16_f16),
    ENTRY(fill_f64),          ENTRY(merge_stats),      ENTRY(finish_stats),
    ENTRY(row_losses),        ENTRY(topk_tile),        ENTRY(topk_tile_f16),
    ENTRY(topk_reset),        ENTRY(topk_merge),       ENTRY(score_rows_f32),
    ENTRY(score_rows_f16),    ENTRY(score_rows_bf16),  ENTRY(score_rows_i8),
    ENTRY(decode_rows_bf16),  ENTRY(decode_rows_i8),
    ENTRY(topk_tile_large),   ENTRY(topk_tile_large_f16), ENTRY(topk_merge_large),
    ENTRY(unit_queries),
    ENTRY(finish_results),    ENTRY(round_queries_f16), ENTRY(round_queries_bf16),
    ENTRY(rescore_f32),       ENTRY(rescore_f16),      ENTRY(rescore_bf16),
    ENTRY(rescore_i8),        ENTRY(redo_unsure_f32),  ENTRY(redo_unsure_f16),
    ENTRY(redo_unsure_bf16),  ENTRY(redo_unsure_i8),
    ENTRY(margin_grid),       ENTRY4(scale_unless_one),
};

static const Entry* find(const char* name) {
    for (const Entry& e : entries)
        if (std::strcmp(e.name, name) == 0) return &e;
    return nullptr;
}

static const Entry* current_entry;
static void** current_args;

static void fiber_main() {
    current_entry->run(current_args);
    fibers[running].state = State::Done;
    swapcontext(&fibers[running].ctx, &scheduler);
}

static void resume(int i) {
    running = i;
    threadIdx.x = i;
    fibers[i].state = State::Run;
    swapcontext(&scheduler, &fibers[i].ctx);
    running = -1;
}

// The order in which a block's runnable threads take their turns between barriers, and a
// grid's blocks run. A GPU defines neither: a kernel whose result changes when one thread
// reads shared memory before or after another's write with no barrier between, or when one
// block reads what another block of the launch writes, has a race. Index order alone would
// hide every race in which the writer happens to come first, so each turn and each launch
// takes another permutation (a stride walk i -> (start + i * step) mod n, step coprime to
// n) from a generator seeded per launch: runs are reproducible, and the environment
// variable ARCFACE_RS_EMULATOR_SEED (an integer) draws other orders to hunt for races.
static unsigned long long order_state;

static unsigned long long next_random() {  // splitmix64
    unsigned long long z = (order_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

struct Order {
    long long start = 0, step = 1, n = 1;
    long long at(long long i) const { return (start + i * step) % n; }
};

static Order draw_order(long long n) {
    Order o;
    o.n = n;
    o.start = (long long)(next_random() % (unsigned long long)n);
    o.step = 1 + (long long)(next_random() % (unsigned long long)n);
    auto coprime = [n](long long s) {
        long long a = s, b = n;
        while (b) {
            long long t = a % b;
            a = b;
            b = t;
        }
        return a == 1;
    };
    while (!coprime(o.step)) o.step = o.step % n + 1;
    return o;
}

// Seeded by the launch's kernel and shape (not by a count of launches, which would depend
// on how the tests' threads interleave), so that a failing order comes back run after run.
static void seed_order(const char* kernel, unsigned grid, unsigned block) {
    static const unsigned long long base = [] {
        const char* seed = std::getenv("ARCFACE_RS_EMULATOR_SEED");
        return seed ? std::strtoull(seed, nullptr, 10) : 0ULL;
    }();
    unsigned long long h = 0xcbf29ce484222325ULL;  // FNV-1a of the name, then the shape
    for (const char* c = kernel; *c; ++c) h = (h ^ (unsigned char)*c) * 0x100000001b3ULL;
    h = (h ^ grid) * 0x100000001b3ULL;
    h = (h ^ block) * 0x100000001b3ULL;
    order_state = h + base * 0x2545f4914f6cdd1dULL;
}

// Runs one block to its end; false if its threads met at different barriers.
static bool run_block() {
    int n = (int)fibers.size();
    for (Fiber& f : fibers) {
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
        f.state = State::Run;
    }
    for (;;) {
        bool ran = false;
        Order turn = draw_order(n);
        for (int t = 0; t < n; ++t) {
            int i = (int)turn.at(t);
            if (fibers[i].state == State::Run) {
                resume(i);
                ran = true;
            }
        }
        if (ran) continue;
        bool released = false;
        for (int w = 0; w < n / 32; ++w) {
            bool all = true;
            for (int l = 0; l < 32; ++l) all = all && fibers[w * 32 + l].state == State::Warp;
            if (all) {
                for (int l = 0; l < 32; ++l) fibers[w * 32 + l].state = State::Run;
                released = true;
            }
        }
        if (released) continue;
        int at_block = 0, done = 0;
        for (Fiber& f : fibers) {
            at_block += f.state == State::Block;
            done += f.state == State::Done;
        }
        if (done == n) return true;
        if (at_block != n) return false;
        for (Fiber& f : fibers) f.state = State::Run;
    }
}

// 0: done. 1: no such kernel. 2: bad block size. 3: divergent barrier.
extern "C" int emu_launch(const char* name, unsigned grid, unsigned block, void** args) {
    const Entry* e = find(name);
    if (!e) return 1;
    if (block == 0 || block % 32 != 0 || block > 1024) return 2;
    current_entry = e;
    current_args = args;
    blockDim.x = block;
    gridDim.x = grid;
    fibers.assign(block, Fiber{});
    for (Fiber& f : fibers) f.stack.resize(64 * 1024);
    seed_order(name, grid, block);
    if (grid == 0) return 0;
    Order blocks = draw_order(grid);
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = (unsigned)blocks.at(b);
        if (!run_block()) return 3;
    }
    return 0;
}

extern "C" int emu_has(const char* name) { return find(name) != nullptr; }

// For the tests of the scheduler: the order of `n` threads or blocks that the generator
// draws from state `seed`, into out[0..n].
extern "C" void emu_order(long long n, unsigned long long seed, long long* out) {
    order_state = seed;
    Order o = draw_order(n);
    for (long long i = 0; i < n; ++i) out[i] = o.at(i);
}

// One GEMM of cuBLAS's semantics (reference_gemm.h): inputs of `in_type`, output of
// `out_type` (cudaDataType_t codes), TF32 rounding of float32 inputs when `tf32`. Returns 0
// or a cuBLAS status.
extern "C" int emu_gemm(int in_type, int out_type, int tf32, int ta, int tb, int m, int n,
                        int k, double alpha, const void* a, int lda, long long stride_a,
                        const void* b, int ldb, long long stride_b, double beta, void* c,
                        int ldc, long long stride_c, int batch) {
    return batched_gemm(in_type, out_type, tf32 != 0, ta, tb, m, n, k, alpha, a, lda, stride_a,
                        b, ldb, stride_b, beta, c, ldc, stride_c, batch);
}
