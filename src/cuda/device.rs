//! What the launch sequences need from a GPU: kernel launches and cuBLAS GEMMs on one
//! stream, over raw device addresses. [`super::driver`] implements it with the CUDA driver
//! and cuBLAS; the tests implement it with a CPU emulator that runs the same `kernels.cu`,
//! so the sequences (tiling, offsets, the GEMMs' layouts) are checked without a GPU.

use crate::{Error, Result};

/// One kernel argument, passed by value as CUDA's `kernelParams` expects.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address.
    Ptr(u64),
    I32(i32),
    I64(i64),
    F64(f64),
}

/// Element types of the device buffers: of a GEMM's inputs and of its output (f32 or f64;
/// 16-bit inputs always accumulate and write in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    F16,
    Bf16,
}

impl Elem {
    /// Bytes per input element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
            Elem::F16 | Elem::Bf16 => 2,
        }
    }

    /// Whether this is a 16-bit type (the half-precision head).
    pub fn is_half(self) -> bool {
        matches!(self, Elem::F16 | Elem::Bf16)
    }

    /// cuBLAS's cudaDataType_t code of this type.
    pub fn cuda_type(self) -> i32 {
        match self {
            Elem::F32 => 0,
            Elem::F64 => 1,
            Elem::F16 => 2,
            Elem::Bf16 => 14,
        }
    }

    /// The kernels' name suffix for this element type.
    pub fn suffix(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F64 => "f64",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
        }
    }
}

/// A GEMM over row-major matrices: `C (m×n) = alpha op(A) op(B) + beta C`, with `op(A)` m×k
/// and `op(B)` k×n; `trans_a` means A is stored k×m. `ld*` are row strides in elements.
/// With `beta == 0`, C is not read (it may hold anything). A and B are `elem`, C is `out`;
/// `tf32` lets float32 inputs run on tensor cores as TF32 (10 mantissa bits). `batch`
/// products (cuBLAS's strided batch; 1 for one GEMM): product i reads A and B `stride_a · i`
/// and `stride_b · i` elements on and writes C `stride_c · i` elements on; they may run
/// at once, so no product's C may overlap another's A, B or C.
#[derive(Clone, Copy, Debug)]
pub struct RowMajorGemm {
    pub elem: Elem,
    pub out: Elem,
    pub tf32: bool,
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f64,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub beta: f64,
    pub c: u64,
    pub ldc: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

/// The same fields read in cuBLAS's own column-major terms (`ld*` are column strides).
#[derive(Clone, Copy, Debug)]
pub struct ColumnMajorGemm(pub RowMajorGemm);

impl RowMajorGemm {
    /// The same product for cuBLAS: a row-major matrix is its transpose in column-major
    /// order, so C^T = op(B)^T op(A)^T swaps the operands and keeps each one's flag.
    pub fn column_major(&self) -> ColumnMajorGemm {
        ColumnMajorGemm(RowMajorGemm {
            trans_a: self.trans_b,
            trans_b: self.trans_a,
            m: self.n,
            n: self.m,
            a: self.b,
            lda: self.ldb,
            stride_a: self.stride_b,
            b: self.a,
            ldb: self.lda,
            stride_b: self.stride_a,
            ..*self
        })
    }
}

/// A GPU stream to run work on, in order.
pub trait Device {
    /// Launches `kernel` (an entry point of `kernels.cu`) on a 1-D grid.
    fn launch(&self, kernel: &str, grid: usize, block: usize, args: &[Arg]) -> Result<()>;
    /// One cuBLAS GEMM.
    fn gemm(&self, gemm: &ColumnMajorGemm) -> Result<()>;
    /// Sets `bytes` bytes at `ptr` to zero.
    fn zero(&self, ptr: u64, bytes: usize) -> Result<()>;
}

/// Each argument's value in an 8-byte slot (little-endian: a 4-byte int sits at the start),
/// for kernelParams' array of pointers to values.
pub fn arg_values(args: &[Arg]) -> Vec<[u8; 8]> {
    args.iter()
        .map(|arg| {
            let mut slot = [0u8; 8];
            match *arg {
                Arg::Ptr(p) => slot.copy_from_slice(&p.to_ne_bytes()),
                Arg::I64(v) => slot.copy_from_slice(&v.to_ne_bytes()),
                Arg::F64(v) => slot.copy_from_slice(&v.to_ne_bytes()),
                Arg::I32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
            }
            slot
        })
        .collect()
}

/// A row-major GEMM on `device`.
pub fn gemm(device: &dyn Device, gemm: RowMajorGemm) -> Result<()> {
    device.gemm(&gemm.column_major())
}

/// The error for a failed driver, NVRTC or cuBLAS call.
pub fn cuda_error(what: &str, detail: impl std::fmt::Debug) -> Error {
    Error::device(format!("{what} failed: {detail:?}"))
}

/// Hands out aligned, non-overlapping ranges of one workspace buffer.
pub struct Carver {
    base: u64,
    used: usize,
}

/// cuBLAS and vector loads want aligned operands; 256 bytes is what cudaMalloc guarantees.
pub(crate) const ALIGN: usize = 256;

impl Carver {
    pub fn new(base: u64) -> Self {
        Carver { base, used: 0 }
    }

    /// The next `count` elements of `size` bytes.
    pub fn take(&mut self, count: usize, size: usize) -> u64 {
        let at = self.used.next_multiple_of(ALIGN);
        self.used = at + count * size;
        self.base + at as u64
    }

    /// Bytes handed out so far, rounded up to the alignment.
    pub fn bytes(&self) -> usize {
        self.used.next_multiple_of(ALIGN)
    }
}
