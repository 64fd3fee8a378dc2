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
