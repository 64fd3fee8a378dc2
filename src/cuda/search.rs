//! Exact cosine search on a GPU: score tiles by cuBLAS, top-k by a kernel, merged on the host.
//!
//! Gallery rows live on the device as unit vectors in float32 or float16. Per tile of rows:
//! scores (Q × tile) = Q̂ Gᵀ, then `topk_tile` keeps, for each query and each run of
//! [`RUN`] columns, the best k merged with that run's list from the previous tiles. The host
//! merges each query's lists. A float16 gallery multiplies a float32 query split into two
//! float16 halves (hi + 2⁻¹² lo, see `split_half`): as exact as the float32 query, since
//! cuBLAS has no float32 × float16 product.

use super::device::{gemm, Arg, Carver, Device, Elem, RowMajorGemm};
use crate::Result;

/// Largest k the top-k kernel keeps (TOPK_MAX in kernels.cu).
pub const MAX_K: usize = 64;
/// Columns of a score tile one block scans.
pub const RUN: usize = 2048;
/// Threads of a top-k block (TOPK_THREADS in kernels.cu).
const TOPK_THREADS: usize = 128;
/// Most memory the score tile may take.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// Sizes of one search: Q queries against N rows of D, k best each.
#[derive(Clone, Copy, Debug)]
pub struct SearchShape {
    pub n: usize,
    pub d: usize,
    pub q: usize,
    pub k: usize,
    /// F32 or F16 rows.
    pub elem: Elem,
}

/// Tile width and run length (the tests use small ones).
#[derive(Clone, Copy, Debug)]
pub struct SearchTiling {
    pub run: usize,
    pub score_budget_bytes: usize,
}

impl Default for SearchTiling {
    fn default() -> Self {
        SearchTiling {
            run: RUN,
            score_budget_bytes: SCORE_BUDGET_BYTES,
        }
    }
}

/// How a search is cut: tiles of `tile` rows, each in `splits` runs of `run` columns.
#[derive(Clone, Copy, Debug)]
pub struct SearchPlan {
    pub tile: usize,
    pub run: usize,
    pub splits: usize,
}

impl SearchPlan {
    pub fn new(shape: SearchShape, tiling: SearchTiling) -> Self {
        let run = tiling.run.max(1);
        let fit = (tiling.score_budget_bytes / (shape.q.max(1) * 4) / run).max(1) * run;
        let tile = fit.min(shape.n.div_ceil(run) * run);
        SearchPlan {
            tile,
            run,
            splits: tile / run,
        }
    }

    /// Entries of each of `best_s` / `best_i`: k per (query, run).
    pub fn candidates(&self, shape: SearchShape) -> usize {
        shape.q * self.splits * shape.k
    }
}

/// Device addresses of one search (row-major, contiguous).
#[derive(Clone, Copy, Debug)]
pub struct SearchBuffers {
    /// (N, D) unit rows in the shape's element type.
    pub rows: u64,
    /// (Q, D) float32 unit queries.
    pub queries: u64,
    /// [`workspace_bytes`] bytes of scratch.
    pub workspace: u64,
    /// [`SearchPlan::candidates`] float32 scores, set to -inf by the caller before the call.
    pub best_s: u64,
    /// As many int64 row indices, set to -1 by the caller before the call.
    pub best_i: u64,
}

struct Scratch {
    scores: u64,
    q_hi: u64,
    q_lo: u64,
}

impl Scratch {
    fn carve(carver: &mut Carver, shape: SearchShape, plan: SearchPlan) -> Scratch {
        let halves = if shape.elem == Elem::F16 {
            shape.q * shape.d
        } else {
            0
        };
        Scratch {
            scores: carver.take(shape.q * plan.tile, 4),
            q_hi: carver.take(halves, 2),
            q_lo: carver.take(halves, 2),
        }
    }
}

/// Workspace bytes one search needs.
pub fn workspace_bytes(shape: SearchShape, tiling: SearchTiling) -> usize {
    let mut carver = Carver::new(0);
    Scratch::carve(&mut carver, shape, SearchPlan::new(shape, tiling));
    carver.bytes()
}

/// 2¹² (SPLIT_SCALE in kernels.cu): the low half of a split query is scaled up by this.
const SPLIT_SCALE: f64 = 4096.0;

/// Queues the search (see the module docs); the per-run lists land in `best_s` / `best_i`.
pub fn search(
    device: &dyn Device,
    shape: SearchShape,
    buf: &SearchBuffers,
    tiling: SearchTiling,
) -> Result<()> {
    let SearchShape { n, d, q, k, elem } = shape;
    if !(1..=MAX_K).contains(&k) {
        return Err(crate::Error::invalid(
            "k",
            format!("the GPU search keeps 1 to {MAX_K} per query, got {k}"),
        ));
    }
    let plan = SearchPlan::new(shape, tiling);
    let mut carver = Carver::new(buf.workspace);
    let s = Scratch::carve(&mut carver, shape, plan);
    let (q_first, q_second) = if elem == Elem::F16 {
        let count = q * d;
        device.launch(
            "split_half",
            count.div_ceil(256),
            256,
            &[
                Arg::Ptr(buf.queries),
                Arg::Ptr(s.q_hi),
                Arg::Ptr(s.q_lo),
                Arg::I64(count as i64),
            ],
        )?;
        (s.q_hi, Some(s.q_lo))
    } else {
        (buf.queries, None)
    };
    for lo in (0..n).step_by(plan.tile) {
        let width = plan.tile.min(n - lo);
        let product = |a: u64, alpha: f64, beta: f64| RowMajorGemm {
            elem,
            out: Elem::F32,
            tf32: false,
            trans_a: false,
            trans_b: true,
            m: q,
            n: width,
            k: d,
            alpha,
            a,
            lda: d,
            b: buf.rows + (lo * d * elem.size()) as u64,
            ldb: d,
            beta,
            c: s.scores,
            ldc: plan.tile,
        };
        gemm(device, product(q_first, 1.0, 0.0))?;
        if let Some(low) = q_second {
            gemm(device, product(low, 1.0 / SPLIT_SCALE, 1.0))?;
        }
        device.launch(
            "topk_tile",
            q * plan.splits,
            TOPK_THREADS,
            &[
                Arg::Ptr(s.scores),
                Arg::I32(q as i32),
                Arg::I32(plan.tile as i32),
                Arg::I32(plan.run as i32),
                Arg::I32(width as i32),
                Arg::I32(plan.splits as i32),
                Arg::I64(lo as i64),
                Arg::I32(k as i32),
                Arg::Ptr(buf.best_s),
                Arg::Ptr(buf.best_i),
            ],
        )?;
    }
    Ok(())
}

/// Each query's best `k_out` over its runs' lists (descending, ties to the lower row), as
/// (Q, k_out) row-major; rows -1 and scores -inf pad where fewer exist (`k_out` may exceed
/// the shape's k, which is at most N).
pub fn merge_runs(
    best_s: &[f32],
    best_i: &[i64],
    shape: SearchShape,
    plan: SearchPlan,
    k_out: usize,
) -> (Vec<f32>, Vec<i64>) {
    let per_query = plan.splits * shape.k;
    let mut scores = Vec::with_capacity(shape.q * k_out);
    let mut rows = Vec::with_capacity(shape.q * k_out);
    let mut pool: Vec<(f32, i64)> = Vec::with_capacity(per_query);
    for query in 0..shape.q {
        let span = query * per_query..(query + 1) * per_query;
        pool.clear();
        pool.extend(
            best_s[span.clone()]
                .iter()
                .zip(&best_i[span])
                .filter(|(_, &i)| i >= 0)
                .map(|(&s, &i)| (s, i)),
        );
        pool.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for r in 0..k_out {
            let (s, i) = pool.get(r).copied().unwrap_or((f32::NEG_INFINITY, -1));
            scores.push(s);
            rows.push(i);
        }
    }
    (scores, rows)
}
