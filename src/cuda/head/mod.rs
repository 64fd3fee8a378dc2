//! The fused margin head on a GPU: the launch sequence of `kernels.cu` and cuBLAS GEMMs that
//! follows `crate::head` (the same two passes and float64 row statistics; the stash differs,
//! see below).
//!
//! All memory is the caller's (torch tensors): inputs, outputs and one workspace of
//! [`workspace_bytes`]. Classes are cut into tiles of [`CLASS_TILE`] columns (or
//! `ARCFACE_RS_CUDA_CLASS_TILE`'s, [`Tiling::configured`]); the B×C logits never exist whole.
//! Pass 1 per tile: Z = X̂ W_tᵀ (cuBLAS) and a kernel turning Z into the stash
//! E = exp(z - tile max) h'(c) / ||w|| (0 at the target) with the tile's row statistics; the
//! tiles' statistics merge into log-sum-exp per row. dL/dcos / ||w|| of a non-target centre
//! is then E times a factor F of the row and tile, so pass 2 per tile needs no pass over E:
//! dX̂ += F (E W_t) and dW_t = Eᵀ (F X̂) (cuBLAS; `tile_rows` applies F on the B × D side),
//! then the normalisation's projection on dW_t; `target_grads` adds the target terms.
//! Neighbouring passes that are independent share a launch (`logits_and_weights`,
//! `between_tiles` in kernels.cu), and the dX̂ products (E W_t) of a group of tiles come
//! from one batched GEMM: four launches a tile, two of them GEMMs.
//! When B <= D and the weight gradient is wanted, each tile's stash lives in the next tile's
//! rows of dW (a GEMM must not write its own operand); otherwise rows are cut into chunks
//! whose stash fits [`STASH_BUDGET_BYTES`] and dW accumulates over them.
//!
//! Precision ([`HeadShape`]): float64 and float32 run every step in their own type (float32
//! GEMMs optionally as TF32). The half-precision path (`elem` bf16 or f16) takes float32
//! embeddings and a float32 or 16-bit weight; the GEMM operands (x̂, each tile's centres,
//! dL/dcos) and the stash are 16-bit, on tensor cores with float32 accumulation; the logits
//! tile and dX̂ are float32, dW is in the weight's type and the row statistics are float64.
//! A float32 weight (autocast's master copy) is rounded to 16 bits one tile at a time (its
//! inverse norms come from the float32 values): with the stash in dW (B <= D) the tile's
//! copy waits beside its stash in the next tile's rows of dW, else in a scratch tile made
//! again in pass 2. No 16-bit copy of the whole weight is ever held. The normalisation's
//! projection on dW goes along the centres the GEMMs read (the 16-bit copy), so pass 2
//! never reads the float32 weight again.

mod launch;
mod tiling;

pub use tiling::{
    class_tile_from, dx_batch_from, workspace_bytes, workspace_bytes_shard, Tiling, CLASS_TILE,
    CLASS_TILE_RANGE, CLASS_TILE_STEP, DX_BATCH_MAX, DX_PRODUCTS_BYTES, STASH_BUDGET_BYTES,
};

use super::device::{Arg, Device, Elem};
use crate::head::HeadOptions;
use crate::margin::Margin;
use crate::{Error, Result};
use launch::fused;
use tiling::Plan;

/// Sizes and types of one call: B rows of D, C classes.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub b: usize,
    /// Rows of the weight: classes × `k`.
    pub c: usize,
    pub d: usize,
    /// Centres per class (sub-centres; 1 without): class j owns weight rows j·k .. j·k + k.
    pub k: usize,
    /// The GEMM operands' type: F32 or F64 (the exact paths: embeddings, weight and both
    /// gradients all in it), or F16 / Bf16 (the half-precision path: float32 embeddings,
    /// float32 gradients, the weight in `weight`).
    pub elem: Elem,
    /// The weight's type: `elem`, or F32 on the half-precision path.
    pub weight: Elem,
    /// float32 GEMMs on tensor cores as TF32 (torch's `allow_tf32`). The weight gradient is
    /// in `weight`'s type.
    pub tf32: bool,
}

impl HeadShape {
    /// One call computed entirely in `elem` (F32 or F64), without TF32.
    pub fn exact(b: usize, c: usize, d: usize, elem: Elem) -> HeadShape {
        HeadShape {
            b,
            c,
            d,
            k: 1,
            elem,
            weight: elem,
            tf32: false,
        }
    }

    /// The type of the logits tile, dX̂, the inverse norms and the embeddings: `elem` on the
    /// exact paths, F32 on the half-precision path.
    pub fn acc(&self) -> Elem {
        if self.elem.is_half() {
            Elem::F32
        } else {
            self.elem
        }
    }

    /// Whether each tile's centres are rounded into a 16-bit copy (a float32 weight on the
    /// half-precision path).
    fn stages_weight(&self) -> bool {
        self.weight != self.elem
    }

    /// Refuses type combinations the kernels do not have.
    pub fn check(&self) -> Result<()> {
        let ok = match self.elem {
            Elem::F32 | Elem::F64 => self.weight == self.elem,
            Elem::F16 | Elem::Bf16 => self.weight == self.elem || self.weight == Elem::F32,
        };
        if !ok {
            return Err(Error::invalid(
                "weight",
                format!(
                    "a {:?} weight cannot run with {:?} GEMM operands",
                    self.weight, self.elem
                ),
            ));
        }
        Ok(())
    }
}

/// Device addresses of one call (row-major, contiguous). Addresses of 0 mean "not wanted".
#[derive(Clone, Copy, Debug)]
pub struct HeadBuffers {
    /// (B, D) embeddings ([`HeadShape::acc`]).
    pub emb: u64,
    /// (C, D) class centres ([`HeadShape::weight`]).
    pub weight: u64,
    /// (B,) int64 labels, -1 for ignored rows, all checked to be < C.
    pub labels: u64,
    /// (B,) float64 d loss / d row loss (0 for ignored rows).
    pub row_weight: u64,
    /// float64 margin parameter blocks of `Margin::encode`: one block of `PARAMS_LEN`, or
    /// (B, `PARAMS_LEN`) with one per row when `per_row_margins`.
    pub margins: u64,
    pub per_row_margins: bool,
    /// Output (B,) float64: each row's loss, 0 for ignored rows.
    pub row_loss: u64,
    /// Output (B, D) gradient of the embeddings ([`HeadShape::acc`]), or 0.
    pub grad_emb: u64,
    /// Output (C, D) gradient of the class centres ([`HeadShape::weight`]), or 0.
    pub grad_weight: u64,
    /// (3,) int32 flags, raised (atomic max, never cleared here: the caller zeroes them once
    /// and may let several calls raise them before it reads them): one past the highest bad
    /// row (zero, NaN or inf) of emb, one past the highest bad centre of weight, and one
    /// past the highest row whose label is outside [0, C) and not -1. A flagged call's
    /// results are not to be trusted.
    pub bad: u64,
    /// [`workspace_bytes`] bytes of scratch.
    pub workspace: u64,
}

/// How one shard of a model-parallel head meets the others between the two passes
/// (`crate::head::ShardOptions` on the GPU). `labels` hold [`crate::head::REMOTE_TARGET`] for
/// rows whose target another shard holds; the loss rows are the whole head's on every shard,
/// `grad_weight` is this shard's and `grad_emb` this shard's share (the sum over shards is
/// the whole).
pub struct ShardHooks<'a> {
    /// Every shard cuts the rows into the same chunks (one `combine` each): they are sized
    /// for this many classes, the largest shard's count.
    pub stash_classes: usize,
    /// Exactly one shard adds the terms that do not split over classes.
    pub first_shard: bool,
    /// (B,) float64 on the device: every row's target cosine, for hard-negative margins
    /// (0 otherwise).
    pub target_cos: u64,
    /// (B, 4) float64 on the device: each row's [max, Σe, Σe·z, target logit] over this
    /// shard's classes, which `combine` replaces by those over all shards.
    pub parts: u64,
    /// `combine(first_row, rows)`: queues on the stream the exchange that merges rows
    /// `first_row..first_row + rows` of `parts` over all shards (a collective). It is called
    /// once per chunk on every shard, even when this shard fails (so that none waits).
    pub combine: &'a mut dyn FnMut(usize, usize) -> Result<()>,
}

/// Address of element `index` of an array of `size`-byte elements at `base`.
fn at(base: u64, index: usize, size: usize) -> u64 {
    base + (index * size) as u64
}

/// Loss rows and the wanted gradients of the margin head (see the module docs). Everything
/// is queued on `device`'s stream; the caller reads `bad` before trusting the results.
/// `margin` is the margin whose blocks `buf.margins` holds (for per-row margins, any row's:
/// they share its kind and scale); `head` its inter-class filter (one centre per class).
pub fn margin_loss(
    device: &dyn Device,
    shape: HeadShape,
    margin: &Margin,
    head: HeadOptions,
    buf: &HeadBuffers,
    tiling: Tiling,
) -> Result<()> {
    fused(device, shape, margin, head, buf, tiling, None)
}

/// One shard of a model-parallel head (see [`ShardHooks`]): `shape.c` and `buf.weight` are
/// this shard's classes.
pub fn margin_loss_shard(
    device: &dyn Device,
    shape: HeadShape,
    margin: &Margin,
    head: HeadOptions,
    buf: &HeadBuffers,
    tiling: Tiling,
    shard: &mut ShardHooks,
) -> Result<()> {
    let plan = Plan::new(shape, buf.grad_weight != 0, tiling, shard.stash_classes);
    let chunks = shape.b.div_ceil(plan.chunk_rows.max(1));
    let mut combined = 0;
    let out = {
        let mut counted = |start: usize, rows: usize| {
            combined += 1;
            (shard.combine)(start, rows)
        };
        let mut hooks = ShardHooks {
            combine: &mut counted,
            ..*shard
        };
        fused(device, shape, margin, head, buf, tiling, Some(&mut hooks))
    };
    if out.is_err() {
        // the other shards wait in the collectives this one has not joined yet
        for chunk in combined..chunks {
            let start = chunk * plan.chunk_rows;
            let _ = (shard.combine)(start, plan.chunk_rows.min(shape.b - start));
        }
    }
    out
}

/// Blocks of `scale_unless_one` at most (each thread then strides over the rest): enough
/// to keep a GPU's memory busy, few enough that the common call (upstream exactly 1, every
/// block returns at once) costs about one launch.
const SCALE_BLOCKS: usize = 2048;
/// Threads per block of `scale_unless_one`.
const SCALE_THREADS: usize = 256;

/// Multiplies `n` elements of a gradient at `grad` (type `elem`) in place by the float64
/// scalar at device address `scale` (the upstream gradient of the loss), unless it is
/// exactly 1. The head computes its gradients in the forward pass, before autograd knows
/// the upstream gradient; this applies it in the backward without the host reading it.
pub fn scale_unless_one(
    device: &dyn Device,
    elem: Elem,
    grad: u64,
    n: usize,
    scale: u64,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    device.launch(
        &format!("scale_unless_one_{}", elem.suffix()),
        n.div_ceil(SCALE_THREADS).min(SCALE_BLOCKS),
        SCALE_THREADS,
        &[Arg::Ptr(grad), Arg::I64(n as i64), Arg::Ptr(scale)],
    )
}
