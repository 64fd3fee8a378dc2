//! How a call of the GPU head is cut: class tiles (`ARCFACE_RS_CUDA_CLASS_TILE`), row
//! chunks, where each tile's stash waits between the passes, and the scratch carved out of
//! the caller's workspace.

use super::HeadShape;
use crate::cuda::device::Carver;
use crate::{Error, Result};

/// Columns per class tile: big enough that each GEMM fills the GPU, small enough that the
/// dL/dcos scratch (rows × tile) stays small.
pub const CLASS_TILE: usize = 16384;

/// Most device memory a separate stash may take (when it cannot live in the weight gradient).
pub const STASH_BUDGET_BYTES: usize = 1 << 30;

/// Most device memory the tiles' dX̂ products may take by default: a group of tiles gets its products
/// from one batched GEMM (see `fused`), as many tiles as fit.
pub const DX_PRODUCTS_BYTES: usize = 64 << 20;

/// Tile width and stash budget (the tests use small ones to cover many tiles and chunks).
#[derive(Clone, Copy, Debug)]
pub struct Tiling {
    pub class_tile: usize,
    pub stash_budget_bytes: usize,
    /// Most scratch for the dX̂ products of a group of tiles ([`DX_PRODUCTS_BYTES`]).
    pub dx_products_bytes: usize,
    /// Most tiles a group may hold (`ARCFACE_RS_CUDA_DX_BATCH`); None: as many as
    /// `dx_products_bytes` hold.
    pub dx_batch_tiles: Option<usize>,
}

impl Default for Tiling {
    fn default() -> Self {
        Tiling {
            class_tile: CLASS_TILE,
            stash_budget_bytes: STASH_BUDGET_BYTES,
            dx_products_bytes: DX_PRODUCTS_BYTES,
            dx_batch_tiles: None,
        }
    }
}

/// Smallest and largest class tile `ARCFACE_RS_CUDA_CLASS_TILE` may set.
pub const CLASS_TILE_RANGE: std::ops::RangeInclusive<usize> = 256..=1 << 20;
/// `ARCFACE_RS_CUDA_CLASS_TILE` must be a multiple of this: tiles then start on 16-byte
/// boundaries of the per-class arrays and their rows are whole vector accesses.
pub const CLASS_TILE_STEP: usize = 256;

/// A whole-number setting from the environment: None when unset or empty, the number when
/// `accept` takes it, else the trimmed value that was refused (for the caller's message).
fn whole_number_setting(
    value: Option<&str>,
    accept: impl Fn(usize) -> bool,
) -> std::result::Result<Option<usize>, &str> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(n) if accept(n) => Ok(Some(n)),
        _ => Err(value),
    }
}

/// The class tile `ARCFACE_RS_CUDA_CLASS_TILE` asks for ([`CLASS_TILE`] when unset or
/// empty), or why it is refused.
pub fn class_tile_from(value: Option<&str>) -> std::result::Result<usize, String> {
    let accept = |tile| CLASS_TILE_RANGE.contains(&tile) && tile % CLASS_TILE_STEP == 0;
    match whole_number_setting(value, accept) {
        Ok(tile) => Ok(tile.unwrap_or(CLASS_TILE)),
        Err(value) => Err(format!(
            "{value:?} is not a multiple of {CLASS_TILE_STEP} from \
             {} to {} (unset: {CLASS_TILE})",
            CLASS_TILE_RANGE.start(),
            CLASS_TILE_RANGE.end()
        )),
    }
}

/// Most tiles `ARCFACE_RS_CUDA_DX_BATCH` may put in one batched dX̂ GEMM.
pub const DX_BATCH_MAX: usize = 4096;

/// The tiles a batched dX̂ GEMM may take at most that `ARCFACE_RS_CUDA_DX_BATCH` asks for
/// (None when unset or empty: as many as [`DX_PRODUCTS_BYTES`] of products hold), or why it
/// is refused.
pub fn dx_batch_from(value: Option<&str>) -> std::result::Result<Option<usize>, String> {
    whole_number_setting(value, |tiles| (1..=DX_BATCH_MAX).contains(&tiles)).map_err(|value| {
        format!(
            "{value:?} is not a whole number from 1 to {DX_BATCH_MAX} (unset: as many \
             tiles as {} MiB of products hold)",
            DX_PRODUCTS_BYTES >> 20
        )
    })
}

impl Tiling {
    /// The tiling of calls from Python: [`CLASS_TILE`] classes a tile unless
    /// `ARCFACE_RS_CUDA_CLASS_TILE` sets another, and dX̂ products batched as
    /// [`DX_PRODUCTS_BYTES`] allow unless `ARCFACE_RS_CUDA_DX_BATCH` caps the tiles a batch.
    /// They are read once per process (the workspace a call is given and the call itself
    /// must agree); they are tuning knobs for benchmarks: smaller tiles keep more of a
    /// tile's logits and dW in a GPU's L2 cache between the kernels that write and read
    /// them, at more launches; a batch of one tile lets a tile's dW GEMM and projection read
    /// the stash and centres its dX̂ GEMM has just read (likely still in L2), at a dX̂ GEMM
    /// per tile whose shape fills the GPU only by splitting K.
    pub fn configured() -> Result<Tiling> {
        use std::sync::OnceLock;
        type Configured = std::result::Result<Tiling, (&'static str, String)>;
        static TILING: OnceLock<Configured> = OnceLock::new();
        let tiling = TILING.get_or_init(|| {
            let read = |name: &'static str| std::env::var(name).ok();
            let class_tile = class_tile_from(read("ARCFACE_RS_CUDA_CLASS_TILE").as_deref())
                .map_err(|m| ("ARCFACE_RS_CUDA_CLASS_TILE", m))?;
            let dx_batch_tiles = dx_batch_from(read("ARCFACE_RS_CUDA_DX_BATCH").as_deref())
                .map_err(|m| ("ARCFACE_RS_CUDA_DX_BATCH", m))?;
            Ok(Tiling {
                class_tile,
                dx_batch_tiles,
                ..Tiling::default()
            })
        });
        tiling
            .clone()
            .map_err(|(name, message)| Error::invalid(name, message))
    }
}

/// How a call is cut into tiles and row chunks.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub(super) tile: usize,
    pub(super) tiles: usize,
    pub(super) chunk_rows: usize,
    pub(super) stash_in_grad: bool,
    /// Tiles whose dX̂ products (stash times centres) one batched GEMM makes: 1 where a
    /// tile's 16-bit centres are made again in scratch for each pass (they do not last).
    pub(super) dx_group: usize,
}

impl Plan {
    /// `stash_classes`: the classes a chunk's stash is sized for (C, or for one shard of a
    /// sharded head the largest shard's count, so that every shard cuts the rows alike).
    pub(super) fn new(
        shape: HeadShape,
        want_weight: bool,
        tiling: Tiling,
        stash_classes: usize,
    ) -> Plan {
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
            (tiling.dx_products_bytes / product_bytes)
                .min(tiling.dx_batch_tiles.unwrap_or(usize::MAX))
                .clamp(1, tiles.max(1))
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
    pub(super) fn copy_offset(&self, d: usize) -> usize {
        self.tile * d
    }

    /// Elements of one of the two spill slots (`stash_in_grad`): a chunk's stash of one
    /// tile, and its 16-bit centres `copy_offset` after it where the weight is staged.
    pub(super) fn spill_slot(&self, shape: HeadShape) -> usize {
        if shape.stages_weight() {
            2 * self.copy_offset(shape.d)
        } else {
            self.chunk_rows * self.tile
        }
    }
}

/// The scratch buffers, carved out of the workspace.
pub(super) struct Scratch {
    pub(super) xhat: u64,
    pub(super) norms: u64,
    pub(super) row_scale: u64,
    pub(super) w_inv: u64,
    pub(super) target_logit: u64,
    pub(super) target_dpsi: u64,
    /// per row: d psi / d norm, penalty, d penalty / d norm (MagFace)
    pub(super) norm_extra: u64,
    /// per row: the hard-negative rule (above, t, curricular)
    pub(super) rules: u64,
    /// per row (int32): the target class's closest centre (sub-centres)
    pub(super) target_sub: u64,
    pub(super) norm_term: u64,
    pub(super) lse: u64,
    pub(super) pz: u64,
    pub(super) tile_max: u64,
    pub(super) stats: u64,
    /// the half-precision path's float32 logits tile (the stash is 16-bit elsewhere)
    pub(super) ztile: u64,
    /// two 16-bit copies of a tile's centres (a float32 weight on the half-precision path,
    /// B > D): tile t's in copy t mod 2, so that tile t + 1's is made while t's is read
    pub(super) wtile: u64,
    /// per row of a chunk: [max, Σe, Σe·z, target logit] (a sharded head's are the caller's)
    pub(super) parts: u64,
    /// the dX̂ products of a group of tiles (a tile's stash times its centres, before its
    /// row factors; see `tile_rows`), tile t's in slot t mod `dx_group`
    pub(super) dxt: u64,
    /// the rows of X̂ times a tile's row factors (the dW GEMM's operand)
    pub(super) xs: u64,
    /// the stash of the tiles whose next tile cannot hold it (the last one or two)
    pub(super) spill: u64,
    pub(super) stash: u64,
}

impl Scratch {
    pub(super) fn carve(carver: &mut Carver, shape: HeadShape, plan: Plan) -> Scratch {
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

/// Workspace bytes of one shard's call (see [`super::ShardHooks::stash_classes`]).
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
