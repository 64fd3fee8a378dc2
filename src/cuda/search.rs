//! Exact cosine search on a GPU: score tiles by cuBLAS, top-k by kernels, all on the device.
//!
//! Gallery rows live on the device in their storage type: float32, float16, bfloat16 (unit
//! vectors) or int8 codes with one float32 scale per row. Per tile of rows:
//! scores (Q × tile) = Q̂ Gᵀ, then `topk_tile` keeps, for each query and each run of
//! [`RUN`] columns, the best k merged with that run's list from the previous tiles (each
//! score read once). After the last tile `topk_merge` merges each query's run lists into its
//! final k, so only (Q, k) is copied back.
//!
//! Many queries take one of two exact routes. Rescored (the caller gives
//! [`SearchBuffers::unsure`]): one GEMM on tensor cores ranks the rows (float16 / bfloat16
//! rows against the query rounded to their type, float32 and decoded int8 rows as TF32),
//! the selection keeps [`rescored_candidates`] per query, and `rescore` recomputes those
//! exactly and keeps the best k; a query whose candidates could have missed a row (see
//! [`rescore_slack`]) is flagged, for the exact route or [`redo_unsure`] on the device. Exact (cuBLAS has no float32 ×
//! float16 product): a float16 gallery multiplies the float32 query split into two float16
//! halves (hi + 2⁻¹² lo, see `round_queries`), reading the rows twice; bfloat16 and int8 ones
//! decode chunks of rows to float32; float32 GEMMs without TF32.

use super::device::{gemm, Arg, Carver, Device, Elem, RowMajorGemm};
use crate::Result;

/// Largest k the register top-k kernels keep (TOPK_MAX in kernels.cu); above it the
/// shared-memory ones (`topk_tile_large`, `topk_merge_large`) run.
pub const SMALL_K: usize = 64;
/// Largest k the GPU search keeps (TOPK_LARGE_MAX in kernels.cu).
pub const MAX_K: usize = 1024;
/// Threads of a large-k block (LARGE_THREADS in kernels.cu).
const LARGE_THREADS: usize = 256;
/// Columns of a score tile one block scans.
pub const RUN: usize = 2048;
/// Threads of a top-k block (TOPK_THREADS in kernels.cu).
const TOPK_THREADS: usize = 128;
/// Threads of a `rescore` block (one block per query).
const RESCORE_THREADS: usize = 256;
/// Up to this many queries the scores come from `score_rows` (each stored row read once,
/// decoded in registers) instead of GEMMs (SCAN_QUERIES in kernels.cu).
pub const SCAN_QUERIES: usize = 16;
/// Warps per block of `score_rows`.
const SCAN_WARPS: usize = 8;
/// Most memory the score tile may take: with the decoded chunk, the candidate lists (a
/// rescored search's twice as long) and the copy's room for added rows, a search of 1024
/// queries over 1M rows stays within 256 MiB beyond the stored rows; the tile's GEMM
/// (1024 x 36864 x D at Q=1024) is still large.
pub const SCORE_BUDGET_BYTES: usize = 144 << 20;
/// Most memory a chunk of bfloat16 / int8 rows decoded to float32 for a GEMM may take.
pub const DECODE_BUDGET_BYTES: usize = 32 << 20;

/// How the gallery's rows are stored on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    F32,
    F16,
    Bf16,
    /// Codes in -127..=127, with one float32 scale per row at [`SearchBuffers::scales`].
    I8,
}

impl Stored {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            Stored::F32 => 4,
            Stored::F16 | Stored::Bf16 => 2,
            Stored::I8 => 1,
        }
    }

    /// The kernels' name suffix for this type.
    fn suffix(self) -> &'static str {
        match self {
            Stored::F32 => "f32",
            Stored::F16 => "f16",
            Stored::Bf16 => "bf16",
            Stored::I8 => "i8",
        }
    }
}

/// Sizes of one search: Q queries against N rows of D, k best each.
#[derive(Clone, Copy, Debug)]
pub struct SearchShape {
    pub n: usize,
    pub d: usize,
    pub q: usize,
    pub k: usize,
    pub stored: Stored,
}

/// Tile width and run length (the tests use small ones).
#[derive(Clone, Copy, Debug)]
pub struct SearchTiling {
    pub run: usize,
    pub score_budget_bytes: usize,
    /// Above [`SMALL_K`], runs are at least this many times k long: each (query, run) keeps
    /// a list of k, so longer runs keep the lists a small part of the scores they select
    /// from (and most of a run's scores fail the list's k-th after its first k).
    pub run_per_k: usize,
    /// Most bytes of a chunk of rows decoded to float32 (bfloat16 / int8, many queries).
    pub decode_budget_bytes: usize,
}

impl Default for SearchTiling {
    fn default() -> Self {
        SearchTiling {
            run: RUN,
            score_budget_bytes: SCORE_BUDGET_BYTES,
            run_per_k: 16,
            decode_budget_bytes: DECODE_BUDGET_BYTES,
        }
    }
}

/// How a search is cut: tiles of `tile` rows, each in `splits` runs of `run` columns.
#[derive(Clone, Copy, Debug)]
pub struct SearchPlan {
    pub tile: usize,
    pub run: usize,
    pub splits: usize,
    /// Rows of one decoded chunk (bfloat16 / int8 with many queries).
    pub chunk: usize,
}

impl SearchPlan {
    pub fn new(shape: SearchShape, tiling: SearchTiling) -> Self {
        let run = match shape.k {
            k if k > SMALL_K => tiling.run.max(tiling.run_per_k * k),
            _ => tiling.run,
        }
        .max(1);
        let fit = (tiling.score_budget_bytes / (shape.q.max(1) * 4) / run).max(1) * run;
        let tile = fit.min(shape.n.div_ceil(run) * run);
        let chunk = (tiling.decode_budget_bytes / (shape.d.max(1) * 4)).clamp(1, tile);
        SearchPlan {
            tile,
            run,
            splits: tile / run,
            chunk,
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
    /// (N, D) rows in the shape's storage type.
    pub rows: u64,
    /// (N,) float32 scales of int8 rows; 0 for the other types.
    pub scales: u64,
    /// (Q, D) float32 unit queries.
    pub queries: u64,
    /// [`workspace_bytes`] bytes of scratch.
    pub workspace: u64,
    /// (Q, k) float32 scores out, best first, -inf where fewer than k rows exist.
    pub out_s: u64,
    /// (Q, k) int64 row indices out, -1 where fewer than k rows exist.
    pub out_i: u64,
    /// ceil(N / 32) u32 words, bit r set where row r may be returned (an allow/deny
    /// filter); 0 for no filter.
    pub allowed: u64,
    /// (Q,) int32 set to 1 for the queries a rescored search could not vouch for (their
    /// results must come from an exact search); 0 asks for the exact route. Used only where
    /// [`rescores`] holds.
    pub unsure: u64,
}

/// Candidates beyond k a rescored search keeps at least: the rows whose GEMM scores sit
/// just below the k-th exact one (within [`rescore_slack`]) must all be among them.
const RESCORE_PAD: usize = 32;

/// Candidates a rescored search keeps per query for k.
pub fn rescored_candidates(k: usize) -> usize {
    k + k.max(RESCORE_PAD)
}

/// Whether a search of `shape` is rescored when the caller gives [`SearchBuffers::unsure`]:
/// many queries, with the candidates within [`MAX_K`] and fewer than the rows (a small
/// gallery takes the exact route), and rows numbered in 32 bits (as the large selection,
/// which k + max(k, 32) candidates may need, and [`redo_unsure`] keep them).
pub fn rescores(shape: SearchShape) -> bool {
    let kc = rescored_candidates(shape.k);
    !scans(shape) && kc <= MAX_K && kc < shape.n && shape.n <= i32::MAX as usize
}

/// Whether many queries decode chunks of rows to float32 before the GEMM: cuBLAS has no
/// float32 x bfloat16 or float32 x int8 product, and int8 none that keeps each row's scale;
/// a rescored search multiplies bfloat16 rows as they are.
fn decodes(stored: Stored, rescored: bool) -> bool {
    match stored {
        Stored::Bf16 => !rescored,
        Stored::I8 => true,
        _ => false,
    }
}

/// How the GEMMs of many queries read the float32 queries.
#[derive(Clone, Copy, PartialEq)]
enum QueryOperand {
    /// As they are: float32 rows (TF32 where rescored), decoded chunks, or no GEMM at all
    /// (few queries, `score_rows`).
    AsGiven,
    /// Rounded to the rows' 16-bit type: a rescored search of float16 / bfloat16 rows.
    Rounded,
    /// Split into two float16 halves, hi + 2⁻¹² lo: the exact route over float16 rows.
    Split,
}

fn query_operand(shape: SearchShape, rescored: bool) -> QueryOperand {
    match (shape.stored, rescored) {
        _ if scans(shape) => QueryOperand::AsGiven,
        (Stored::F16 | Stored::Bf16, true) => QueryOperand::Rounded,
        (Stored::F16, false) => QueryOperand::Split,
        _ => QueryOperand::AsGiven,
    }
}

/// The type of the score tiles: float16 where a rescored search multiplies float16 rows
/// (its GEMM's float32 sums rounded once more, which [`rescore_slack`] counts: the
/// selection only ranks candidates, and half the bytes per score halve the traffic of
/// writing and selecting from the tiles), else float32.
fn score_elem(stored: Stored, rescored: bool) -> Elem {
    if rescored && stored == Stored::F16 {
        Elem::F16
    } else {
        Elem::F32
    }
}

/// A bound on |GEMM score - rescored score| of any row in a rescored search of `d`-long
/// unit queries q over rows g stored as `stored` (every row was a unit vector before it was
/// stored). The GEMM reads q' and g': the query rounded to float16 / bfloat16 and the row as
/// stored, or both rounded to TF32 for float32 and (decoded) int8 rows. Then
/// |q'·g' - q·g| <= ||q' - q|| ||g'|| + ||q|| ||g' - g||, with, per element:
/// - float16: |q'_j - q_j| <= 2^-11 |q_j| + 2^-25 (subnormal), so ||q' - q|| is at most
///   2^-11 ||q|| plus 2^-25 sqrt(d); bfloat16: 2^-8 ||q||; TF32 (10 stored bits, rounded or
///   truncated): 2^-10 of the norm for q and for g, and 2^-23 more for int8's code * scale
///   in float32;
/// - ||q|| <= 1 + d 2^-24 (a float32 normalisation), and the rows' norms: float32 the same,
///   float16 and bfloat16 that times 1 + u (2^-11 + 2^-25 sqrt(d), 2^-8), int8 plus
///   sqrt(d) / 254 (each code within half a step of max |g_j| / 127 <= 1 / 127);
/// - each float32 sum of d products (the GEMM's, in whatever order and rounding its tensor
///   cores use, and the rescore's) is within d 2^-23 of sum |a_j b_j| <= ||a|| ||b|| of its
///   exact value, and int8's product by the scale adds 2^-23 of the score;
/// - float16 rows' GEMM scores are stored in float16 ([`score_elem`]): |score| < 2, so
///   rounding moves one by at most half its spacing below 2, 2^-11. Rounding is monotone,
///   so a row left out still scores at most the last candidate's rounded score plus this.
///
/// The kernel compares in float64, so nothing is added for that comparison.
pub fn rescore_slack(d: usize, stored: Stored) -> f64 {
    let (d, ulp) = (d as f64, |e: i32| 2f64.powi(e));
    let unit = 1.0 + d * ulp(-24);
    let f16 = ulp(-11) + ulp(-25) * d.sqrt();
    // relative errors of the GEMM's query and row, and the stored rows' largest norm
    let (query_err, row_err, row_norm) = match stored {
        Stored::F16 => (f16, 0.0, unit * (1.0 + f16)),
        Stored::Bf16 => (ulp(-8), 0.0, unit * (1.0 + ulp(-8))),
        Stored::F32 => (ulp(-10), ulp(-10), unit),
        Stored::I8 => (ulp(-10), ulp(-10) + ulp(-23), unit + d.sqrt() / 254.0),
    };
    let (q_err, g_err) = (query_err * unit, row_err * row_norm);
    let product = q_err * (row_norm + g_err) + unit * g_err;
    let gemm_sum = d * ulp(-23) * (unit + q_err) * (row_norm + g_err);
    let rescore_sum = (d + 1.0) * ulp(-23) * unit * row_norm;
    let stored_score = if score_elem(stored, true) == Elem::F16 {
        ulp(-11)
    } else {
        0.0
    };
    product + gemm_sum + rescore_sum + stored_score
}

struct Scratch {
    scores: u64,
    /// The split float16 query (hi, lo) of the exact route; a rescored search's rounded
    /// query in `q_hi`.
    q_hi: u64,
    q_lo: u64,
    /// A chunk of decoded rows (bfloat16 / int8 with many queries).
    decoded: u64,
    /// [`SearchPlan::candidates`] running scores and rows: k per (query, run).
    best_s: u64,
    best_i: u64,
    /// (Q, kc) candidates a rescored search rescores.
    cand_s: u64,
    cand_i: u64,
}

impl Scratch {
    /// `shape.k` is the selection's k (the candidates of a rescored search).
    fn carve(carver: &mut Carver, shape: SearchShape, plan: SearchPlan, rescored: bool) -> Scratch {
        let many = !scans(shape);
        let (hi, lo) = match query_operand(shape, rescored) {
            QueryOperand::AsGiven => (0, 0),
            QueryOperand::Rounded => (shape.q * shape.d, 0),
            QueryOperand::Split => (shape.q * shape.d, shape.q * shape.d),
        };
        let decoded = if decodes(shape.stored, rescored) && many {
            plan.chunk * shape.d
        } else {
            0
        };
        let candidates = if rescored { shape.q * shape.k } else { 0 };
        Scratch {
            scores: carver.take(
                shape.q * plan.tile,
                score_elem(shape.stored, rescored).size(),
            ),
            q_hi: carver.take(hi, 2),
            q_lo: carver.take(lo, 2),
            decoded: carver.take(decoded, 4),
            best_s: carver.take(plan.candidates(shape), 4),
            best_i: carver.take(plan.candidates(shape), 8),
            cand_s: carver.take(candidates, 4),
            cand_i: carver.take(candidates, 8),
        }
    }
}

/// Whether the search scores by `score_rows` (few queries) rather than GEMMs.
fn scans(shape: SearchShape) -> bool {
    shape.q <= SCAN_QUERIES
}

/// Blocks of `score_rows` at most: enough warps in flight to keep the memory busy on any
/// current GPU; each warp then takes every (blocks × warps)-th row.
const SCAN_BLOCKS: usize = 4096;

/// The shape the selection runs on: k widened to the candidates when `rescored`.
fn selection(shape: SearchShape, rescored: bool) -> SearchShape {
    let k = if rescored {
        rescored_candidates(shape.k)
    } else {
        shape.k
    };
    SearchShape { k, ..shape }
}

/// Workspace bytes one search needs; `rescored` as [`rescores`] says when the caller gives
/// [`SearchBuffers::unsure`], false otherwise.
pub fn workspace_bytes(shape: SearchShape, tiling: SearchTiling, rescored: bool) -> usize {
    let select = selection(shape, rescored);
    let mut carver = Carver::new(0);
    Scratch::carve(
        &mut carver,
        select,
        SearchPlan::new(select, tiling),
        rescored,
    );
    carver.bytes()
}

/// 2¹² (SPLIT_SCALE in kernels.cu): the low half of a split query is scaled up by this.
const SPLIT_SCALE: f64 = 4096.0;

/// Queues the search (see the module docs); each query's best k lands in `out_s` / `out_i`.
pub fn search(
    device: &dyn Device,
    shape: SearchShape,
    buf: &SearchBuffers,
    tiling: SearchTiling,
) -> Result<()> {
    let SearchShape { n, d, q, k, stored } = shape;
    if !(1..=MAX_K).contains(&k) {
        return Err(crate::Error::invalid(
            "k",
            format!("the GPU search keeps 1 to {MAX_K} per query, got {k}"),
        ));
    }
    let rescored = buf.unsure != 0 && rescores(shape);
    // the selection keeps kc per query: the k results, or a rescored search's candidates
    let select = selection(shape, rescored);
    let kc = select.k;
    let large = kc > SMALL_K;
    if large && n > i32::MAX as usize {
        // the large-k kernels keep row numbers in 32 bits
        return Err(crate::Error::invalid(
            "k",
            format!("above {SMALL_K} needs a gallery of fewer than 2^31 rows on the GPU"),
        ));
    }
    // blocks of the tile kernel: one per (query, run), or (small k) one warp per pair
    let (tile_kernel, merge_kernel, select_threads, pairs_per_block) = if large {
        ("topk_tile_large", "topk_merge_large", LARGE_THREADS, 1)
    } else {
        ("topk_tile", "topk_merge", TOPK_THREADS, TOPK_THREADS / 32)
    };
    let scores = score_elem(stored, rescored);
    let tile_kernel = match scores {
        Elem::F16 => format!("{tile_kernel}_f16"),
        _ => tile_kernel.to_string(),
    };
    let plan = SearchPlan::new(select, tiling);
    let mut carver = Carver::new(buf.workspace);
    let s = Scratch::carve(&mut carver, select, plan, rescored);
    if large {
        // (the small-k selection starts its lists in the first tile itself: one launch less)
        let cands = plan.candidates(select);
        device.launch(
            "topk_reset",
            cands.div_ceil(256),
            256,
            &[
                Arg::Ptr(s.best_s),
                Arg::Ptr(s.best_i),
                Arg::I64(cands as i64),
            ],
        )?;
    }
    let scan = scans(shape);
    let count = q * d;
    let operand = query_operand(shape, rescored);
    let split = operand == QueryOperand::Split;
    if operand != QueryOperand::AsGiven {
        device.launch(
            &format!("round_queries_{}", stored.suffix()),
            count.div_ceil(256),
            256,
            &[
                Arg::Ptr(buf.queries),
                Arg::Ptr(s.q_hi),
                Arg::Ptr(if split { s.q_lo } else { 0 }),
                Arg::I64(count as i64),
            ],
        )?;
    }
    let (q_first, q_second) = match operand {
        QueryOperand::AsGiven => (buf.queries, None),
        QueryOperand::Rounded => (s.q_hi, None),
        QueryOperand::Split => (s.q_hi, Some(s.q_lo)),
    };
    for lo in (0..n).step_by(plan.tile) {
        let width = plan.tile.min(n - lo);
        // scores of columns first..first + count of the tile against rows at `rows`
        // float32 products run as TF32 only where the candidates are rescored
        let product = |elem: Elem, rows: u64, first: usize, count: usize| {
            move |a: u64, alpha: f64, beta: f64| RowMajorGemm {
                elem,
                out: scores,
                tf32: rescored && elem == Elem::F32,
                trans_a: false,
                trans_b: true,
                m: q,
                n: count,
                k: d,
                alpha,
                a,
                lda: d,
                b: rows,
                ldb: d,
                beta,
                c: s.scores + (first * scores.size()) as u64,
                ldc: plan.tile,
                batch: 1,
                stride_a: 0,
                stride_b: 0,
                stride_c: 0,
            }
        };
        if scan {
            device.launch(
                &format!("score_rows_{}", stored.suffix()),
                width.div_ceil(SCAN_WARPS).min(SCAN_BLOCKS),
                SCAN_WARPS * 32,
                &[
                    Arg::Ptr(buf.rows),
                    Arg::Ptr(buf.scales),
                    Arg::Ptr(buf.queries),
                    Arg::I32(q as i32),
                    Arg::I32(d as i32),
                    Arg::I64(lo as i64),
                    Arg::I32(width as i32),
                    Arg::Ptr(s.scores),
                    Arg::I32(plan.tile as i32),
                ],
            )?;
        } else if decodes(stored, rescored) {
            for first in (0..width).step_by(plan.chunk) {
                let count = plan.chunk.min(width - first);
                device.launch(
                    &format!("decode_rows_{}", stored.suffix()),
                    (count * d).div_ceil(256).min(SCAN_BLOCKS * 8),
                    256,
                    &[
                        Arg::Ptr(buf.rows),
                        Arg::Ptr(buf.scales),
                        Arg::I64((lo + first) as i64),
                        Arg::I64(count as i64),
                        Arg::I32(d as i32),
                        Arg::Ptr(s.decoded),
                    ],
                )?;
                gemm(
                    device,
                    product(Elem::F32, s.decoded, first, count)(buf.queries, 1.0, 0.0),
                )?;
            }
        } else {
            let elem = match stored {
                Stored::F16 => Elem::F16,
                Stored::Bf16 => Elem::Bf16,
                _ => Elem::F32,
            };
            let rows = buf.rows + (lo * d * stored.size()) as u64;
            let tile_product = product(elem, rows, 0, width);
            gemm(device, tile_product(q_first, 1.0, 0.0))?;
            if let Some(low) = q_second {
                gemm(device, tile_product(low, 1.0 / SPLIT_SCALE, 1.0))?;
            }
        }
        device.launch(
            &tile_kernel,
            (q * plan.splits).div_ceil(pairs_per_block),
            select_threads,
            &[
                Arg::Ptr(s.scores),
                Arg::I32(q as i32),
                Arg::I32(plan.tile as i32),
                Arg::I32(plan.run as i32),
                Arg::I32(width as i32),
                Arg::I32(plan.splits as i32),
                Arg::I64(lo as i64),
                Arg::I32(kc as i32),
                Arg::Ptr(s.best_s),
                Arg::Ptr(s.best_i),
                Arg::Ptr(buf.allowed),
            ],
        )?;
    }
    let lists = [Arg::Ptr(s.best_s), Arg::Ptr(s.best_i)];
    let sizes = [Arg::I32(plan.splits as i32), Arg::I32(kc as i32)];
    // a rescored search merges into its candidates, which `rescore` turns into the results
    let outputs = if rescored {
        [Arg::Ptr(s.cand_s), Arg::Ptr(s.cand_i)]
    } else {
        [Arg::Ptr(buf.out_s), Arg::Ptr(buf.out_i)]
    };
    let args: Vec<Arg> = [&lists[..], &sizes, &outputs].concat();
    device.launch(merge_kernel, q, select_threads, &args)?;
    if rescored {
        device.launch(
            &format!("rescore_{}", stored.suffix()),
            q,
            RESCORE_THREADS,
            &[
                Arg::Ptr(buf.rows),
                Arg::Ptr(buf.scales),
                Arg::Ptr(buf.queries),
                Arg::I32(d as i32),
                Arg::Ptr(s.cand_s),
                Arg::Ptr(s.cand_i),
                Arg::I32(kc as i32),
                Arg::I32(k as i32),
                Arg::F64(rescore_slack(d, stored)),
                Arg::Ptr(buf.out_s),
                Arg::Ptr(buf.out_i),
                Arg::Ptr(buf.unsure),
            ],
        )?;
    }
    Ok(())
}

/// Searches again, exactly and on the device, the queries a rescored search flagged in
/// [`SearchBuffers::unsure`], writing their results over the rescored ones: for callers that
/// cannot read the flags (queries on the device, whose search must not wait for it). One
/// block per query scans every row; the blocks of sure queries return at once. A no-op
/// unless the search was rescored.
pub fn redo_unsure(device: &dyn Device, shape: SearchShape, buf: &SearchBuffers) -> Result<()> {
    if buf.unsure == 0 || !rescores(shape) {
        return Ok(());
    }
    device.launch(
        &format!("redo_unsure_{}", shape.stored.suffix()),
        shape.q,
        LARGE_THREADS,
        &[
            Arg::Ptr(buf.rows),
            Arg::Ptr(buf.scales),
            Arg::Ptr(buf.queries),
            Arg::I32(shape.d as i32),
            Arg::I64(shape.n as i64),
            Arg::I32(shape.k as i32),
            Arg::Ptr(buf.allowed),
            Arg::Ptr(buf.unsure),
            Arg::Ptr(buf.out_s),
            Arg::Ptr(buf.out_i),
        ],
    )
}

/// (Q, `k_out`) row-major from the (Q, `shape.k`) results: `k_out` may exceed the shape's k
/// (which is at most N), and the columns beyond are padded with row -1 and score -inf.
pub fn padded(
    scores: &[f32],
    rows: &[i64],
    shape: SearchShape,
    k_out: usize,
) -> (Vec<f32>, Vec<i64>) {
    let k = shape.k;
    let mut out_s = vec![f32::NEG_INFINITY; shape.q * k_out];
    let mut out_i = vec![-1i64; shape.q * k_out];
    for query in 0..shape.q {
        let (from, to) = (
            query * k..(query + 1) * k,
            query * k_out..query * k_out + k.min(k_out),
        );
        let kept = to.len();
        out_s[to.clone()].copy_from_slice(&scores[from.clone()][..kept]);
        out_i[to].copy_from_slice(&rows[from][..kept]);
    }
    (out_s, out_i)
}
