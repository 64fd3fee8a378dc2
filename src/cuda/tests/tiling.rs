//! How the fused head cuts a call (`head/tiling.rs`): class tiles, where the stash waits,
//! row chunks, groups of batched dX̂ products, the launches a tile costs, and the
//! environment's settings; each against the CPU head on the emulator.

use super::fused_head::{check, emulate, margins};
use super::*;

/// Launches and GEMMs of one emulated step (loss and both gradients) of ArcFace over 40
/// classes, checked to flag no bad input.
fn calls_of_a_step<T: Real>(b: usize, d: usize, tiling: Tiling) -> usize {
    let margin = Margin::arcface(30.0, 0.5, false).unwrap();
    let emb = matrix::<T>(1, b, d);
    let weight = matrix::<T>(2, 40, d);
    let labels: Vec<i64> = (0..b).map(|i| (i * 7 % 40) as i64).collect();
    let row_weight = vec![1.0; b];
    let before = Emulator::calls_on_this_thread();
    let got = emulate(
        &emb,
        &weight,
        &labels,
        (&margin).into(),
        HeadOptions::default(),
        &row_weight,
        (true, true),
        tiling,
        None,
    );
    assert_eq!(got.bad, [0, 0, 0]);
    Emulator::calls_on_this_thread() - before
}

#[test]
fn head_equals_the_cpu_head_with_the_stash_in_the_gradient() {
    // B <= D: the stash lives in dW's rows; tiles of 7 leave a short last tile.
    let tiling = Tiling {
        class_tile: 7,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    for margin in margins() {
        check::<f64>(5, 23, 8, &margin, tiling, 1e-10);
        check::<f32>(5, 23, 8, &margin, tiling, 2e-4);
    }
}

#[test]
fn a_class_tile_costs_four_launches_two_of_them_gemms() {
    // the logits GEMM and the logits pass beside the next tile's weights pass; the pass
    // between tiles (the last tile's projection of dW beside this tile's row factors) and
    // the dW GEMM. The dX̂ products come from batched GEMMs, one or two a group of tiles
    // (the spilled last stash is not where the others are). With the stash in dW (B <= D)
    // and without (B > D).
    for (b, d) in [(4, 8), (12, 8)] {
        let per_tile = calls_per_class_tile(|tiling| {
            calls_of_a_step::<f32>(b, d, tiling);
        });
        assert_eq!(per_tile, 4, "b={b} d={d}");
    }
}

#[test]
fn head_equals_the_cpu_head_over_groups_of_batched_dx_products() {
    // 8 tiles of 5: the dX̂ products of groups of 1, 3 (3 + 3 + 2) or 5 tiles in batched
    // GEMMs, with the stash in dW (B <= D: the last tile's spilled) and in a chunk's stash
    // (B > D). A group's GEMM must come after the launch that reads the previous group's
    // last product, whose slot it reuses. The group is set by the products' bytes, or by
    // `dx_batch_tiles` (ARCFACE_RS_CUDA_DX_BATCH) below what the bytes allow.
    let margin = Margin::arcface(30.0, 0.5, false).unwrap();
    for b in [5, 12] {
        for (group, cap) in [(1, None), (3, None), (5, None), (8, Some(3)), (8, Some(1))] {
            let tiling = |size: usize| Tiling {
                class_tile: 5,
                dx_products_bytes: group * b * 8 * size,
                dx_batch_tiles: cap,
                ..Tiling::default()
            };
            check::<f64>(b, 40, 8, &margin, tiling(8), 1e-10);
            check::<f32>(b, 40, 8, &margin, tiling(4), 2e-4);
        }
    }
}

#[test]
fn the_dx_batch_caps_the_tiles_of_a_batched_gemm_and_their_scratch() {
    // 8 tiles whose products 64 MiB all hold. B > D (stash in a chunk's stash): one batched
    // GEMM; capped at 3 tiles, three (3 + 3 + 2); at 1, a GEMM per tile. B <= D: the last
    // tile's stash is spilled to scratch, which never joins the others' batch (wherever
    // the scratch lies), so its product takes a GEMM of its own (7 + 1, 3 + 3 + 1 + 1).
    // The products' scratch holds a group's tiles. (The results of capped groups are
    // checked in head_equals_the_cpu_head_over_groups_of_batched_dx_products.)
    use crate::cuda::device::ALIGN;
    use crate::cuda::head::workspace_bytes;
    let d = 8;
    for (b, gemms) in [(12, [1, 3, 8]), (5, [2, 4, 8])] {
        let run = |cap: Option<usize>| {
            let tiling = Tiling {
                class_tile: 5,
                dx_batch_tiles: cap,
                ..Tiling::default()
            };
            let shape = HeadShape::exact(b, 40, d, Elem::F64);
            let calls = calls_of_a_step::<f64>(b, d, tiling);
            (calls, workspace_bytes(shape, true, tiling))
        };
        let (calls, bytes) = run(None);
        let product = b * d * 8; // rows × d float64
        for (cap, capped_gemms) in [(3, gemms[1]), (1, gemms[2])] {
            let (capped_calls, capped_bytes) = run(Some(cap));
            assert_eq!(capped_calls - calls, capped_gemms - gemms[0], "{b} {cap}");
            // (each buffer starts on a multiple of ALIGN bytes)
            let fewer = (8 - cap) * product;
            let gap = (bytes - capped_bytes).abs_diff(fewer);
            assert!(gap < ALIGN, "{b} {cap}: {bytes} {capped_bytes}");
        }
    }
}

#[test]
fn the_dx_batch_comes_from_the_environment_or_is_refused() {
    use crate::cuda::head::dx_batch_from;
    assert_eq!(dx_batch_from(None), Ok(None));
    assert_eq!(dx_batch_from(Some(" ")), Ok(None));
    assert_eq!(dx_batch_from(Some("1")), Ok(Some(1)));
    assert_eq!(dx_batch_from(Some(" 8 ")), Ok(Some(8)));
    assert_eq!(dx_batch_from(Some("4096")), Ok(Some(4096)));
    for bad in ["0", "4097", "-1", "8k", "1.0"] {
        let err = dx_batch_from(Some(bad)).unwrap_err();
        assert!(
            err.starts_with(&format!("{bad:?} is not a whole number from 1 to 4096")),
            "{bad}: {err}"
        );
    }
}

#[test]
fn head_equals_the_cpu_head_over_row_chunks() {
    // B > D: a separate stash of 3 rows x C; dW accumulates over 4 chunks, the last short.
    let c = 19;
    let tiling = Tiling {
        class_tile: 5,
        stash_budget_bytes: 3 * c * 8,
        ..Tiling::default()
    };
    for margin in margins() {
        check::<f64>(11, c, 4, &margin, tiling, 1e-10);
    }
    check::<f32>(
        11,
        c,
        4,
        &Margin::arcface(64.0, 0.5, false).unwrap(),
        Tiling {
            stash_budget_bytes: 3 * c * 4,
            ..tiling
        },
        2e-4,
    );
    // one tile and one chunk
    check::<f64>(
        3,
        6,
        40,
        &Margin::cosface(64.0, 0.35).unwrap(),
        Tiling::default(),
        1e-10,
    );
}

#[test]
fn class_tile_comes_from_the_environment_or_is_refused() {
    use crate::cuda::head::{class_tile_from, CLASS_TILE};
    assert_eq!(class_tile_from(None), Ok(CLASS_TILE));
    assert_eq!(class_tile_from(Some(" ")), Ok(CLASS_TILE));
    assert_eq!(class_tile_from(Some("8192")), Ok(8192));
    assert_eq!(class_tile_from(Some(" 256 ")), Ok(256));
    assert_eq!(class_tile_from(Some("1048576")), Ok(1 << 20));
    for bad in ["0", "128", "1000", "2097152", "-256", "8k", "16384.0"] {
        let err = class_tile_from(Some(bad)).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "{bad:?} is not a multiple of 256 from 256 to 1048576"
            )),
            "{bad}: {err}"
        );
    }
}
