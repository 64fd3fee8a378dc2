//! The search on the emulator against a float64 brute force.

use super::*;

/// Unit rows from the noise generator, with rows 7 and 11 equal to row 3 (exact ties).
fn unit_rows(seed: u64, n: usize, d: usize) -> Array2<f32> {
    let mut m = matrix::<f64>(seed, n, d);
    for r in [7, 11] {
        if r < n {
            let copy = m.row(3).to_owned();
            m.row_mut(r).assign(&copy);
        }
    }
    for mut row in m.rows_mut() {
        let norm = row.dot(&row).sqrt();
        row.mapv_inplace(|v| v / norm);
    }
    m.mapv(|v| v as f32)
}

/// `rows` as the device stores them: the bytes, int8 scales, and each value as stored.
struct StoredRows {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    values: Array2<f64>,
}

fn store(rows: &Array2<f32>, stored: Stored) -> StoredRows {
    let mut bytes = Vec::new();
    let mut scales = Vec::new();
    let mut values = rows.mapv(|v| v as f64);
    for (r, row) in rows.rows().into_iter().enumerate() {
        match stored {
            Stored::F32 => bytes.extend(row.iter().flat_map(|v| v.to_le_bytes())),
            Stored::F16 => {
                for (c, &v) in row.iter().enumerate() {
                    let h = half::f16::from_f32(v);
                    bytes.extend(h.to_bits().to_le_bytes());
                    values[[r, c]] = h.to_f64();
                }
            }
            Stored::Bf16 => {
                for (c, &v) in row.iter().enumerate() {
                    let h = half::bf16::from_f32(v);
                    bytes.extend(h.to_bits().to_le_bytes());
                    values[[r, c]] = h.to_f64();
                }
            }
            Stored::I8 => {
                let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                scales.push(scale);
                for (c, &v) in row.iter().enumerate() {
                    let code = (v / scale).round().clamp(-127.0, 127.0) as i8;
                    bytes.push(code as u8);
                    values[[r, c]] = code as f64 * scale as f64;
                }
            }
        }
    }
    StoredRows {
        bytes,
        scales,
        values,
    }
}

const ALL_STORED: [Stored; 4] = [Stored::F32, Stored::F16, Stored::Bf16, Stored::I8];

/// Emulated GPU search of `queries` in `rows` stored as `stored`.
fn emulate_search(
    rows: &Array2<f32>,
    queries: &Array2<f32>,
    k: usize,
    stored: Stored,
    tiling: SearchTiling,
) -> (Vec<f32>, Vec<i64>) {
    let (scores, ids, _) = emulate_any_search(rows, queries, k, stored, tiling, None, Route::Exact);
    (scores, ids)
}

/// How [`emulate_any_search`] searches.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    Exact,
    /// Rescored where [`search::rescores`] holds.
    Rescored,
    /// Rescored, then the results of the unsure queries spoiled and searched again by
    /// [`search::redo_unsure`] (as a search of device queries does).
    Redone,
}

/// [`emulate_search`] by `route` over the rows whose bit is set in `allowed` (one bit per
/// row; None: every row): also each query's unsure flag (all 0 on the exact route).
fn emulate_any_search(
    rows: &Array2<f32>,
    queries: &Array2<f32>,
    k: usize,
    stored: Stored,
    tiling: SearchTiling,
    allowed: Option<&[u32]>,
    route: Route,
) -> (Vec<f32>, Vec<i64>, Vec<i32>) {
    let ((n, d), q) = (rows.dim(), queries.nrows());
    let shape = SearchShape { n, d, q, k, stored };
    let kept = SearchShape {
        k: k.min(n),
        ..shape
    };
    let device_rows = store(rows, stored);
    let rescored = route != Route::Exact && search::rescores(kept);
    let bytes = search::workspace_bytes(kept, tiling, rescored);
    // garbage in the outputs and the workspace: the search must set every entry itself (in
    // the running lists, what reads as full lists of rows scoring 3.4e38, which nothing
    // beats: a selection that took them for earlier tiles' would find nothing)
    let mut workspace = vec![0x7f7f_7f7f_7f7f_7f7f_u64; bytes / 8 + 1];
    let mut unsure = vec![7i32; q];
    let mut out_s = vec![f32::NAN; q * kept.k];
    let mut out_i = vec![-7i64; q * kept.k];
    let buffers = SearchBuffers {
        rows: device_rows.bytes.as_ptr() as u64,
        scales: if stored == Stored::I8 {
            device_rows.scales.as_ptr() as u64
        } else {
            0
        },
        queries: queries.as_ptr() as u64,
        workspace: workspace.as_mut_ptr() as u64,
        out_s: out_s.as_mut_ptr() as u64,
        out_i: out_i.as_mut_ptr() as u64,
        allowed: allowed.map_or(0, |m| m.as_ptr() as u64),
        unsure: if rescored {
            unsure.as_mut_ptr() as u64
        } else {
            0
        },
    };
    search::search(Emulator::get(), kept, &buffers, tiling).unwrap();
    if route == Route::Redone {
        for (query, _) in unsure.iter().enumerate().filter(|(_, &u)| u != 0) {
            out_s[query * kept.k..(query + 1) * kept.k].fill(f32::NAN);
            out_i[query * kept.k..(query + 1) * kept.k].fill(-7);
        }
        search::redo_unsure(Emulator::get(), kept, &buffers).unwrap();
    }
    let (scores, ids) = search::padded(&out_s, &out_i, kept, k);
    if !rescored {
        unsure.fill(0);
    }
    (scores, ids, unsure)
}

/// Exact top-k in f64 of the rows as stored.
fn brute_force(
    rows: &Array2<f32>,
    queries: &Array2<f32>,
    k: usize,
    stored: Stored,
) -> Vec<Vec<(f64, i64)>> {
    filtered_brute_force(rows, queries, k, stored, None)
}

/// Whether bit `row` of `mask` is set.
fn bit(mask: &[u32], row: usize) -> bool {
    mask[row / 32] >> (row % 32) & 1 == 1
}

/// [`brute_force`] over the rows whose bit is set in `allowed`.
fn filtered_brute_force(
    rows: &Array2<f32>,
    queries: &Array2<f32>,
    k: usize,
    stored: Stored,
    allowed: Option<&[u32]>,
) -> Vec<Vec<(f64, i64)>> {
    let values = store(rows, stored).values;
    queries
        .rows()
        .into_iter()
        .map(|qr| {
            let mut all: Vec<(f64, i64)> = values
                .rows()
                .into_iter()
                .enumerate()
                .filter(|&(i, _)| allowed.is_none_or(|m| bit(m, i)))
                .map(|(i, r)| {
                    let s = r.iter().zip(qr).map(|(&a, &b)| a * b as f64).sum();
                    (s, i as i64)
                })
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            all.truncate(k);
            all
        })
        .collect()
}

#[test]
fn search_equals_brute_force_across_tiles_runs_and_dtypes() {
    let rows = unit_rows(21, 300, 16);
    let queries = unit_rows(22, 5, 16);
    // runs of 32 columns, tiles of 64 rows: 5 tiles, the last one short (44 rows)
    let tiling = SearchTiling {
        run: 32,
        score_budget_bytes: 5 * 4 * 64,
        ..SearchTiling::default()
    };
    let mut with_ties = queries.clone();
    with_ties.row_mut(4).assign(&rows.row(3)); // rows 3, 7, 11 tie at the top
    for stored in ALL_STORED {
        for k in [1, 7, 64] {
            let (scores, ids) = emulate_search(&rows, &with_ties, k, stored, tiling);
            let want = brute_force(&rows, &with_ties, k, stored);
            for (q, expected) in want.iter().enumerate() {
                for (r, &(s, i)) in expected.iter().enumerate() {
                    let at = q * k + r;
                    assert_eq!(ids[at], i, "{stored:?} k={k} query {q} rank {r}");
                    assert!(
                        (scores[at] as f64 - s).abs() < 2e-6,
                        "{} vs {s}",
                        scores[at]
                    );
                }
            }
            assert_eq!(&ids[4 * k..4 * k + 3.min(k)], &[3, 7, 11][..3.min(k)]);
        }
    }
}

#[test]
fn search_pads_when_k_exceeds_the_gallery() {
    let rows = unit_rows(23, 5, 8);
    let queries = unit_rows(24, 2, 8);
    let (scores, ids) = emulate_search(&rows, &queries, 9, Stored::F32, SearchTiling::default());
    for q in 0..2 {
        let mut found: Vec<i64> = ids[q * 9..q * 9 + 5].to_vec();
        found.sort();
        assert_eq!(found, vec![0, 1, 2, 3, 4]);
        assert_eq!(&ids[q * 9 + 5..(q + 1) * 9], &[-1; 4]);
        assert!(scores[q * 9 + 5..(q + 1) * 9]
            .iter()
            .all(|s| *s == f32::NEG_INFINITY));
    }
}

#[test]
fn the_device_merge_takes_ties_across_many_runs_to_the_lower_row() {
    // runs of 4 columns in tiles of 560 rows: 140 run lists per query, more than the merge's
    // 128 threads, so a thread merges several; rows repeat every 50, so every top score is
    // tied across runs and tiles and only the row order breaks the ties
    let base = unit_rows(25, 50, 8);
    let rows = Array2::from_shape_fn((600, 8), |(r, c)| base[[r % 50, c]]);
    let queries = unit_rows(26, 2, 8);
    let tiling = SearchTiling {
        run: 4,
        score_budget_bytes: 2 * 4 * 560,
        ..SearchTiling::default()
    };
    for stored in [Stored::F32, Stored::F16] {
        for k in [1, 13] {
            assert_ranks_exactly(&rows, &queries, k, stored, tiling, "");
        }
    }
}

/// The emulated search's ids equal the brute force's rank by rank (ties to the lower row),
/// and its scores are within 2e-6.
fn assert_ranks_exactly(
    rows: &Array2<f32>,
    queries: &Array2<f32>,
    k: usize,
    stored: Stored,
    tiling: SearchTiling,
    what: &str,
) {
    let (scores, ids) = emulate_search(rows, queries, k, stored, tiling);
    let want = brute_force(rows, queries, k, stored);
    for (q, expected) in want.iter().enumerate() {
        let got: Vec<i64> = ids[q * k..(q + 1) * k].to_vec();
        let wanted: Vec<i64> = expected.iter().map(|&(_, i)| i).collect();
        assert_eq!(got, wanted, "{what}{stored:?} k={k} query {q}");
        for (r, &(s, _)) in expected.iter().enumerate() {
            assert!((scores[q * k + r] as f64 - s).abs() < 2e-6);
        }
    }
}

#[test]
fn a_full_running_list_takes_newcomers_tied_with_its_entries_after_them() {
    // Tiles of 64 rows, each one run: a query's list fills in the first tile and is its
    // result (no merge of runs behind it). Rows repeat every 50 or every 384 (six tiles):
    // later tiles bring copies of rows already in the list, tied with them and worse by
    // row number, beside rows it has not seen (every 384: none of tiles 1 to 5 is a copy,
    // and their best go anywhere in a list of 40, through both of a lane's entries). The
    // newcomers are inserted into the full list when few, merged in rounds when many.
    let queries = unit_rows(42, 3, 8);
    let tiling = SearchTiling {
        run: 64,
        score_budget_bytes: 3 * 4 * 64,
        ..SearchTiling::default()
    };
    for period in [50, 384] {
        let base = unit_rows(41, period, 8);
        let rows = Array2::from_shape_fn((1000, 8), |(r, c)| base[[r % period, c]]);
        for stored in [Stored::F32, Stored::F16] {
            for k in [5, 40] {
                let what = format!("every {period} ");
                assert_ranks_exactly(&rows, &queries, k, stored, tiling, &what);
            }
        }
    }
}

#[test]
fn many_queries_score_by_gemm_and_equal_brute_force() {
    // more than SCAN_QUERIES: the GEMM path (a float16 gallery's query split in two halves).
    // bfloat16 and int8 rows are decoded to float32 a pack at a time where rows are whole
    // 16-byte packs (d = 16: one or two a row; 48: three or six), else one by one (d = 20)
    for d in [16, 20, 48] {
        let rows = unit_rows(27, 200, d);
        let mut queries = unit_rows(28, search::SCAN_QUERIES + 2, d);
        queries.row_mut(0).assign(&rows.row(3)); // rows 3, 7, 11 tie at the top
        let tiling = SearchTiling {
            run: 32,
            score_budget_bytes: queries.nrows() * 4 * 128,
            // bfloat16 / int8 rows decoded 48 at a time: three chunks a tile, the last short
            decode_budget_bytes: 48 * d * 4,
            ..SearchTiling::default()
        };
        for stored in ALL_STORED {
            let k = 6;
            let (scores, ids) = emulate_search(&rows, &queries, k, stored, tiling);
            let want = brute_force(&rows, &queries, k, stored);
            for (q, expected) in want.iter().enumerate() {
                for (r, &(s, i)) in expected.iter().enumerate() {
                    assert_eq!(ids[q * k + r], i, "{stored:?} d={d} query {q} rank {r}");
                    assert!((scores[q * k + r] as f64 - s).abs() < 2e-6);
                }
            }
            assert_eq!(&ids[..3], &[3, 7, 11]);
        }
    }
}

#[test]
fn the_few_query_scan_reads_long_rows_in_whole_and_partial_steps() {
    // score_rows gives a row as few lanes as hold it in four 16-byte packs each (a warp
    // scores 32 / lanes rows at once) and loads a lane's packs before using any: at d = 272
    // a row takes 32, 16 or 8 lanes (float32, 16-bit, int8), most of them without a later
    // pack; at d = 528 32, 32 or 16, float32 in a second step. (At d = 16 elsewhere: one
    // lane a row.) Entries are multiples of 1/64 up to 1/8, so that float32 sums are exact
    // (int8: but for the scale's one rounding) and ranks are the brute force's.
    for d in [272, 528] {
        let grid = |seed, n| matrix::<f64>(seed, n, d).mapv(|v| ((v * 8.0).round() / 64.0) as f32);
        let (rows, queries) = (grid(43, 300), grid(44, 3));
        for stored in ALL_STORED {
            let k = 9;
            let got = emulate_search(&rows, &queries, k, stored, SearchTiling::default());
            let all = brute_force(&rows, &queries, rows.nrows(), stored);
            assert_matches(&got, &all, k, &format!("d={d} {stored:?}"));
        }
    }
}

/// The emulated search equals the brute force (`all`: every allowed row, ranked): at each
/// rank a row whose exact score is the expected one (rows whose float64 scores are within
/// float32 rounding of each other may trade places; exact ties keep the row order, which
/// the callers check), each row once, scores within float32 rounding, and -1 / -inf past
/// the rows there are.
fn assert_matches(
    (scores, ids): &(Vec<f32>, Vec<i64>),
    all: &[Vec<(f64, i64)>],
    k: usize,
    case: &str,
) {
    for (q, ranked) in all.iter().enumerate() {
        let exact: std::collections::HashMap<i64, f64> =
            ranked.iter().map(|&(s, i)| (i, s)).collect();
        let found = ranked.len().min(k);
        let got = &ids[q * k..q * k + found];
        let distinct: std::collections::HashSet<i64> = got.iter().copied().collect();
        assert_eq!(distinct.len(), found, "{case}: query {q} repeats a row");
        for (r, (&i, &(want, _))) in got.iter().zip(ranked).enumerate() {
            let truth = exact
                .get(&i)
                .unwrap_or_else(|| panic!("{case}: row {i} not allowed"));
            assert!(
                (truth - want).abs() < 2e-6,
                "{case}: query {q} rank {r}: row {i}"
            );
            let score = scores[q * k + r] as f64;
            assert!(
                (score - want).abs() < 2e-6,
                "{case}: query {q} rank {r}: {score} vs {want}"
            );
        }
        assert!(
            ids[q * k + found..(q + 1) * k].iter().all(|&i| i == -1),
            "{case}"
        );
        assert!(scores[q * k + found..(q + 1) * k]
            .iter()
            .all(|&s| s == f32::NEG_INFINITY));
    }
}

#[test]
fn large_k_equals_brute_force_across_tiles_runs_paths_and_dtypes() {
    // k above SMALL_K: the shared-memory selection (buffer, bitonic sort, merge path), over
    // several runs and tiles, for the scan (3 queries) and the GEMM path (18 queries)
    let rows = unit_rows(31, 900, 8);
    for nq in [3, search::SCAN_QUERIES + 2] {
        let mut queries = unit_rows(32, nq, 8);
        queries.row_mut(1).assign(&rows.row(3)); // rows 3, 7, 11 tie at the top
        for k in [65, 200] {
            // runs of 2k columns, tiles of two runs
            let tiling = SearchTiling {
                run: 16,
                score_budget_bytes: nq * 4 * 4 * k,
                run_per_k: 2,
                ..SearchTiling::default()
            };
            for stored in [Stored::F32, Stored::F16] {
                let got = emulate_search(&rows, &queries, k, stored, tiling);
                let all = brute_force(&rows, &queries, rows.nrows(), stored);
                assert_matches(&got, &all, k, &format!("q={nq} k={k} {stored:?}"));
                assert_eq!(&got.1[k..k + 3], &[3, 7, 11]);
            }
        }
    }
}

#[test]
fn the_largest_k_and_k_beyond_the_gallery_on_the_large_path() {
    let queries = unit_rows(34, 2, 8);
    // k = 1024 over 2600 rows in runs of 1024: three runs, the last one short
    let rows = unit_rows(33, 2600, 8);
    let tiling = SearchTiling {
        run_per_k: 1,
        ..SearchTiling::default()
    };
    let got = emulate_search(&rows, &queries, search::MAX_K, Stored::F32, tiling);
    let all = brute_force(&rows, &queries, rows.nrows(), Stored::F32);
    assert_matches(&got, &all, search::MAX_K, "k=1024");
    // k = 500 over 300 rows: all 300 in order, then padding
    let rows = unit_rows(35, 300, 8);
    let got = emulate_search(&rows, &queries, 500, Stored::F16, SearchTiling::default());
    assert_matches(
        &got,
        &brute_force(&rows, &queries, 500, Stored::F16),
        500,
        "k=500 > n",
    );
}

#[test]
fn large_k_takes_ties_across_runs_and_tiles_to_the_lower_row() {
    // rows repeat every 50: every score is tied 12 times, only the row order breaks ties
    let base = unit_rows(36, 50, 8);
    let rows = Array2::from_shape_fn((600, 8), |(r, c)| base[[r % 50, c]]);
    let queries = unit_rows(37, 2, 8);
    let tiling = SearchTiling {
        run: 8,
        score_budget_bytes: 2 * 4 * 400,
        run_per_k: 2,
        ..SearchTiling::default()
    };
    for stored in [Stored::F32, Stored::F16] {
        let got = emulate_search(&rows, &queries, 150, stored, tiling);
        let all = brute_force(&rows, &queries, rows.nrows(), stored);
        assert_matches(&got, &all, 150, &format!("{stored:?}"));
        // only the row order breaks these ties: the exact list
        let want = brute_force(&rows, &queries, 150, stored);
        let wanted: Vec<i64> = want
            .iter()
            .flat_map(|w| w.iter().map(|&(_, i)| i))
            .collect();
        assert_eq!(got.1, wanted, "{stored:?}");
    }
}

#[test]
fn a_row_mask_filters_the_selection_for_every_k_and_path() {
    let rows = unit_rows(38, 500, 8);
    // every third row, and rows 3 and 11 (so two of the three tied rows are allowed)
    let mut mask = vec![0u32; 500usize.div_ceil(32)];
    for r in (0..500).filter(|r| r % 3 == 0 || *r == 11) {
        mask[r / 32] |= 1 << (r % 32);
    }
    // the scan path for every k (k = 200 is more than the 168 rows allowed: padding after
    // them), the GEMM path for one k of each selection
    let cases = [
        (2, 5),
        (2, 64),
        (2, 100),
        (2, 200),
        (search::SCAN_QUERIES + 1, 5),
        (search::SCAN_QUERIES + 1, 100),
    ];
    for (nq, k) in cases {
        let mut queries = unit_rows(39, nq, 8);
        queries.row_mut(0).assign(&rows.row(3));
        let tiling = SearchTiling {
            run: 32,
            score_budget_bytes: nq * 4 * 128,
            run_per_k: 1,
            ..SearchTiling::default()
        };
        for stored in [Stored::F32, Stored::F16] {
            let (s, i, _) = emulate_any_search(
                &rows,
                &queries,
                k,
                stored,
                tiling,
                Some(&mask),
                Route::Exact,
            );
            let got = (s, i);
            let all = filtered_brute_force(&rows, &queries, 500, stored, Some(&mask));
            assert_matches(&got, &all, k, &format!("q={nq} k={k} {stored:?}"));
            assert_eq!(&got.1[..2], &[3, 11]);
        }
    }
    // a mask that lets nothing through: every entry is padding
    let none = vec![0u32; mask.len()];
    let queries = unit_rows(40, 2, 8);
    for k in [3, 70] {
        let (scores, ids, _) = emulate_any_search(
            &rows,
            &queries,
            k,
            Stored::F32,
            SearchTiling::default(),
            Some(&none),
            Route::Exact,
        );
        assert!(ids.iter().all(|&i| i == -1) && scores.iter().all(|&s| s == f32::NEG_INFINITY));
    }
}

/// The device memory a GPU gallery holds beyond its stored rows — the room left for added
/// rows, a search's scratch, the id table of device-query searches and the mask of removed
/// rows — stays within 256 MiB for 1024 queries over 1M rows of
/// 512, in every storage type and for k up to [`search::MAX_K`], with a filter.
#[test]
fn memory_beyond_the_rows_fits_256_mib_at_1024_queries() {
    let (n, d, q) = (1_000_000, 512, 1024);
    for stored in ALL_STORED {
        for k in [
            10,
            40,
            search::SMALL_K + 1,
            200,
            search::MAX_K / 2,
            search::MAX_K,
        ] {
            let shape = SearchShape { n, d, q, k, stored };
            // NumPy queries: the rescored layout where there is one, and the exact route's
            // (its fallback); CUDA-tensor queries: the caller's workspace
            let mask_words = n.div_ceil(32);
            let scratch = [false, search::rescores(shape)]
                .map(|rescored| {
                    crate::cuda::gallery::host_queries_layout(shape, mask_words, rescored).1
                })
                .into_iter()
                .chain([crate::cuda::gallery::device_queries_layout(shape, mask_words).1])
                .max()
                .expect("three layouts");
            let row_bytes = d * stored.size() + if stored == Stored::I8 { 4 } else { 0 };
            let room = (crate::cuda::gallery::room_for(n) - n) * row_bytes;
            let ids_and_mask = crate::cuda::gallery::room_for(n) * (8 + 1);
            let beyond = (room + scratch + ids_and_mask) as f64 / (1 << 20) as f64;
            assert!(beyond <= 256.0, "{stored:?} k={k}: {beyond:.1} MiB");
        }
    }
}

/// A row mask of `n` rows (one bit each) with the bits of the rows `allowed` picks set.
fn mask_of(n: usize, allowed: impl Fn(usize) -> bool) -> Vec<u32> {
    let mut mask = vec![0u32; n.div_ceil(32)];
    for r in (0..n).filter(|&r| allowed(r)) {
        mask[r / 32] |= 1 << (r % 32);
    }
    mask
}

#[test]
fn rescored_searches_equal_brute_force_in_every_storage_type() {
    // many queries: one GEMM (16-bit, or TF32 for float32 and decoded int8 rows) picks
    // k + max(k, 32) candidates, `rescore` ranks them exactly; several tiles and runs (int8
    // decoded in chunks of 48 rows), k on the small selection (6: 38 candidates) and the
    // large one (40: 80 candidates), with and without a filter
    let rows = unit_rows(41, 700, 16);
    let nq = search::SCAN_QUERIES + 2;
    let mut queries = unit_rows(42, nq, 16);
    queries.row_mut(1).assign(&rows.row(3)); // rows 3, 7, 11 tie at the top
    let every_other = mask_of(700, |r| r % 2 == 1 || r == 3);
    for stored in ALL_STORED {
        for k in [6, 40] {
            let shape = SearchShape {
                n: 700,
                d: 16,
                q: nq,
                k,
                stored,
            };
            assert!(search::rescores(shape), "{stored:?} k={k}");
            let tiling = SearchTiling {
                run: 32,
                score_budget_bytes: nq * 4 * 192,
                run_per_k: 1,
                decode_budget_bytes: 48 * 16 * 4,
            };
            for allowed in [None, Some(&every_other[..])] {
                let case = format!("{stored:?} k={k} filtered={}", allowed.is_some());
                let (scores, ids, unsure) = emulate_any_search(
                    &rows,
                    &queries,
                    k,
                    stored,
                    tiling,
                    allowed,
                    Route::Rescored,
                );
                assert_eq!(unsure, vec![0; nq], "{case}: random rows are all sure");
                let all = filtered_brute_force(&rows, &queries, 700, stored, allowed);
                assert_matches(&(scores, ids.clone()), &all, k, &case);
                // rows 7 and 11 are odd: the filter keeps all three ties
                assert_eq!(&ids[k..k + 3], &[3, 7, 11], "{case}");
            }
        }
    }
}

/// Rows where 100..`end` repeat row 100, and SCAN_QUERIES + 1 queries (the GEMM path)
/// whose query 2 equals that row.
fn repeated_rows(end: usize) -> (Array2<f32>, Array2<f32>) {
    let mut rows = unit_rows(43, 400, 16);
    let copy = rows.row(100).to_owned();
    for r in 101..end {
        rows.row_mut(r).assign(&copy);
    }
    let mut queries = unit_rows(44, search::SCAN_QUERIES + 1, 16);
    queries.row_mut(2).assign(&copy);
    (rows, queries)
}

#[test]
fn a_query_with_more_near_ties_than_spare_candidates_is_flagged_unsure() {
    // rows 100..160 are one row repeated: a query equal to it finds 60 rows within rounding
    // of its k-th, more than the 42 candidates kept for k = 10, so the rescore cannot vouch
    // that no left-out row belongs in the k best; the other queries stay sure
    let (rows, queries) = repeated_rows(160);
    let nq = queries.nrows();
    for stored in ALL_STORED {
        let (_, ids, unsure) = emulate_any_search(
            &rows,
            &queries,
            10,
            stored,
            SearchTiling::default(),
            None,
            Route::Rescored,
        );
        let flagged: Vec<usize> = (0..nq).filter(|&q| unsure[q] != 0).collect();
        assert_eq!(flagged, vec![2], "{stored:?}");
        // what it returns is still ten of the repeated rows
        assert!(
            ids[20..30].iter().all(|i| (100..160).contains(i)),
            "{stored:?}"
        );
        // a filter that leaves ten of them: all are among the candidates, and it is sure
        let few = mask_of(400, |r| !(110..160).contains(&r));
        let (_, _, unsure) = emulate_any_search(
            &rows,
            &queries,
            10,
            stored,
            SearchTiling::default(),
            Some(&few),
            Route::Rescored,
        );
        assert_eq!(unsure, vec![0; nq], "{stored:?} filtered");
    }
}

#[test]
fn a_device_search_searches_its_unsure_queries_again_exactly() {
    // rows 100..260 are one row repeated, more than the candidates of k = 10 (42) and of
    // k = 70 (140, the large selection): the query equal to them is flagged, its rescored
    // results are spoiled, and `redo_unsure` must give the brute force's (the equal rows in
    // row order), with and without a filter; the sure queries keep the rescored results
    let (rows, queries) = repeated_rows(260);
    let nq = queries.nrows();
    let odd = mask_of(400, |r| r % 2 == 1);
    for stored in ALL_STORED {
        for (k, allowed) in [(10, None), (10, Some(&odd[..])), (70, None)] {
            let case = format!("{stored:?} k={k} filtered={}", allowed.is_some());
            let tiling = SearchTiling::default();
            let (s, i, unsure) =
                emulate_any_search(&rows, &queries, k, stored, tiling, allowed, Route::Redone);
            assert_eq!(unsure[2], 1, "{case}");
            let all = filtered_brute_force(&rows, &queries, 400, stored, allowed);
            assert_matches(&(s.clone(), i.clone()), &all, k, &case);
            let want: Vec<i64> = (100..160)
                .filter(|&r| allowed.is_none() || r % 2 == 1)
                .collect();
            assert_eq!(
                &i[2 * k..2 * k + k.min(want.len())],
                &want[..k.min(want.len())],
                "{case}"
            );
            let rescored =
                emulate_any_search(&rows, &queries, k, stored, tiling, allowed, Route::Rescored);
            for q in (0..nq).filter(|&q| unsure[q] == 0) {
                assert_eq!(
                    &i[q * k..(q + 1) * k],
                    &rescored.1[q * k..(q + 1) * k],
                    "{case}"
                );
            }
        }
    }
}

/// A float32 value as a TF32 GEMM may read it: 10 stored bits, truncated (the worst case;
/// the emulator rounds).
fn tf32(v: f64) -> f64 {
    f32::from_bits((v as f32).to_bits() & !0x1fff) as f64
}

/// A query element as a rescored search's GEMM reads it: rounded to the rows' 16-bit type
/// (`round_queries`), or TF32.
fn gemm_query(stored: Stored, v: f32) -> f64 {
    match stored {
        Stored::F16 => half::f16::from_f32(v).to_f64(),
        Stored::Bf16 => half::bf16::from_f32(v).to_f64(),
        _ => tf32(v as f64),
    }
}

/// A stored row element (its exact value) as the GEMM reads it: 16-bit rows as they are,
/// float32 and int8's code * scale (in float32) as TF32.
fn gemm_row(stored: Stored, v: f64) -> f64 {
    match stored {
        Stored::F16 | Stored::Bf16 => v,
        _ => tf32(v),
    }
}

/// A GEMM's float32 score as the selection reads it: float16 rows' scores are stored in
/// float16 (rounded to nearest), the others' in float32.
fn stored_score(stored: Stored, v: f64) -> f64 {
    match stored {
        Stored::F16 => half::f16::from_f64(v).to_f64(),
        _ => v,
    }
}

/// A float32 dot product summed in order.
fn f32_dot(a: impl Iterator<Item = f64>, b: impl Iterator<Item = f64>) -> f64 {
    a.zip(b).fold(0f32, |s, (x, y)| s + x as f32 * y as f32) as f64
}

#[test]
fn rescore_slack_bounds_the_gemm_score_against_the_exact_one() {
    // the worst row for a query points along its rounding error; queries with many tiny
    // components reach float16's subnormals; float32 sums in order on both sides
    for stored in ALL_STORED {
        for d in [16, 512] {
            let slack = search::rescore_slack(d, stored);
            let mut queries = unit_rows(45, 8, d);
            for c in 0..d {
                // mostly components near 2^-20 (subnormal in float16), one large
                queries[[0, c]] = if c == 0 { 1.0 } else { 3e-7 };
            }
            let norm = queries.row(0).dot(&queries.row(0)).sqrt();
            queries.row_mut(0).mapv_inplace(|v| v / norm);
            let mut worst: f64 = 0.0;
            for q in queries.rows() {
                let read: Vec<f64> = q.iter().map(|&v| gemm_query(stored, v)).collect();
                let exact: Vec<f64> = q.iter().map(|&v| v as f64).collect();
                // the row along the rounding error, and random rows, as stored
                let err: Vec<f64> = read.iter().zip(&exact).map(|(r, e)| r - e).collect();
                let norm = err.iter().map(|e| e * e).sum::<f64>().sqrt().max(1e-30);
                let along = Array2::from_shape_fn((1, d), |(_, c)| (err[c] / norm) as f32);
                let random = unit_rows(46, 20, d);
                let candidates = ndarray::concatenate![ndarray::Axis(0), along, random];
                for g in store(&candidates, stored).values.rows() {
                    let g_read = g.iter().map(|&v| gemm_row(stored, v));
                    let gemm = stored_score(stored, f32_dot(read.iter().copied(), g_read));
                    let rescored = f32_dot(exact.iter().copied(), g.iter().copied());
                    let truth: f64 = exact.iter().zip(g).map(|(a, b)| a * b).sum();
                    worst = worst.max((gemm - rescored).abs()).max((gemm - truth).abs());
                }
            }
            assert!(worst <= slack, "{stored:?} d={d}: {worst} > {slack}");
            // and the bound is not loose by orders of magnitude
            assert!(worst > slack / 64.0, "{stored:?} d={d}: {worst} << {slack}");
        }
    }
}

#[test]
fn galleries_past_32_bit_row_numbers_take_the_exact_route() {
    // the large selection and the device's redo number rows in 32 bits: beyond them, a
    // search of many queries is not rescored (k = 40 keeps 80 candidates, the large path)
    let shape = SearchShape {
        n: i32::MAX as usize + 1,
        d: 512,
        q: 1024,
        k: 40,
        stored: Stored::F16,
    };
    assert!(!search::rescores(shape));
    assert!(search::rescores(SearchShape {
        n: 1_000_000,
        ..shape
    }));
}
