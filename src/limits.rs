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

/// The limit `bytes` exceeds (half the memory available now, or the address space), if it
/// does.
fn beyond_limit(bytes: u128) -> Option<u128> {
    if bytes <= ALWAYS_FITS {
        return None;
    }
    let limit = available_memory().map_or(isize::MAX as u128, |m| m / 2);
    (bytes > limit.min(isize::MAX as u128)).then_some(limit)
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
    fn huge_k_is_refused_and_small_k_passes() {
        assert!(check_results("k", 10, 1000, 12).is_ok());
        let err = check_results("k", usize::MAX, 1, 12).unwrap_err();
        assert_eq!(err.arg, "k");
        assert!(check_results("k", 1 << 40, 1, 12).is_err());
    }
}
