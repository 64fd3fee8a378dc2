use super::*;
use ndarray::array;

fn rows(n: usize, d: usize, seed: u64) -> Array2<f32> {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    Array2::from_shape_fn((n, d), |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    })
}

#[test]
fn every_dtype_finds_each_row_itself() {
    let emb = rows(300, 33, 1);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I8] {
        let mut g = Gallery::new(33, dtype).unwrap();
        let ids = g.add(emb.view(), None).unwrap();
        assert_eq!(ids.to_vec(), (0..300).collect::<Vec<i64>>());
        let r = g.search(emb.view(), 3).unwrap();
        for i in 0..300 {
            assert_eq!(r.indices[[i, 0]], i as i64, "{dtype}");
            assert!((r.scores[[i, 0]] - 1.0).abs() < 1e-2, "{dtype}");
        }
        let back = Gallery::from_parts(33, g.codes().clone(), g.ids().to_vec()).unwrap();
        assert_eq!(back.vectors(), g.vectors());
    }
}

#[test]
fn remove_keeps_order_and_ids() {
    let mut g = Gallery::new(2, Dtype::F32).unwrap();
    let emb = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]];
    g.add(emb.view(), Some(array![10i64, 20, 30].view()))
        .unwrap();
    assert!(g.add(emb.view(), Some(array![1i64, 2, 20].view())).is_err());
    assert_eq!(g.len(), 3);
    assert!(g.remove(array![20i64, 99].view()).is_err());
    assert_eq!(g.remove(array![20i64].view()).unwrap(), 1);
    assert_eq!(g.ids(), &[10, 30]);
    let next = g.add(array![[0.5f32, -1.0]].view(), None).unwrap();
    assert_eq!(next.to_vec(), vec![31]);
    let (ids, _) = g.identify(array![[0.0f32, 1.0]].view(), 0.9).unwrap();
    assert_eq!(ids.to_vec(), vec![-1]);
}
