//! Test-only [`Device`] that runs `kernels.cu` on the CPU (see `emulator.cpp`) and GEMMs with
//! cuBLAS's column-major semantics (`reference_gemm.h`), so the launch sequences are tested
//! without a GPU.
//! "Device addresses" are host addresses of the test's own buffers.

use super::device::{arg_values, cuda_error, Arg, ColumnMajorGemm, Device};
use crate::Result;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

type LaunchFn = unsafe extern "C" fn(*const c_char, c_uint, c_uint, *mut *mut c_void) -> c_int;
type HasFn = unsafe extern "C" fn(*const c_char) -> c_int;
type OrderFn = unsafe extern "C" fn(i64, u64, *mut i64);
type GemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f64,
    *const c_void,
    c_int,
    i64,
    *const c_void,
    c_int,
    i64,
    f64,
    *mut c_void,
    c_int,
    i64,
    c_int,
) -> c_int;

pub struct Emulator {
    _lib: libloading::Library,
    launch: LaunchFn,
    has: HasFn,
    gemm: GemmFn,
    order: OrderFn,
}

/// The emulator's scheduler is global state: one launch at a time in the process.
static LAUNCH_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    /// Launches (of at least one block) and GEMMs this thread has queued on the emulator:
    /// the tests count what a launch sequence costs.
    static CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count_call() {
    CALLS.with(|calls| calls.set(calls.get() + 1));
}

impl Emulator {
    /// The emulator, compiled once per test process with the system's C++ compiler ($CXX or
    /// c++, C++20).
    pub fn get() -> &'static Emulator {
        static EMULATOR: OnceLock<Emulator> = OnceLock::new();
        EMULATOR.get_or_init(|| Self::build().unwrap_or_else(|e| panic!("{e}")))
    }

    fn build() -> std::result::Result<Emulator, String> {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cuda/emulator.cpp");
        let out = std::env::temp_dir().join(format!(
            "arcface_rs_cuda_emulator_{}.so",
            std::process::id()
        ));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let defines = super::margin_defines()
            .into_iter()
            .map(|(name, value)| format!("-D{name}={value}"));
        let status = Command::new(&cxx)
            .args(defines)
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .map_err(|e| format!("cannot run the C++ compiler {cxx:?}: {e}"))?;
        if !status.success() {
            return Err(format!("{cxx} failed to compile {}", src.display()));
        }
        // SAFETY: the library is ours; its only initialisers are its static tables.
        let lib = unsafe { libloading::Library::new(&out) }.map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&out);
        // SAFETY: the symbols have exactly these signatures in emulator.cpp.
        unsafe {
            let launch = *lib
                .get::<LaunchFn>(b"emu_launch\0")
                .map_err(|e| e.to_string())?;
            let has = *lib.get::<HasFn>(b"emu_has\0").map_err(|e| e.to_string())?;
            let gemm = *lib
                .get::<GemmFn>(b"emu_gemm\0")
                .map_err(|e| e.to_string())?;
            let order = *lib
                .get::<OrderFn>(b"emu_order\0")
                .map_err(|e| e.to_string())?;
            Ok(Emulator {
                _lib: lib,
                launch,
                has,
                gemm,
                order,
            })
        }
    }

    /// The order in which the scheduler runs `n` threads (or blocks) when its generator is
    /// at state `seed` (see `draw_order` in emulator.cpp).
    pub fn order(&self, n: usize, seed: u64) -> Vec<usize> {
        let mut out = vec![-1i64; n];
        let _one_at_a_time = LAUNCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `out` holds the `n` entries the function writes.
        unsafe { (self.order)(n as i64, seed, out.as_mut_ptr()) };
        out.into_iter().map(|i| i as usize).collect()
    }

    /// Launches (of at least one block) and GEMMs queued so far by the calling thread.
    pub fn calls_on_this_thread() -> usize {
        CALLS.with(|calls| calls.get())
    }

    /// Whether the emulator knows kernel `name`.
    pub fn has(&self, name: &str) -> bool {
        let name = CString::new(name).expect("kernel names have no NUL");
        // SAFETY: a NUL-terminated string.
        unsafe { (self.has)(name.as_ptr()) != 0 }
    }
}

impl Device for Emulator {
    fn launch(&self, kernel: &str, grid: usize, block: usize, args: &[Arg]) -> Result<()> {
        let name = CString::new(kernel).expect("kernel names have no NUL");
        let mut values = arg_values(args);
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        if grid > 0 {
            count_call();
        }
        let _one_at_a_time = LAUNCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the test passes host buffers large enough for what the kernel touches.
        let code = unsafe {
            (self.launch)(
                name.as_ptr(),
                grid as c_uint,
                block as c_uint,
                params.as_mut_ptr(),
            )
        };
        match code {
            0 => Ok(()),
            1 => Err(cuda_error(kernel, "no such kernel in the emulator")),
            2 => Err(cuda_error(kernel, format!("block size {block}"))),
            _ => Err(cuda_error(
                kernel,
                "threads of a block met at different barriers",
            )),
        }
    }

    fn gemm(&self, gemm: &ColumnMajorGemm) -> Result<()> {
        count_call();
        let g = &gemm.0;
        let int = |v: usize| v as c_int;
        let long = |v: usize| v as i64;
        // SAFETY: the test's buffers hold the sizes the leading dimensions say.
        let status = unsafe {
            (self.gemm)(
                g.elem.cuda_type(),
                g.out.cuda_type(),
                g.tf32 as c_int,
                g.trans_a as c_int,
                g.trans_b as c_int,
                int(g.m),
                int(g.n),
                int(g.k),
                g.alpha,
                g.a as *const c_void,
                int(g.lda),
                long(g.stride_a),
                g.b as *const c_void,
                int(g.ldb),
                long(g.stride_b),
                g.beta,
                g.c as *mut c_void,
                int(g.ldc),
                long(g.stride_c),
                int(g.batch),
            )
        };
        match status {
            0 => Ok(()),
            code => Err(cuda_error("GEMM", format!("cuBLAS status {code}"))),
        }
    }

    fn zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the test's buffer holds `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(())
    }
}
