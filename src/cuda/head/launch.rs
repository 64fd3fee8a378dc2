//! The launch sequence of one call (see the module docs of `cuda::head`).

use super::tiling::{Plan, Scratch};
use super::{at, HeadBuffers, HeadShape, ShardHooks, Tiling};
use crate::cuda::device::{gemm, Arg, Carver, Device, RowMajorGemm};
use crate::head::HeadOptions;
use crate::margin::{Margin, Scale, PARAMS_LEN};
use crate::{Error, Result};

/// Threads per block of the per-row kernels.
const ROW_THREADS: usize = 256;
/// Threads per block of the one-thread-per-row kernels.
const FLAT_THREADS: usize = 128;
/// Centres per block of the weights pass and the projection (one warp each).
const WARP_ROWS_PER_BLOCK: usize = 8;
// The tile passes share launches (`logits_and_weights`, `between_tiles`): one block size.
const _: () = assert!(ROW_THREADS == 32 * WARP_ROWS_PER_BLOCK);

/// Queues one call, or one shard's (see [`super::margin_loss`] and
/// [`super::margin_loss_shard`]).
pub(super) fn fused(
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
        let spilled = |t: usize| {
            plan.stash_in_grad && (t + 1 >= plan.tiles || c - (t + 1) * plan.tile < plan.tile)
        };
        let park = |t: usize| {
            if !plan.stash_in_grad {
                at(s.stash, t * plan.tile * rows, sz)
            } else if !spilled(t) {
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
                        // (a spilled stash joins only spilled ones: where the scratch lies
                        // against dW must not change the launches)
                        while t + n < to
                            && tile_span(t + n).1 == width
                            && spilled(t + n) == spilled(t)
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
