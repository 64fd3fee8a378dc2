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

use super::device::{gemm, Arg, Carver, Device, Elem, RowMajorGemm};
use crate::head::HeadOptions;
use crate::margin::{Margin, Scale, PARAMS_LEN};
use crate::{Error, Result};

/// Columns per class tile: big enough that each GEMM fills the GPU, small enough that the
/// dL/dcos scratch (rows × tile) stays small.
pub const CLASS_TILE: usize = 16384;

/// Most device memory a separate stash may take (when it cannot live in the weight gradient).
pub const STASH_BUDGET_BYTES: usize = 1 << 30;

/// Most device memory the tiles' dX̂ products may take by default: a group of tiles gets its products
/// from one batched GEMM (see `fused`), as many tiles as fit.
pub const DX_PRODUCTS_BYTES: usize = 64 << 20;

/// Threads per block of the per-row kernels.
const ROW_THREADS: usize = 256;
/// Threads per block of the one-thread-per-row kernels.
const FLAT_THREADS: usize = 128;
/// Centres per block of the weights pass and the projection (one warp each).
const WARP_ROWS_PER_BLOCK: usize = 8;
// The tile passes share launches (`logits_and_weights`, `between_tiles`): one block size.
const _: () = assert!(ROW_THREADS == 32 * WARP_ROWS_PER_BLOCK);

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

/// Tile width and stash budget (the tests use small ones to cover many tiles and chunks).
#[derive(Clone, Copy, Debug)]
pub struct Tiling {
    pub class_tile: usize,
    pub stash_budget_bytes: usize,
    /// Most scratch for the dX̂ products of a group of tiles ([`DX_PRODUCTS_BYTES`]).
    pub dx_products_bytes: usize,
}

impl Default for Tiling {
    fn default() -> Self {
        Tiling {
            class_tile: CLASS_TILE,
            stash_budget_bytes: STASH_BUDGET_BYTES,
            dx_products_bytes: DX_PRODUCTS_BYTES,
        }
    }
}

/// Smallest and largest class tile `ARCFACE_RS_CUDA_CLASS_TILE` may set.
pub const CLASS_TILE_RANGE: std::ops::RangeInclusive<usize> = 256..=1 << 20;
/// `ARCFACE_RS_CUDA_CLASS_TILE` must be a multiple of this: tiles then start on 16-byte
/// boundaries of the per-class arrays and their rows are whole vector accesses.
pub const CLASS_TILE_STEP: usize = 256;

/// The class tile `ARCFACE_RS_CUDA_CLASS_TILE` asks for ([`CLASS_TILE`] when unset or
/// empty), or why it is refused.
pub fn class_tile_from(value: Option<&str>) -> std::result::Result<usize, String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(CLASS_TILE);
    };
    match value.parse::<usize>() {
        Ok(tile) if CLASS_TILE_RANGE.contains(&tile) && tile % CLASS_TILE_STEP == 0 => Ok(tile),
        _ => Err(format!(
            "{value:?} is not a multiple of {CLASS_TILE_STEP} from \
             {} to {} (unset: {CLASS_TILE})",
            CLASS_TILE_RANGE.start(),
            CLASS_TILE_RANGE.end()
        )),
    }
}

impl Tiling {
    /// The tiling of calls from Python: [`CLASS_TILE`] classes a tile unless
    /// `ARCFACE_RS_CUDA_CLASS_TILE` sets another. It is read once per process (the
    /// workspace a call is given and the call itself must agree); it is a tuning knob for
    /// benchmarks: smaller tiles keep more of a tile's logits and dW in a GPU's L2 cache
    /// between the kernels that write and read them, at more launches.
    pub fn configured() -> Result<Tiling> {
        use std::sync::OnceLock;
        static TILE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
        let tile = TILE.get_or_init(|| {
            class_tile_from(std::env::var("ARCFACE_RS_CUDA_CLASS_TILE").ok().as_deref())
        });
        match tile {
            Ok(class_tile) => Ok(Tiling {
                class_tile: *class_tile,
                ..Tiling::default()
            }),
            Err(message) => Err(Error::invalid(
                "ARCFACE_RS_CUDA_CLASS_TILE",
                message.clone(),
            )),
        }
    }
}

/// How a call is cut into tiles and row chunks.
#[derive(Clone, Copy, Debug)]
struct Plan {
    tile: usize,
    tiles: usize,
    chunk_rows: usize,
    stash_in_grad: bool,
    /// Tiles whose dX̂ products (stash times centres) one batched GEMM makes: 1 where a
    /// tile's 16-bit centres are made again in scratch for each pass (they do not last).
    dx_group: usize,
}

impl Plan {
    /// `stash_classes`: the classes a chunk's stash is sized for (C, or for one shard of a
    /// sharded head the largest shard's count, so that every shard cuts the rows alike).
    fn new(shape: HeadShape, want_weight: bool, tiling: Tiling, stash_classes: usize) -> Plan {
        let HeadShape {
            b, c, d, k, elem, ..
        } = shape;
        // whole classes per tile: a class's centres meet in one logits pass
        let k = k.max(1);
        let tile = (tiling.class_tile / k)
            .max(1)
            .saturating_mul(k)
            .min(c.max(1));
        let stash_in_grad = want_weight && b <= d;
        let chunk_rows = if stash_in_grad {
            b
        } else {
            (tiling.stash_budget_bytes / (stash_classes.max(c).max(1) * elem.size()))
                .clamp(1, b.max(1))
        };
        let tiles = c.div_ceil(tile);
        let product_bytes = (chunk_rows * d * shape.acc().size()).max(1);
        let dx_group = if shape.stages_weight() && !stash_in_grad {
            1
        } else {
            (tiling.dx_products_bytes / product_bytes).clamp(1, tiles.max(1))
        };
        Plan {
            tile,
            tiles,
            chunk_rows,
            stash_in_grad,
            dx_group,
        }
    }

    /// Elements from a parked stash to its tile's parked 16-bit centres (see `park` in
    /// `fused`): half of a tile's float32 rows of dW.
    fn copy_offset(&self, d: usize) -> usize {
        self.tile * d
    }

    /// Elements of one of the two spill slots (`stash_in_grad`): a chunk's stash of one
    /// tile, and its 16-bit centres `copy_offset` after it where the weight is staged.
    fn spill_slot(&self, shape: HeadShape) -> usize {
        if shape.stages_weight() {
            2 * self.copy_offset(shape.d)
        } else {
            self.chunk_rows * self.tile
        }
    }
}

/// The scratch buffers, carved out of the workspace.
struct Scratch {
    xhat: u64,
    norms: u64,
    row_scale: u64,
    w_inv: u64,
    target_logit: u64,
    target_dpsi: u64,
    /// per row: d psi / d norm, penalty, d penalty / d norm (MagFace)
    norm_extra: u64,
    /// per row: the hard-negative rule (above, t, curricular)
    rules: u64,
    /// per row (int32): the target class's closest centre (sub-centres)
    target_sub: u64,
    norm_term: u64,
    lse: u64,
    pz: u64,
    tile_max: u64,
    stats: u64,
    /// the half-precision path's float32 logits tile (the stash is 16-bit elsewhere)
    ztile: u64,
    /// two 16-bit copies of a tile's centres (a float32 weight on the half-precision path,
    /// B > D): tile t's in copy t mod 2, so that tile t + 1's is made while t's is read
    wtile: u64,
    /// per row of a chunk: [max, Σe, Σe·z, target logit] (a sharded head's are the caller's)
    parts: u64,
    /// the dX̂ products of a group of tiles (a tile's stash times its centres, before its
    /// row factors; see `tile_rows`), tile t's in slot t mod `dx_group`
    dxt: u64,
    /// the rows of X̂ times a tile's row factors (the dW GEMM's operand)
    xs: u64,
    /// the stash of the tiles whose next tile cannot hold it (the last one or two)
    spill: u64,
    stash: u64,
}

impl Scratch {
    fn carve(carver: &mut Carver, shape: HeadShape, plan: Plan) -> Scratch {
        let HeadShape { b, c, d, elem, .. } = shape;
        let (sz, asz, nr) = (elem.size(), shape.acc().size(), plan.chunk_rows);
        Scratch {
            xhat: carver.take(b * d, sz),
            norms: carver.take(b, 8),
            row_scale: carver.take(b, 8),
            w_inv: carver.take(c, asz),
            target_logit: carver.take(b, 8),
            target_dpsi: carver.take(b, 8),
            norm_extra: carver.take(3 * b, 8),
            rules: carver.take(3 * b, 8),
            target_sub: carver.take(b, 4),
            norm_term: carver.take(b, 8),
            lse: carver.take(nr, 8),
            pz: carver.take(nr, 8),
            tile_max: carver.take(plan.tiles * nr, asz),
            stats: carver.take(plan.tiles * nr * 3, 8),
            ztile: if elem.is_half() {
                carver.take(nr * plan.tile, asz)
            } else {
                0
            },
            wtile: if shape.stages_weight() && !plan.stash_in_grad {
                carver.take(2 * plan.tile * d, sz)
            } else {
                0
            },
            parts: carver.take(nr * 4, 8),
            dxt: carver.take(plan.dx_group * nr * d, asz),
            xs: carver.take(nr * d, sz),
            spill: if plan.stash_in_grad {
                carver.take(plan.tiles.min(2) * plan.spill_slot(shape), sz)
            } else {
                0
            },
            stash: if plan.stash_in_grad {
                0
            } else {
                carver.take(nr * c, sz)
            },
        }
    }
}

/// Workspace bytes one call needs.
pub fn workspace_bytes(shape: HeadShape, want_weight: bool, tiling: Tiling) -> usize {
    workspace_bytes_shard(shape, want_weight, tiling, shape.c)
}

/// Workspace bytes of one shard's call (see [`ShardHooks::stash_classes`]).
pub fn workspace_bytes_shard(
    shape: HeadShape,
    want_weight: bool,
    tiling: Tiling,
    stash_classes: usize,
) -> usize {
    let mut carver = Carver::new(0);
    let plan = Plan::new(shape, want_weight, tiling, stash_classes);
    Scratch::carve(&mut carver, shape, plan);
    carver.bytes()
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

fn fused(
    device: &dyn Device,
    shape: HeadShape,
    margin: &Margin,
    head: HeadOptions,
    buf: &HeadBuffers,
    tiling: Tiling,
    mut shard: Option<&mut ShardHooks>,
) -> Result<()> {
    use Arg::{Ptr, F64, I32};
    let HeadShape { b, c, d, elem, .. } = shape;
    if b == 0 || c == 0 || d == 0 {
        return Err(Error::invalid(
            "emb",
            format!("need at least one row, class and dimension, got B={b}, C={c}, D={d}"),
        ));
    }
    shape.check()?;
    head.check()?;
    let k = shape.k;
    if head.sub_centers != k || c % k != 0 {
        return Err(Error::invalid(
            "sub_centers",
            format!(
                "{} centres per class for a weight of {c} rows, but the shape says {k}",
                head.sub_centers
            ),
        ));
    }
    let filter = head.interclass_filter.unwrap_or(f64::INFINITY);
    let (want_emb, want_weight) = (buf.grad_emb != 0, buf.grad_weight != 0);
    let stash_classes = shard.as_ref().map_or(c, |sh| sh.stash_classes);
    let plan = Plan::new(shape, want_weight, tiling, stash_classes);
    let first_shard = shard.as_ref().is_none_or(|sh| sh.first_shard);
    let target_cos = shard.as_ref().map_or(0, |sh| sh.target_cos);
    let mut carver = Carver::new(buf.workspace);
    let s = Scratch::carve(&mut carver, shape, plan);
    let half = elem.is_half();
    let acc = shape.acc();
    // sizes: GEMM operands and stash, float32/64 results, the weight and dW as stored
    let (sz, asz, wsz) = (elem.size(), acc.size(), shape.weight.size());
    // a float32 weight's 16-bit tile copy parks beside the tile's stash (see `park` below)
    let copy_in_grad = shape.stages_weight() && plan.stash_in_grad;
    let (sfx, acc_sfx) = (elem.suffix(), acc.suffix());
    let (bi, di) = (b as i32, d as i32);
    let kernel = |name: &str| format!("{name}_{sfx}");
    // the tile passes' launches, by the weight's type and the GEMM operands'
    let tiles_kernel = |name: &str| format!("{name}_{}_{sfx}", shape.weight.suffix());
    let tile_span = |t: usize| {
        let lo = t * plan.tile;
        (lo, plan.tile.min(c - lo))
    };
    // The centres of tile t that a weights pass (`weights_tile` in kernels.cu, beside another
    // pass in one launch) goes over: (first, count), none when it has nothing to write (no
    // 16-bit `copy` and no inverse norms `w_inv`) or past the last tile.
    let weights_span = |t: usize, copy: u64, w_inv: u64| {
        if t < plan.tiles && (copy != 0 || w_inv != 0) {
            tile_span(t)
        } else {
            (0, 0)
        }
    };

    device.launch(
        &kernel("normalize_rows"),
        b,
        ROW_THREADS,
        &[
            Ptr(buf.emb),
            Ptr(s.xhat),
            Ptr(s.norms),
            I32(bi),
            I32(di),
            Ptr(buf.bad),
        ],
    )?;
    let (row_scale, feature_norm) = match margin.scale() {
        Scale::Fixed(scale) => {
            device.launch(
                "fill_f64",
                b.div_ceil(FLAT_THREADS),
                FLAT_THREADS,
                &[Ptr(s.row_scale), F64(scale), I32(bi)],
            )?;
            (s.row_scale, false)
        }
        Scale::FeatureNorm => (s.norms, true),
    };
    device.launch(
        &format!("targets_{}", shape.weight.suffix()),
        b,
        ROW_THREADS,
        &[
            // the half-precision path's x̂ is 16-bit: the target cosine comes from x
            Ptr(if half { buf.emb } else { s.xhat }),
            I32(half as i32),
            Ptr(buf.weight),
            Ptr(buf.labels),
            I32((c / k) as i32),
            I32(k as i32),
            I32(shard.is_some() as i32),
            Ptr(row_scale),
            Ptr(s.norms),
            I32(bi),
            I32(di),
            Ptr(buf.margins),
            I32(if buf.per_row_margins {
                PARAMS_LEN as i32
            } else {
                0
            }),
            Ptr(target_cos),
            Ptr(s.target_logit),
            Ptr(s.target_dpsi),
            Ptr(s.norm_extra),
            Ptr(s.rules),
            Ptr(s.target_sub),
            Ptr(buf.bad),
        ],
    )?;
    if want_emb {
        device.zero(buf.grad_emb, b * d * asz)?;
    }

    let row_gemm = |m, n, k, a, lda, b, ldb| RowMajorGemm {
        elem,
        out: acc,
        tf32: shape.tf32,
        trans_a: false,
        trans_b: false,
        m,
        n,
        k,
        alpha: 1.0,
        a,
        lda,
        b,
        ldb,
        beta: 0.0,
        c: 0,
        ldc: 0,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    };
    for start in (0..b).step_by(plan.chunk_rows) {
        let rows = plan.chunk_rows.min(b - start);
        let ri = rows as i32;
        let xhat = at(s.xhat, start * d, sz);
        let labels = at(buf.labels, start, 8);
        let scale = at(row_scale, start, 8);
        let target_logit = at(s.target_logit, start, 8);
        let row_weight = at(buf.row_weight, start, 8);
        // Where tile t's stash (and a float32 weight's 16-bit copy of its centres) wait
        // between the passes: its place in this chunk's stash, or the rows of dW of tile
        // t + 1 (written by tile t + 1's dW GEMM only after tile t's GEMMs and projection have
        // read them; not tile t's own rows, which its dW GEMM writes while reading the stash
        // and the projection writes while reading the copy), or a spill slot where tile t + 1
        // is short or missing (the last tile, and the one before a short last). A parked
        // copy sits `tile · d` elements after the stash: the second half of tile t + 1's
        // float32 rows (the stash, rows ≤ d by `stash_in_grad`, fits the first).
        let park = |t: usize| {
            if !plan.stash_in_grad {
                at(s.stash, t * plan.tile * rows, sz)
            } else if t + 1 < plan.tiles && c - (t + 1) * plan.tile >= plan.tile {
                at(buf.grad_weight, (t + 1) * plan.tile * d, wsz)
            } else {
                at(s.spill, (t % 2) * plan.spill_slot(shape), sz)
            }
        };
        // A tile's centres as the GEMMs read them: the weight's own rows, their parked
        // 16-bit copy, or (B > D) a scratch copy made again in each pass (tile t's in the
        // t mod 2 one: tile t + 1's is made in the launch whose projection reads tile t's).
        let centres = |t: usize| {
            if copy_in_grad {
                at(park(t), plan.copy_offset(d), sz)
            } else if shape.stages_weight() {
                at(s.wtile, (t % 2) * plan.tile * d, sz)
            } else {
                at(buf.weight, t * plan.tile * d, sz)
            }
        };

        // Pass 1. Tile t's logits pass shares a launch with tile t + 1's weights pass (on
        // the first row chunk its centres' inverse norms, which the logits pass reads, and
        // where the weight is staged their 16-bit copy, which its GEMM reads); tile 0's
        // weights pass goes alone, before its GEMM.
        let logits_and_weights = |t: Option<usize>| {
            let next = t.map_or(0, |t| t + 1);
            let copy = if shape.stages_weight() && next < plan.tiles {
                centres(next)
            } else {
                0
            };
            let next_inv = if start == 0 && next < plan.tiles {
                at(s.w_inv, tile_span(next).0, asz)
            } else {
                0
            };
            let (next_lo, next_width) = weights_span(next, copy, next_inv);
            let (lo, width) = t.map_or((0, 0), tile_span);
            let logit_rows = if t.is_some() { rows } else { 0 };
            // the logits: in place of the stash, or (half precision) a float32 tile
            let z = if half { s.ztile } else { park(t.unwrap_or(0)) };
            let tile = t.unwrap_or(0);
            device.launch(
                &tiles_kernel("logits_and_weights"),
                logit_rows + next_width.div_ceil(WARP_ROWS_PER_BLOCK),
                ROW_THREADS,
                &[
                    Ptr(z),
                    Ptr(park(tile)),
                    I32(logit_rows as i32),
                    I32(width as i32),
                    I32(lo as i32),
                    I32(k as i32),
                    Ptr(at(s.w_inv, lo, asz)),
                    Ptr(scale),
                    Ptr(labels),
                    Ptr(target_logit),
                    Ptr(at(s.target_sub, start, 4)),
                    Ptr(at(s.rules, start * 3, 8)),
                    F64(filter),
                    Ptr(at(s.tile_max, tile * rows, asz)),
                    Ptr(at(s.stats, tile * rows * 3, 8)),
                    Ptr(at(buf.weight, next_lo * d, wsz)),
                    Ptr(copy),
                    Ptr(next_inv),
                    I32(next_width as i32),
                    I32(di),
                    I32(next_lo as i32),
                    Ptr(buf.bad + 4),
                ],
            )
        };
        logits_and_weights(None)?;
        for t in 0..plan.tiles {
            let width = tile_span(t).1;
            gemm(
                device,
                RowMajorGemm {
                    trans_b: true,
                    c: if half { s.ztile } else { park(t) },
                    ldc: width,
                    ..row_gemm(rows, width, d, xhat, d, centres(t), d)
                },
            )?;
            logits_and_weights(Some(t))?;
        }
        let flat_grid = rows.div_ceil(FLAT_THREADS);
        let parts = shard
            .as_ref()
            .map_or(s.parts, |sh| at(sh.parts, start * 4, 8));
        device.launch(
            "merge_stats",
            flat_grid,
            FLAT_THREADS,
            &[
                Ptr(s.stats),
                I32(plan.tiles as i32),
                I32(ri),
                Ptr(target_logit),
                Ptr(parts),
            ],
        )?;
        if let Some(sh) = shard.as_mut() {
            (sh.combine)(start, rows)?;
        }
        device.launch(
            "finish_stats",
            flat_grid,
            FLAT_THREADS,
            &[
                Ptr(parts),
                I32(ri),
                Ptr(s.lse),
                Ptr(s.pz),
                Ptr(target_logit),
            ],
        )?;
        device.launch(
            "row_losses",
            flat_grid,
            FLAT_THREADS,
            &[
                Ptr(s.lse),
                Ptr(s.pz),
                Ptr(target_logit),
                Ptr(labels),
                Ptr(row_weight),
                Ptr(scale),
                Ptr(at(s.norm_extra, 3 * start, 8)),
                I32(feature_norm as i32),
                I32(first_shard as i32),
                I32(ri),
                Ptr(at(buf.row_loss, start, 8)),
                Ptr(at(s.norm_term, start, 8)),
            ],
        )?;
        if !want_emb && !want_weight {
            continue;
        }

        let dxhat = at(buf.grad_emb, start * d, asz);
        let emb = at(buf.emb, start * d, asz);
        let norms = at(s.norms, start, 8);
        // Pass 2. Before tile t's GEMMs (t = tiles: after the last's), one launch runs
        // (`between_tiles`): tile t - 1's projection of dW (the normalisation's Jacobian,
        // along the centres its GEMMs read: a float32 weight's 16-bit copy, whose rounding
        // is the GEMMs' own and which is likelier in L2 than the float32 rows), tile t's row
        // factors (tile t - 1's dX̂ product into dX̂ and tile t's rows of X̂, each times its
        // tile's row factors) and, where the weight is staged into scratch, tile t's copy.
        let product = |t: usize| at(s.dxt, (t % plan.dx_group) * rows * d, asz);
        let between_tiles = |t: usize| {
            let prev = t.checked_sub(1);
            let (prev_lo, prev_width) = prev.map_or((0, 0), tile_span);
            let project = want_weight && prev.is_some();
            let add_prev = want_emb && prev.is_some();
            let make_xs = want_weight && t < plan.tiles;
            let factor_rows = if add_prev || make_xs { rows } else { 0 };
            let copy = if shape.stages_weight() && !copy_in_grad && t < plan.tiles {
                centres(t)
            } else {
                0
            };
            let (copy_lo, copy_width) = weights_span(t, copy, 0);
            let proj_rows = if project { prev_width } else { 0 };
            let blocks = proj_rows.div_ceil(WARP_ROWS_PER_BLOCK)
                + factor_rows
                + copy_width.div_ceil(WARP_ROWS_PER_BLOCK);
            device.launch(
                &tiles_kernel("between_tiles"),
                blocks,
                ROW_THREADS,
                &[
                    Ptr(at(buf.grad_weight, prev_lo * d, wsz)),
                    Ptr(centres(prev.unwrap_or(0))),
                    Ptr(at(s.w_inv, prev_lo, asz)),
                    I32(proj_rows as i32),
                    Ptr(if add_prev { product(t - 1) } else { 0 }),
                    Ptr(at(s.tile_max, prev.unwrap_or(0) * rows, asz)),
                    Ptr(dxhat),
                    Ptr(emb),
                    Ptr(norms),
                    Ptr(at(s.tile_max, t.min(plan.tiles - 1) * rows, asz)),
                    Ptr(if make_xs { s.xs } else { 0 }),
                    Ptr(s.lse),
                    Ptr(row_weight),
                    Ptr(scale),
                    I32(factor_rows as i32),
                    Ptr(at(buf.weight, copy_lo * d, wsz)),
                    Ptr(copy),
                    I32(copy_width as i32),
                    I32(di),
                ],
            )
        };
        // The dX̂ products of tiles from..to (each tile's stash times its centres, scaled
        // into dX̂ by the launch before the next tile's GEMMs): M = rows and N = d against
        // K = a tile's classes, a shape that one GEMM fills the GPU with only by splitting
        // K, so a run of tiles whose stash and centres lie at constant strides goes in one
        // batched GEMM (the parked stashes do: in the next tile's rows of dW, or in the
        // chunk's stash; not the spilled last ones or a short last tile).
        let dx_products = |from: usize, to: usize| -> Result<()> {
            // bytes from one tile's operand to the next one's, where positive
            let stride = |first: u64, next: u64| {
                next.checked_sub(first)
                    .filter(|&s| s > 0 && s % sz as u64 == 0)
            };
            let mut t = from;
            while t < to {
                let width = tile_span(t).1;
                let (a, w) = (park(t), centres(t));
                let (mut n, mut sa, mut sb) = (1, 0, 0);
                if t + 1 < to {
                    if let (Some(x), Some(y)) = (stride(a, park(t + 1)), stride(w, centres(t + 1)))
                    {
                        (sa, sb) = (x, y);
                        while t + n < to
                            && tile_span(t + n).1 == width
                            && park(t + n) == a + n as u64 * sa
                            && centres(t + n) == w + n as u64 * sb
                        {
                            n += 1;
                        }
                    }
                }
                gemm(
                    device,
                    RowMajorGemm {
                        c: product(t),
                        ldc: d,
                        batch: n,
                        stride_a: sa as usize / sz,
                        stride_b: sb as usize / sz,
                        stride_c: rows * d,
                        ..row_gemm(rows, d, width, a, width, w, d)
                    },
                )?;
                t += n;
            }
            Ok(())
        };
        for t in 0..plan.tiles {
            let (lo, width) = tile_span(t);
            between_tiles(t)?;
            if want_emb && t % plan.dx_group == 0 {
                // after the launch that reads the previous group's last product
                dx_products(t, (t + plan.dx_group).min(plan.tiles))?;
            }
            if want_weight {
                // dW_t = stashᵀ (factors · X̂ rows), accumulated over row chunks (P is
                // linear and idempotent, so projecting after each chunk stays exact).
                let fresh = plan.stash_in_grad || start == 0;
                gemm(
                    device,
                    RowMajorGemm {
                        out: shape.weight,
                        trans_a: true,
                        beta: if fresh { 0.0 } else { 1.0 },
                        c: at(buf.grad_weight, lo * d, wsz),
                        ldc: d,
                        ..row_gemm(width, d, rows, park(t), width, s.xs, d)
                    },
                )?;
            }
        }
        between_tiles(plan.tiles)?;
        // the targets' terms, which the stash leaves out
        device.launch(
            &format!("target_grads_{}", shape.weight.suffix()),
            rows,
            ROW_THREADS,
            &[
                Ptr(emb),
                Ptr(norms),
                Ptr(buf.weight),
                Ptr(s.w_inv),
                Ptr(labels),
                Ptr(at(s.target_sub, start, 4)),
                I32((c / k) as i32),
                I32(k as i32),
                Ptr(s.lse),
                Ptr(target_logit),
                Ptr(at(s.target_dpsi, start, 8)),
                Ptr(row_weight),
                Ptr(scale),
                I32(ri),
                I32(di),
                Ptr(if want_emb { dxhat } else { 0 }),
                Ptr(buf.grad_weight),
            ],
        )?;
    }
    if want_emb {
        device.launch(
            &format!("finish_grad_emb_{acc_sfx}"),
            b,
            ROW_THREADS,
            &[
                Ptr(buf.grad_emb),
                Ptr(buf.emb),
                Ptr(s.norms),
                Ptr(s.norm_term),
                I32(bi),
                I32(di),
            ],
        )?;
    }
    Ok(())
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
