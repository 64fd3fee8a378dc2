// A stand-in for libcuda.so on machines without a GPU: "device memory" is host memory and
// kernels run on the CPU emulator (src/cuda/emulator.cpp), so arcface_rs's real driver code
// (src/cuda/driver.rs, through cudarc) runs end to end in tests. Only the calls arcface_rs
// makes are implemented; stubs.cpp gives every other symbol cudarc looks up.

#include "../../../src/cuda/emulator.cpp"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <atomic>
#include <map>
#include <mutex>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    NO_BINARY_FOR_GPU = 209,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
};

// The live cuMemAlloc blocks and their sizes, and the "device memory" there is (0: as much
// as the host has; the tests set a limit to see how a full device is met).
static std::mutex allocations_lock;
static std::map<CUdeviceptr, size_t> allocations;
static size_t allocated_bytes = 0, memory_limit = 0;

extern "C" {

// CUDA does not survive fork(): in a child forked after its parent called cuInit, cuInit and
// every other call fail with CUDA_ERROR_NOT_INITIALIZED (and the parent's contexts and
// memory are not the child's), as the real driver does.
static pid_t initialised_by = 0;
#define REFUSED_AFTER_FORK \
    if (initialised_by != 0 && getpid() != initialised_by) return NOT_INITIALIZED

CUresult cuInit(unsigned) {
    REFUSED_AFTER_FORK;
    initialised_by = getpid();
    return SUCCESS;
}

// Two devices; device 1's "driver" is older than NVRTC and refuses its machine code (as a
// 13.0 driver may refuse a 13.2 NVRTC's output), so the PTX fallback runs there.
static const int DEVICES = 2;
static int contexts[DEVICES];
static int current_device = -1;

CUresult cuDeviceGetCount(int* count) {
    REFUSED_AFTER_FORK;
    *count = DEVICES;
    return SUCCESS;
}

CUresult cuDeviceGet(int* device, int ordinal) {
    REFUSED_AFTER_FORK;
    if (ordinal < 0 || ordinal >= DEVICES) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

// compute capability 9.0 (attributes 75 and 76: major and minor), 0 for anything else
CUresult cuDeviceGetAttribute(int* value, int attribute, int) {
    REFUSED_AFTER_FORK;
    *value = attribute == 75 ? 9 : 0;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void** context, int device) {
    REFUSED_AFTER_FORK;
    *context = &contexts[device];
    return SUCCESS;
}

CUresult cuCtxSetCurrent(void* context) {
    REFUSED_AFTER_FORK;
    int* c = static_cast<int*>(context);
    if (c < contexts || c >= contexts + DEVICES) return INVALID_VALUE;
    current_device = static_cast<int>(c - contexts);
    return SUCCESS;
}

// The image must be what NVRTC made of kernels.cu: a CUBIN (an ELF file, whose size its
// header gives) or PTX text, either holding the kernels' names.
static int loaded_cubins = 0, loaded_ptx = 0;

CUresult cuModuleLoadData(void** module, const void* image) {
    REFUSED_AFTER_FORK;
    static int the_module;
    const char* bytes = static_cast<const char*>(image);
    const char* name = "topk_tile";
    bool ok;
    if (std::memcmp(bytes, "\x7f" "ELF", 4) == 0) {
        if (current_device == 1) return NO_BINARY_FOR_GPU;
        unsigned long long section_headers;
        unsigned short entry_size, entries;
        std::memcpy(&section_headers, bytes + 0x28, 8);
        std::memcpy(&entry_size, bytes + 0x3A, 2);
        std::memcpy(&entries, bytes + 0x3C, 2);
        size_t size = section_headers + (size_t)entry_size * entries;
        ok = memmem(bytes, size, name, std::strlen(name)) != nullptr;
        loaded_cubins += ok;
    } else {
        ok = std::strstr(bytes, ".entry topk_tile(") != nullptr;
        loaded_ptx += ok;
    }
    if (!ok) return INVALID_IMAGE;
    *module = &the_module;
    return SUCCESS;
}

CUresult cuModuleGetFunction(void** function, void*, const char* name) {
    REFUSED_AFTER_FORK;
    if (!emu_has(name)) return NOT_FOUND;
    *function = strdup(name);
    return SUCCESS;
}

CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared_bytes, void*, void** params,
                        void** extra) {
    REFUSED_AFTER_FORK;
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || shared_bytes != 0 || extra) return INVALID_VALUE;
    return emu_launch(static_cast<const char*>(function), gx, bx, params) == 0 ? SUCCESS
                                                                              : LAUNCH_FAILED;
}

CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
    REFUSED_AFTER_FORK;
    std::lock_guard<std::mutex> guard(allocations_lock);
    if (memory_limit && (allocated_bytes > memory_limit || bytes > memory_limit - allocated_bytes))
        return OUT_OF_MEMORY;
    void* p = std::malloc(bytes);
    if (!p) return OUT_OF_MEMORY;
    std::memset(p, 0xA5, bytes);  // not zero: callers must not rely on fresh memory
    *ptr = reinterpret_cast<CUdeviceptr>(p);
    allocations[*ptr] = bytes;
    allocated_bytes += bytes;
    return SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    REFUSED_AFTER_FORK;
    std::lock_guard<std::mutex> guard(allocations_lock);
    auto block = allocations.find(ptr);
    if (block == allocations.end()) return INVALID_VALUE;  // a double or foreign free
    allocated_bytes -= block->second;
    allocations.erase(block);
    std::free(reinterpret_cast<void*>(ptr));
    return SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    REFUSED_AFTER_FORK;
    std::lock_guard<std::mutex> guard(allocations_lock);
    *total = memory_limit ? memory_limit : (size_t)80 << 30;
    *free = allocated_bytes < *total ? *total - allocated_bytes : 0;
    return SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t bytes, void*) {
    REFUSED_AFTER_FORK;
    std::memset(reinterpret_cast<void*>(ptr), value, bytes);
    return SUCCESS;
}

static std::atomic<long long> uploaded_bytes{0};

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    REFUSED_AFTER_FORK;
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    uploaded_bytes += (long long)bytes;
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    REFUSED_AFTER_FORK;
    std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}

CUresult cuStreamSynchronize(void*) { return SUCCESS; }

CUresult cuGetErrorString(CUresult, const char** text) {
    REFUSED_AFTER_FORK;
    *text = "error from the fake CUDA driver";
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult, const char** text) {
    *text = "FAKE_CUDA_ERROR";
    return SUCCESS;
}

// For the tests: how many modules were loaded from CUBINs and from PTX.
int fake_loaded_cubins() { return loaded_cubins; }
int fake_loaded_ptx() { return loaded_ptx; }

// For the tests: bytes copied from the host so far.
long long fake_uploaded_bytes() { return uploaded_bytes.load(); }

// For the tests: the "device memory" from now on (0: no limit).
void fake_set_memory_limit(long long bytes) {
    std::lock_guard<std::mutex> guard(allocations_lock);
    memory_limit = (size_t)bytes;
}

// For the tests: how many cuMemAlloc blocks are not freed.
int fake_live_allocations() {
    std::lock_guard<std::mutex> guard(allocations_lock);
    return static_cast<int>(allocations.size());
}
}
