//! Sizes taken from the caller, checked before anything is allocated.
//!
//! A `k` (or rank) beyond the gallery pads its results, so a careless `k=10**12` would ask
//! for terabytes of padding: the process would abort in the allocator or page for minutes.
//! Every such size is checked here first, in constant time.

use crate::error::{Error, Result};

/// Below this an output is allocated without asking the system how much memory is free.
const ALWAYS_FITS: u128 = 256 << 20;

/// Bytes of memory the system can give this process now (Linux: MemAvailable), or None
/// where that is not known.
fn available_memory() -> Option<u128> {
    #[cfg(target_os = "linux")]
    {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Bytes of address space this process may still map under its `RLIMIT_AS` (`ulimit -v`),
/// or None when there is no such limit (or it is not known).
fn address_space_left() -> Option<u128> {
    #[cfg(target_os = "linux")]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the one struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
            || lim.rlim_cur == libc::RLIM_INFINITY
        {
            return None;
        }
        // /proc/self/statm: the first field is the mapped size in pages
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u128 = statm.split_whitespace().next()?.parse().ok()?;
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u128;
        Some((lim.rlim_cur as u128).saturating_sub(pages * page))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// What one buffer may take now: half the memory available, within the address space
/// left and the largest object Rust can allocate.
fn limit_now() -> u128 {
    let memory = available_memory().map_or(isize::MAX as u128, |m| m / 2);
    let space = address_space_left().map_or(u128::MAX, |s| s / 2);
    memory.min(space).min(isize::MAX as u128)
}

/// The limit `bytes` exceeds (see [`limit_now`]), if it does.
fn beyond_limit(bytes: u128) -> Option<u128> {
    if bytes <= ALWAYS_FITS {
        return None;
    }
    let limit = limit_now();
    (bytes > limit).then_some(limit)
}

/// Refuses buffers of `bytes` in all (described by `what`, sized by the caller's argument
/// `arg`) that this process cannot allocate now: a `MemoryError` in Python, raised before
/// anything is allocated, instead of an abort in the allocator or the out-of-memory killer.
pub fn check_memory(arg: &'static str, bytes: u128, what: &str) -> Result<()> {
    match beyond_limit(bytes) {
        Some(limit) => Err(Error::out_of_memory(arg, what, bytes, Some(limit))),
        None => Ok(()),
    }
}

/// `n` values of `T`, each `value`, allocated fallibly: an allocation the system refuses
/// (an address-space limit the check above could not see, say) is a `MemoryError` naming
/// `arg` rather than an abort.
pub fn filled<T: Clone>(arg: &'static str, n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    reserve(arg, &mut v, n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// Room for `extra` more values in `v`, reserved fallibly (see [`filled`]).
pub fn reserve<T>(arg: &'static str, v: &mut Vec<T>, extra: usize, what: &str) -> Result<()> {
    let bytes = (v.len() as u128 + extra as u128) * std::mem::size_of::<T>() as u128;
    check_memory(arg, bytes, what)?;
    v.try_reserve_exact(extra)
        .map_err(|_| Error::out_of_memory(arg, what, bytes, None))
}

/// Refuses `k` when `rows` result rows of `k` entries, `entry_bytes` each, would need more
/// than half the memory available now (or more than the address space can hold).
pub fn check_results(arg: &'static str, k: usize, rows: usize, entry_bytes: usize) -> Result<()> {
    let bytes = (rows as u128) * (k as u128) * (entry_bytes as u128);
    if let Some(limit) = beyond_limit(bytes) {
        return Err(Error::invalid(
            arg,
            format!(
                "{k} results for each of {rows} queries would need {:.3e} bytes of output \
                 (padded past the gallery's rows), more than half the memory available \
                 ({:.3e} bytes); ask for fewer",
                bytes as f64, limit as f64
            ),
        ));
    }
    Ok(())
}

/// Refuses a working buffer of `bytes` (described by `what`) beyond half the memory
/// available now, naming `arg`, the caller's argument that sized it.
pub fn check_bytes(arg: &'static str, bytes: u128, what: &str) -> Result<()> {
    if let Some(limit) = beyond_limit(bytes) {
        return Err(Error::invalid(
            arg,
            format!(
                "{what} would need {:.3e} bytes, more than half the memory available \
                 ({:.3e} bytes)",
                bytes as f64, limit as f64
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_beyond_memory_are_out_of_memory_errors() {
        let err = check_memory("weight", 1 << 80, "the gradient").unwrap_err();
        assert_eq!(err.kind, crate::error::ErrorKind::OutOfMemory);
        assert_eq!(err.arg, "weight");
        assert!(check_memory("weight", 1 << 20, "the gradient").is_ok());
        let err = filled("emb", usize::MAX / 2, 0u8, "rows").unwrap_err();
        assert_eq!(err.kind, crate::error::ErrorKind::OutOfMemory);
        assert_eq!(filled("emb", 3, 7u8, "rows").unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn huge_k_is_refused_and_small_k_passes() {
        assert!(check_results("k", 10, 1000, 12).is_ok());
        let err = check_results("k", usize::MAX, 1, 12).unwrap_err();
        assert_eq!(err.arg, "k");
        assert!(check_results("k", 1 << 40, 1, 12).is_err());
    }
}
