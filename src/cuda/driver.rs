//! [`Device`] on a real GPU: the CUDA driver API and cuBLAS through cudarc's raw bindings,
//! on a stream the caller owns (for torch tensors, torch's current stream).
//!
//! Each device is set up once per process: its primary context (the one PyTorch uses, so
//! torch's device addresses are valid here), the kernels compiled by NVRTC for its compute
//! capability and loaded as a module, and a cuBLAS handle. The setup is kept behind a mutex
//! that each call holds while it queues its work, since a cuBLAS handle is bound to one
//! stream at a time.

use super::device::{arg_values, cuda_error, Arg, ColumnMajorGemm, Device, Elem};
use super::{available, compile, compile_cubin, ENTRY_POINTS};
use crate::{Error, Result};
use cudarc::cublas::sys as cublas;
use cudarc::driver::{result as cu, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

/// One device's context, kernels and cuBLAS handle.
struct Loaded {
    context: sys::CUcontext,
    functions: HashMap<&'static str, sys::CUfunction>,
    cublas: cublas::cublasHandle_t,
}

// SAFETY: the handles are plain identifiers that the driver lets any thread use once the
// context is current; every use goes through the mutex below.
unsafe impl Send for Loaded {}

fn loaded() -> &'static Mutex<HashMap<usize, Loaded>> {
    static LOADED: OnceLock<Mutex<HashMap<usize, Loaded>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(HashMap::new()))
}

fn load(ordinal: usize) -> Result<Loaded> {
    cu::init().map_err(|e| cuda_error("cuInit", e))?;
    let device = cu::device::get(ordinal as i32).map_err(|e| cuda_error("cuDeviceGet", e))?;
    // SAFETY: `device` came from cuDeviceGet.
    let (major, minor) = unsafe {
        use sys::CUdevice_attribute::*;
        (
            cu::device::get_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            cu::device::get_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        )
    };
    let (major, minor) = (
        major.map_err(|e| cuda_error("cuDeviceGetAttribute", e))?,
        minor.map_err(|e| cuda_error("cuDeviceGetAttribute", e))?,
    );
    // SAFETY: the device is valid.
    let context = unsafe { cu::primary_ctx::retain(device) }
        .map_err(|e| cuda_error("cuDevicePrimaryCtxRetain", e))?;
    // SAFETY: a context just retained.
    unsafe { cu::ctx::set_current(context) }.map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
    let module = load_kernels(major, minor)?;
    // SAFETY: the module was just loaded and is never unloaded.
    unsafe {
        let mut functions = HashMap::new();
        for name in ENTRY_POINTS {
            let f = cu::module::get_function(module, CString::new(*name).expect("no NUL"))
                .map_err(|e| cuda_error(name, e))?;
            functions.insert(*name, f);
        }
        let cublas =
            cudarc::cublas::result::create_handle().map_err(|e| cuda_error("cublasCreate", e))?;
        Ok(Loaded {
            context,
            functions,
            cublas,
        })
    }
}

/// The kernels as a module of the current context: machine code for this exact device
/// (sm_XY) if NVRTC and the driver agree on it, else PTX for the driver to compile.
fn load_kernels(major: i32, minor: i32) -> Result<sys::CUmodule> {
    let load = |image: &[u8]| {
        // SAFETY: a CUBIN or a NUL-terminated PTX text that NVRTC produced.
        unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }
    };
    let cubin_error = match compile_cubin(&format!("sm_{major}{minor}")) {
        Ok(cubin) => match load(&cubin) {
            Ok(module) => return Ok(module),
            Err(e) => format!("{e:?}"),
        },
        Err(log) => log,
    };
    // NVRTC wants a 'static name; one small leak per device and process.
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    let ptx = compile(Some(arch)).map_err(|log| cuda_error("NVRTC", log))?;
    let ptx = CString::new(ptx).map_err(|e| cuda_error("PTX", e))?;
    load(ptx.as_bytes_with_nul()).map_err(|e| {
        cuda_error(
            "cuModuleLoadData",
            format!("PTX: {e:?}; machine code for sm_{major}{minor}: {cubin_error}"),
        )
    })
}

/// Work queued on one stream of one device.
pub struct Stream<'a> {
    loaded: &'a Loaded,
    stream: sys::CUstream,
}

/// Runs `work` with device `ordinal` set up and current, queuing on `stream` (a CUstream
/// address; 0 is the legacy default stream). Returns once the work is queued, not done.
pub fn with_stream<R>(
    ordinal: usize,
    stream: u64,
    work: impl FnOnce(&Stream) -> Result<R>,
) -> Result<R> {
    if super::forked() {
        return Err(super::forked_error());
    }
    if !available() {
        return Err(Error::invalid(
            "device",
            "no CUDA driver or device is available in this process",
        ));
    }
    let mut all = loaded().lock().unwrap_or_else(|e| e.into_inner());
    let loaded = match all.entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(load(ordinal)?),
    };
    let loaded = &*loaded;
    let stream = stream as usize as sys::CUstream;
    // SAFETY: the context and handle were created by `load` and are never destroyed.
    unsafe {
        cu::ctx::set_current(loaded.context).map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        cudarc::cublas::result::set_stream(loaded.cublas, stream as _)
            .map_err(|e| cuda_error("cublasSetStream", e))?;
    }
    work(&Stream { loaded, stream })
}

impl Stream<'_> {
    /// Blocks until everything queued on the stream has run.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a stream of the current context (or the default stream).
        unsafe { cu::stream::synchronize(self.stream) }
            .map_err(|e| cuda_error("cuStreamSynchronize", e))
    }

    /// Copies `src` to device address `dst` (synchronously).
    pub fn upload<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.synchronize()?;
        // SAFETY: the caller's buffer at `dst` holds `src.len()` elements.
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(|e| cuda_error("cuMemcpyHtoD", e))
    }

    /// Copies from device address `src` into `dst` after the queued work is done.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<()> {
        self.synchronize()?;
        // SAFETY: the buffer at `src` holds `dst.len()` elements.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(|e| cuda_error("cuMemcpyDtoH", e))
    }
}

impl Device for Stream<'_> {
    fn launch(&self, kernel: &str, grid: usize, block: usize, args: &[Arg]) -> Result<()> {
        let function = *self
            .loaded
            .functions
            .get(kernel)
            .ok_or_else(|| cuda_error(kernel, "not an entry point of kernels.cu"))?;
        if grid == 0 {
            return Ok(());
        }
        let grid = u32::try_from(grid).map_err(|_| cuda_error(kernel, "grid too large"))?;
        let mut values = arg_values(args);
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        // SAFETY: the launch sequences pass the kernel's parameters in order, with device
        // addresses of buffers large enough for the grid.
        unsafe {
            cu::launch_kernel(
                function,
                (grid, 1, 1),
                (block as u32, 1, 1),
                0,
                self.stream,
                &mut params,
            )
        }
        .map_err(|e| cuda_error(kernel, e))
    }

    fn gemm(&self, gemm: &ColumnMajorGemm) -> Result<()> {
        let g = &gemm.0;
        use cublas::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let dims = [g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.batch];
        if dims.iter().any(|&v| v > i32::MAX as usize) {
            return Err(cuda_error("GEMM", "a dimension exceeds 2^31 - 1"));
        }
        let [m, n, k, lda, ldb, ldc, batch] = dims.map(|v| v as i32);
        let strides = [g.stride_a, g.stride_b, g.stride_c];
        if strides.iter().any(|&v| v > i64::MAX as usize) {
            return Err(cuda_error("GEMM", "a batch stride exceeds 2^63 - 1"));
        }
        let [stride_a, stride_b, stride_c] = strides.map(|v| v as i64);
        let (ta, tb, h) = (op(g.trans_a), op(g.trans_b), self.loaded.cublas);
        let batched = g.batch != 1;
        // SAFETY: operands are device addresses of the sizes the dimensions (and, batched,
        // the strides) say; alpha and beta are host scalars (cuBLAS's default pointer mode).
        let status = unsafe {
            match (g.elem, g.out, g.tf32) {
                (Elem::F32, Elem::F32, false) => {
                    let (alpha, beta) = (g.alpha as f32, g.beta as f32);
                    let (a, b, c) = (g.a as *const f32, g.b as *const f32, g.c as *mut f32);
                    if batched {
                        cudarc::cublas::result::sgemm_strided_batched(
                            h, ta, tb, m, n, k, &alpha, a, lda, stride_a, b, ldb, stride_b, &beta,
                            c, ldc, stride_c, batch,
                        )
                    } else {
                        cudarc::cublas::result::sgemm(
                            h, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc,
                        )
                    }
                }
                (Elem::F64, Elem::F64, _) => {
                    let (a, b, c) = (g.a as *const f64, g.b as *const f64, g.c as *mut f64);
                    if batched {
                        cudarc::cublas::result::dgemm_strided_batched(
                            h, ta, tb, m, n, k, &g.alpha, a, lda, stride_a, b, ldb, stride_b,
                            &g.beta, c, ldc, stride_c, batch,
                        )
                    } else {
                        cudarc::cublas::result::dgemm(
                            h, ta, tb, m, n, k, &g.alpha, a, lda, b, ldb, &g.beta, c, ldc,
                        )
                    }
                }
                // 16-bit inputs, or float32 ones as TF32: tensor cores, float32 accumulation,
                // a float32 output or one in the inputs' type
                (Elem::F32 | Elem::F16 | Elem::Bf16, out, tf32)
                    if out == Elem::F32 || out == g.elem =>
                {
                    let (alpha, beta) = (g.alpha as f32, g.beta as f32);
                    let alpha = &alpha as *const f32 as *const c_void;
                    let beta = &beta as *const f32 as *const c_void;
                    let (a, b, c) = (
                        g.a as *const c_void,
                        g.b as *const c_void,
                        g.c as *mut c_void,
                    );
                    let (input, output) = (data_type(g.elem), data_type(out));
                    let compute = if tf32 && g.elem == Elem::F32 {
                        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
                    } else {
                        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F
                    };
                    let algo = cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
                    if batched {
                        cudarc::cublas::result::gemm_strided_batched_ex(
                            h, ta, tb, m, n, k, alpha, a, input, lda, stride_a, b, input, ldb,
                            stride_b, beta, c, output, ldc, stride_c, batch, compute, algo,
                        )
                    } else {
                        cudarc::cublas::result::gemm_ex(
                            h, ta, tb, m, n, k, alpha, a, input, lda, b, input, ldb, beta, c,
                            output, ldc, compute, algo,
                        )
                    }
                }
                (input, output, _) => {
                    return Err(cuda_error(
                        "GEMM",
                        format!("{input:?} inputs with {output:?} output are not supported"),
                    ))
                }
            }
        };
        status.map_err(|e| cuda_error("cuBLAS GEMM", e))
    }

    fn zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's buffer at `ptr` holds `bytes` bytes.
        unsafe { cu::memset_d8_async(ptr, 0, bytes, self.stream) }
            .map_err(|e| cuda_error("cuMemsetD8Async", e))
    }
}

/// cuBLAS's name of an input type.
fn data_type(elem: Elem) -> cublas::cudaDataType_t {
    use cublas::cudaDataType_t::*;
    match elem {
        Elem::F32 => CUDA_R_32F,
        Elem::F64 => CUDA_R_64F,
        Elem::F16 => CUDA_R_16F,
        Elem::Bf16 => CUDA_R_16BF,
    }
}

/// Device memory this crate owns (the Gallery's rows), freed on drop.
pub struct DeviceBuffer {
    ordinal: usize,
    ptr: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// `bytes` bytes on device `ordinal` for `what`, a size that the argument `arg` set. A
    /// device without that much free memory is [`Error::out_of_memory`] naming them (Python:
    /// `MemoryError`), with the bytes it has free; other failures are the driver's.
    pub fn new(ordinal: usize, bytes: usize, arg: &'static str, what: &str) -> Result<Self> {
        with_stream(ordinal, 0, |_| {
            // SAFETY: a plain allocation in the current context.
            match unsafe { cu::malloc_sync(bytes.max(1)) } {
                Ok(ptr) => Ok(DeviceBuffer {
                    ordinal,
                    ptr,
                    bytes,
                }),
                Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                    let free = cu::mem_get_info().ok().map(|(free, _)| free as u128);
                    let what = format!("{what} on cuda:{ordinal}");
                    Err(Error::out_of_memory(arg, &what, bytes as u128, free))
                }
                Err(e) => Err(cuda_error(&format!("cuMemAlloc of {bytes} bytes"), e)),
            }
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let ptr = self.ptr;
        let _ = with_stream(self.ordinal, 0, |_| {
            // SAFETY: allocated by `new` in this device's primary context, freed once.
            unsafe { cu::free_sync(ptr) }.map_err(|e| cuda_error("cuMemFree", e))
        });
    }
}
