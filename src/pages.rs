//! Asking Linux for 2 MiB pages behind large buffers.
//!
//! Large buffers that are streamed through (the head's gradient, a gallery's vectors) run
//! faster on huge pages: fewer TLB misses while reading them and fewer faults while first
//! writing them. The advice only affects pages not yet touched, so it is given right after
//! allocating and before writing.

/// Advises huge pages for the whole allocation of `buf` (its capacity, not only its
/// length). Only a hint: where transparent huge pages are off, nothing changes.
pub(crate) fn advise_huge<T>(buf: &Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let end = start + buf.capacity() * std::mem::size_of::<T>();
        let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `buf`'s allocation; MADV_HUGEPAGE changes no
            // contents. Failure (THP disabled) is harmless and ignored.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Makes room for `extra` more values in `v`; when it must grow, the new allocation gets
/// the huge-page advice before the old values are copied in. Fallible: when the system
/// cannot give the memory, `v` is left as it was.
pub(crate) fn reserve_huge<T: Copy>(
    v: &mut Vec<T>,
    extra: usize,
) -> Result<(), std::collections::TryReserveError> {
    let need = v.len().saturating_add(extra);
    if need <= v.capacity() {
        return Ok(());
    }
    let mut grown = Vec::new();
    // doubling keeps appends amortised; when the double cannot be had, exactly what is needed
    if grown.try_reserve_exact(need.max(2 * v.capacity())).is_err() {
        grown.try_reserve_exact(need)?;
    }
    advise_huge(&grown);
    grown.extend_from_slice(v);
    *v = grown;
    Ok(())
}

/// Buffers at least this large come from fresh pages (glibc maps them on their own and
/// unmaps them when freed); below it they come from the heap.
pub(crate) const FRESH_PAGES_FROM: usize = 32 << 20;

/// The largest buffers the library hands out (the weight gradient: 205 MB at 100k classes,
/// float32) are mapped fresh on every call and freed by the caller soon after, so every
/// call paid the kernel's zeroing of every page inside the GEMM that first wrote it (15%
/// of a head step on a 2-vCPU Xeon, more in a VM). Once the caller drops such a buffer (its
/// NumPy array or tensor), it is kept here, at most [`SHELF_BUFFERS`] per float type, and
/// the next call of a fitting size reuses it: its pages are mapped already, so clearing
/// them is a plain parallel memset.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) const SHELF_BUFFERS: usize = 2;

/// The float types whose large buffers are kept for reuse.
pub trait Recycled: Copy + Send + Sync + 'static {
    fn shelf() -> &'static std::sync::Mutex<Vec<Vec<Self>>>;
}

impl Recycled for f32 {
    fn shelf() -> &'static std::sync::Mutex<Vec<Vec<Self>>> {
        static SHELF: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
        &SHELF
    }
}

impl Recycled for f64 {
    fn shelf() -> &'static std::sync::Mutex<Vec<Vec<Self>>> {
        static SHELF: std::sync::Mutex<Vec<Vec<f64>>> = std::sync::Mutex::new(Vec::new());
        &SHELF
    }
}

/// Keeps `buf` for reuse if it is large (else frees it); the oldest kept buffer goes when
/// the shelf is full. `try_lock`: a lock held by a thread that did not survive a `fork()`
/// never blocks (the buffer is then simply freed).
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn give_back<T: Recycled>(mut buf: Vec<T>) {
    if buf.capacity() * std::mem::size_of::<T>() < FRESH_PAGES_FROM {
        return;
    }
    if let Ok(mut shelf) = T::shelf().try_lock() {
        buf.clear();
        if shelf.len() == SHELF_BUFFERS {
            shelf.remove(0);
        }
        shelf.push(buf);
    }
}

/// A kept buffer (empty, with room for `n` values and at most twice that) if there is one.
pub(crate) fn take<T: Recycled>(n: usize) -> Option<Vec<T>> {
    let mut shelf = T::shelf().try_lock().ok()?;
    let at = shelf
        .iter()
        .position(|b| b.capacity() >= n && b.capacity() / 2 <= n)?;
    Some(shelf.swap_remove(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_given_back_are_taken_again_and_small_ones_are_not_kept() {
        let n = FRESH_PAGES_FROM / 8 + 5; // f64: just above the threshold
        let buf = vec![1.0f64; n];
        let at = buf.as_ptr();
        give_back(buf);
        let again = take::<f64>(n).expect("kept");
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        assert!(take::<f64>(n / 3).is_none()); // nothing left, and never a buffer 2x too big
        give_back(again);
        assert!(take::<f64>(n / 3).is_none());
        assert!(take::<f64>(n).is_some());
        give_back(vec![0.0f64; 16]);
        assert!(take::<f64>(16).is_none());
    }
}
