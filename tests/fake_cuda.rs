//! arcface_rs's CUDA driver code (src/cuda/driver.rs, gallery.rs) run end to end without a
//! GPU: a fake libcuda and libcublas (tests/cuda/fake_cuda/) keep "device memory" in host memory
//! and run the kernels on the CPU emulator; NVRTC is the real one. Each library is loaded
//! by path before cudarc asks for it by name, so cudarc finds these.
#![cfg(feature = "cuda")]

use arcface_rs::cuda::device::Elem;
use arcface_rs::cuda::driver::with_stream;
use arcface_rs::cuda::gallery::{GpuSearch, Mirror};
use arcface_rs::cuda::head::{self, HeadBuffers, HeadShape, Tiling};
use arcface_rs::head::{margin_loss_with, LossOptions, Reduction};
use arcface_rs::search::gallery::{Dtype, Gallery, IdFilter};
use arcface_rs::Margin;
use ndarray::Array2;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The fake libcuda and libcublas, built and loaded once per test process.
fn fakes() -> &'static (libloading::Library, libloading::Library) {
    static DRIVER: OnceLock<(libloading::Library, libloading::Library)> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda/fake_cuda");
        let out = std::env::temp_dir().join(format!("arcface_rs_fake_cuda_{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let status = Command::new("bash")
            .arg(here.join("build.sh"))
            .arg(&out)
            .args(
                arcface_rs::cuda::margin_defines()
                    .into_iter()
                    .map(|(name, value)| format!("-D{name}={value}")),
            )
            .status()
            .expect("bash");
        assert!(status.success(), "tests/cuda/fake_cuda/build.sh failed");
        // SAFETY: our own libraries; loading runs no code beyond static initialisers.
        let loaded = unsafe {
            (
                libloading::Library::new(out.join("libcuda.so")).unwrap(),
                libloading::Library::new(out.join("libcublas.so")).unwrap(),
            )
        };
        let _ = std::fs::remove_dir_all(&out);
        loaded
    })
}

/// The fake driver.
fn fake() -> &'static libloading::Library {
    &fakes().0
}

/// The fake device, one test at a time (the allocation count is process-wide).
fn device() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    fake();
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn live_allocations() -> i32 {
    counter(b"fake_live_allocations\0")
}

fn noise(seed: u64, rows: usize, cols: usize) -> Array2<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array2::from_shape_fn((rows, cols), |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    })
}

/// A counter the fake driver exports.
fn counter(name: &[u8]) -> i32 {
    // SAFETY: the fake's counters have this signature.
    unsafe { fake().get::<unsafe extern "C" fn() -> i32>(name).unwrap()() }
}

/// Products made by the fake cuBLAS's strided batched GEMMs of more than one product.
fn batched_products() -> i32 {
    // SAFETY: the fake's counter has this signature.
    unsafe {
        fakes()
            .1
            .get::<unsafe extern "C" fn() -> i32>(b"fake_batched_products\0")
            .unwrap()()
    }
}

#[test]
fn kernels_load_as_machine_code_else_as_ptx_and_missing_devices_are_errors() {
    let _device = device();
    assert!(arcface_rs::cuda::available());
    with_stream(0, 0, |_| Ok(())).unwrap();
    assert_eq!(
        counter(b"fake_loaded_cubins\0"),
        1,
        "device 0 takes sm_90 machine code"
    );
    // device 1 refuses the machine code: the kernels load from PTX and still work
    with_stream(1, 0, |_| Ok(())).unwrap();
    assert_eq!(
        counter(b"fake_loaded_ptx\0"),
        1,
        "device 1 falls back to PTX"
    );
    let mut gallery = Gallery::new(8, Dtype::F32).unwrap();
    gallery
        .add(noise(9, 50, 8).mapv(|v| v as f32).view(), None)
        .unwrap();
    let probe = noise(10, 3, 8).mapv(|v| v as f32);
    let on_1 = Mirror::new(&gallery, 1)
        .unwrap()
        .search_rows(probe.view(), 4, None)
        .unwrap();
    assert_eq!(
        on_1.indices,
        gallery.search(probe.view(), 4).unwrap().indices
    );
    let err = with_stream(2, 0, |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("cuDeviceGet"), "{err}");
}

#[test]
fn the_head_through_the_driver_equals_the_cpu_head() {
    // four tiles of 16: the first three tiles' stashes park in the next tile's rows of dW,
    // so their dX̂ products come from one batched GEMM (cublasDgemmStridedBatched)
    let _device = device();
    let (b, c, d) = (6, 64, 8);
    let emb = noise(1, b, d) * 2.0;
    let weight = noise(2, c, d);
    let labels: Vec<i64> = vec![3, -1, 39, 0, 17, 3];
    let row_weight: Vec<f64> = labels
        .iter()
        .map(|&y| if y < 0 { 0.0 } else { 0.2 })
        .collect();
    for margin in [
        Margin::arcface(64.0, 0.5, false).unwrap(),
        Margin::sphereface(4, None, 5.0).unwrap(),
    ] {
        let cpu = margin_loss_with(
            emb.view(),
            weight.view(),
            &labels,
            &margin,
            LossOptions::new(Reduction::Mean),
        )
        .unwrap();
        let shape = HeadShape::exact(b, c, d, Elem::F64);
        let tiling = Tiling {
            class_tile: 16,
            stash_budget_bytes: 1 << 20,
            ..Tiling::default()
        };
        let mut row_loss = vec![0.0f64; b];
        let mut grad_emb = Array2::<f64>::zeros((b, d));
        let mut grad_weight = Array2::<f64>::zeros((c, d));
        let mut bad = [0i32; 3];
        let mut workspace = vec![0u64; head::workspace_bytes(shape, true, tiling) / 8 + 1];
        let block = margin.encode();
        let buffers = HeadBuffers {
            margins: block.as_ptr() as u64,
            per_row_margins: false,
            emb: emb.as_ptr() as u64,
            weight: weight.as_ptr() as u64,
            labels: labels.as_ptr() as u64,
            row_weight: row_weight.as_ptr() as u64,
            row_loss: row_loss.as_mut_ptr() as u64,
            grad_emb: grad_emb.as_mut_ptr() as u64,
            grad_weight: grad_weight.as_mut_ptr() as u64,
            bad: bad.as_mut_ptr() as u64,
            workspace: workspace.as_mut_ptr() as u64,
        };
        let batched_before = batched_products();
        with_stream(0, 0, |s| {
            head::margin_loss(s, shape, &margin, Default::default(), &buffers, tiling)?;
            s.synchronize()
        })
        .unwrap();
        assert_eq!(bad, [0, 0, 0]);
        assert_eq!(batched_products() - batched_before, 3);
        let loss: f64 = row_loss.iter().sum::<f64>() / 5.0;
        assert!(
            (loss - cpu.loss).abs() < 1e-10 * cpu.loss.abs(),
            "{loss} vs {}",
            cpu.loss
        );
        let close = |a: &Array2<f64>, b: &Array2<f64>| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() < 1e-10 * (1.0 + y.abs()))
        };
        assert!(close(&grad_emb, cpu.grad_emb.as_ref().unwrap()));
        assert!(close(&grad_weight, cpu.grad_weight.as_ref().unwrap()));
    }
}

#[test]
fn gallery_search_through_the_driver_equals_the_cpu_search() {
    let _device = device();
    let emb = noise(3, 700, 24).mapv(|v| v as f32);
    // 9 queries score by the row scan, 20 by GEMMs (more than SCAN_QUERIES)
    let all_queries = noise(4, 20, 24).mapv(|v| v as f32);
    for (dtype, count) in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I8]
        .into_iter()
        .flat_map(|d| [(d, 9), (d, 20)])
    {
        let queries = all_queries.slice(ndarray::s![..count, ..]);
        let mut gallery = Gallery::new(24, dtype).unwrap();
        gallery.add(emb.view(), None).unwrap();
        let before = live_allocations();
        {
            let mut mirror = Mirror::new(&gallery, 0).unwrap();
            for k in [1, 10, 64, 200] {
                let gpu = mirror.search_rows(queries, k, None).unwrap();
                let cpu = gallery.search(queries, k).unwrap();
                // ids are 0..700 in row order, so rows and ids coincide
                assert_eq!(gpu.indices, cpu.indices, "{dtype:?} q={count} k={k}");
                let diff = (&gpu.scores - &cpu.scores).mapv(f32::abs);
                assert!(diff.iter().all(|&e| e < 2e-6), "{dtype:?} q={count} k={k}");
            }
            // past the rows there are: all 700, then padding
            let wide = mirror.search_rows(queries, 1025, None).unwrap();
            assert!(wide
                .indices
                .slice(ndarray::s![.., 700..])
                .iter()
                .all(|&i| i == -1));
            assert!(wide
                .indices
                .slice(ndarray::s![.., ..700])
                .iter()
                .all(|&i| i >= 0));
            let zero = Array2::<f32>::zeros((1, 24));
            let err = mirror.search_rows(zero.view(), 3, None).unwrap_err();
            assert_eq!(err.arg, "queries");
        }
        assert_eq!(
            live_allocations(),
            before,
            "{dtype:?}: device memory leaked"
        );
    }
}

#[test]
fn gallery_search_pads_beyond_the_rows() {
    let _device = device();
    let mut gallery = Gallery::new(5, Dtype::F16).unwrap();
    gallery
        .add(noise(5, 3, 5).mapv(|v| v as f32).view(), None)
        .unwrap();
    let mut mirror = Mirror::new(&gallery, 0).unwrap();
    let got = mirror
        .search_rows(noise(6, 2, 5).mapv(|v| v as f32).view(), 6, None)
        .unwrap();
    let cpu = gallery
        .search(noise(6, 2, 5).mapv(|v| v as f32).view(), 6)
        .unwrap();
    assert_eq!(got.indices, cpu.indices);
    assert!(got.scores.column(5).iter().all(|s| *s == f32::NEG_INFINITY));
}

#[test]
fn gpu_search_follows_changes_maps_ids_and_falls_back_above_1024() {
    let _device = device();
    let emb = noise(7, 300, 16).mapv(|v| v as f32);
    let mut gallery = Gallery::new(16, Dtype::F16).unwrap();
    let ids: Vec<i64> = (0..200).map(|i| 5000 - 3 * i).collect();
    gallery
        .add(
            emb.slice(ndarray::s![..200, ..]),
            Some(ndarray::ArrayView1::from(&ids)),
        )
        .unwrap();
    let gpu = GpuSearch::default();
    let probe = emb.slice(ndarray::s![250..252, ..]);
    let first = gpu.search(&gallery, probe, 5, 0, None).unwrap();
    assert_eq!(first.indices, gallery.search(probe, 5).unwrap().indices);
    // rows with room for 1024 more (1/32 of the rows, at least 1024)
    assert_eq!(gpu.nbytes(), (200 + 1024) * 16 * 2);
    gallery
        .add(emb.slice(ndarray::s![200.., ..]), None)
        .unwrap();
    let fresh = gpu.search(&gallery, probe, 5, 0, None).unwrap();
    let cpu = gallery.search(probe, 5).unwrap();
    assert_eq!(fresh.indices, cpu.indices);
    assert_eq!(fresh.indices[[0, 0]], gallery.ids()[250]); // finds itself, by id
    assert_eq!(gpu.nbytes(), (200 + 1024) * 16 * 2); // followed, not rebuilt
                                                     // k above 64 (the large-k kernels) and above 1024 (the CPU search): the same answer
    for k in [100, 1100] {
        let wide = gpu.search(&gallery, probe, k, 0, None).unwrap();
        assert_eq!(wide.indices, gallery.search(probe, k).unwrap().indices);
    }
    // a filter: the same rows as the CPU's filtered search
    let allow: Vec<i64> = gallery.ids().iter().step_by(4).copied().collect();
    for k in [3, 90] {
        let filter = Some(IdFilter::Allow(&allow));
        let got = gpu.search(&gallery, probe, k, 0, filter).unwrap();
        assert_eq!(
            got.indices,
            gallery.search_with(probe, k, filter).unwrap().indices
        );
    }
    // a missing device is an error, and the copy is dropped rather than kept stale
    assert!(gpu.search(&gallery, probe, 5, 7, None).is_err());
    assert_eq!(gpu.nbytes(), 0);
}

#[test]
fn the_gpu_copy_appends_added_rows_and_masks_removed_ones() {
    let _device = device();
    let uploaded = || {
        // SAFETY: the fake's counter has this signature.
        unsafe {
            let count = fake()
                .get::<unsafe extern "C" fn() -> i64>(b"fake_uploaded_bytes\0")
                .unwrap();
            count()
        }
    };
    let emb = noise(9, 900, 8).mapv(|v| v as f32);
    let probe = noise(10, 3, 8).mapv(|v| v as f32);
    for dtype in [Dtype::F32, Dtype::I8] {
        let mut gallery = Gallery::new(8, dtype).unwrap();
        gallery
            .add(emb.slice(ndarray::s![..400, ..]), None)
            .unwrap();
        let gpu = GpuSearch::default();
        let row_bytes = 8 * dtype.bytes() + if dtype == Dtype::I8 { 4 } else { 0 };
        let check = |gallery: &Gallery, case: &str| {
            for (k, filter) in [
                (7, None),
                (80, None),
                (9, Some(IdFilter::Deny(&[3, 5, 401]))),
            ] {
                let got = gpu.search(gallery, probe.view(), k, 0, filter).unwrap();
                let want = gallery.search_with(probe.view(), k, filter).unwrap();
                assert_eq!(got.indices, want.indices, "{dtype:?} {case} k={k}");
            }
        };
        check(&gallery, "built");
        let built = gpu.nbytes();
        // steps of adds and removes (a removed id added back holds a new vector)
        let remove = |g: &mut Gallery, ids: &[i64]| {
            g.remove(ndarray::ArrayView1::from(ids)).unwrap();
        };
        let before = uploaded();
        gallery
            .add(emb.slice(ndarray::s![400..450, ..]), None)
            .unwrap();
        remove(&mut gallery, &[0, 7, 420, 399]);
        gallery
            .add(
                emb.slice(ndarray::s![450..452, ..]),
                Some(ndarray::ArrayView1::from(&[7i64, 0][..])),
            )
            .unwrap();
        remove(&mut gallery, &[0]);
        check(&gallery, "followed");
        assert_eq!(gpu.nbytes(), built + 4 * (400 + 1024usize).div_ceil(32)); // + the live mask
        let sent = (uploaded() - before) as usize;
        // the 50 rows still to send, the live mask, and the three searches' queries and masks
        let searches = 3 * (3 * 8 * 4) + 4 * (1424usize.div_ceil(32)) * 2;
        assert!(
            sent <= 50 * row_bytes + searches,
            "{dtype:?}: {sent} bytes sent"
        );
        assert_eq!(gallery.search(probe.view(), 5).unwrap().indices.len(), 15);
        // removing most rows: a rebuild of just the live ones
        let old: Vec<i64> = gallery.ids()[..300].to_vec();
        remove(&mut gallery, &old);
        check(&gallery, "rebuilt");
        assert_eq!(gpu.nbytes(), (gallery.len() + 1024) * row_bytes);
    }
}

/// Waits for child `pid` (at most a minute: a hang fails the test) and gives its exit code.
fn exit_code(pid: libc::pid_t) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut status = 0;
        // SAFETY: our own child.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            };
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the forked child hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_forked_child_gets_the_fork_error_without_touching_the_parents_cuda_state() {
    use arcface_rs::cuda::{available, forked};
    use arcface_rs::error::ErrorKind;
    let _device = device();
    let emb = noise(12, 100, 16).mapv(|v| v as f32);
    let mut gallery = Gallery::new(16, Dtype::F16).unwrap();
    gallery.add(emb.view(), None).unwrap();
    let gpu = GpuSearch::default();
    let probe = emb.slice(ndarray::s![..3, ..]);
    let want = gallery.search(probe, 4).unwrap().indices;
    assert_eq!(
        gpu.search(&gallery, probe, 4, 0, None).unwrap().indices,
        want
    );
    let copy_bytes = gpu.nbytes();
    assert!(available() && !forked() && copy_bytes > 0);
    // forked while this thread holds the driver's lock (inside with_stream): a child that
    // took that lock would wait forever
    let child = with_stream(0, 0, |_| {
        // SAFETY: the child only runs the checks below and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let passed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert!(forked() && !available());
                let is_fork_error = |e: arcface_rs::Error| {
                    e.kind == ErrorKind::Device && e.message.contains("forked")
                };
                assert!(is_fork_error(with_stream(0, 0, |_| Ok(())).unwrap_err()));
                let err = gpu.search(&gallery, probe, 4, 0, None).unwrap_err();
                assert!(is_fork_error(err));
                assert_eq!(gpu.nbytes(), 0); // the parent's copy, not this process's memory
                assert_eq!(gallery.search(probe, 4).unwrap().indices, want); // the CPU's
            }))
            .is_ok();
            // SAFETY: leaves the child without running the parent's destructors.
            unsafe { libc::_exit(if passed { 0 } else { 1 }) };
        }
        Ok(pid)
    })
    .unwrap();
    assert_eq!(exit_code(child), 0, "the child's checks failed");
    assert!(!forked());
    assert_eq!(
        gpu.search(&gallery, probe, 4, 0, None).unwrap().indices,
        want
    );
    assert_eq!(gpu.nbytes(), copy_bytes);
}
