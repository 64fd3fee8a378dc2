//! The library's own thread pool, rebuilt in a child process after `fork()`.
//!
//! rayon's global pool cannot survive a fork: the child inherits the pool's queues but none
//! of its worker threads, so the first parallel call in the child waits forever (this is how
//! multiprocessing "fork" pools and PyTorch DataLoader workers start). Every entry point of
//! the bindings therefore runs its work inside [`install`], which uses a pool that belongs
//! to the current process id: a forked child sees a different pid and builds a fresh pool of
//! its own (the parent's is left alone, its memory in the child never touched again).
//! The pool size follows `RAYON_NUM_THREADS` as rayon's global pool does.

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::Mutex;

/// The pool of the process that built it. Pools are never freed: one per process that used
/// the library (the parent's copy in a child is dead memory, unsafe to drop there).
static POOL: Mutex<Option<(u32, &'static ThreadPool)>> = Mutex::new(None);

fn current() -> Option<&'static ThreadPool> {
    let pid = std::process::id();
    let guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match *guard {
        Some((owner, pool)) if owner == pid => Some(pool),
        _ => None,
    }
}

/// This process's pool, built on first use (and again in a forked child).
pub fn pool() -> &'static ThreadPool {
    if let Some(pool) = current() {
        return pool;
    }
    // Built outside the lock: spawning threads takes a while, and a fork in another thread
    // while the lock were held would leave the child's copy locked for good.
    let built = ThreadPoolBuilder::new()
        .num_threads(threads())
        .thread_name(|i| format!("arcface_rs-{i}"))
        .start_handler(|_| keep_denormals())
        .build()
        .unwrap_or_else(|e| panic!("cannot start the thread pool: {e}"));
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match *guard {
        // another thread of this process won the race; its pool serves, ours is dropped
        Some((owner, pool)) if owner == pid => pool,
        _ => {
            let pool: &'static ThreadPool = Box::leak(Box::new(built));
            *guard = Some((pid, pool));
            pool
        }
    }
}

/// Most threads per CPU the pool starts: `RAYON_NUM_THREADS` above this many times the
/// CPUs is capped (a typo like 100000 would otherwise start 100000 threads and make every
/// small call take minutes). Above one per CPU the threads only take turns.
pub const MAX_THREADS_PER_CPU: usize = 4;

/// The CPUs this process may run on.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The pool's size: `RAYON_NUM_THREADS` when set to a positive number (as rayon reads it),
/// else one thread per CPU; never above [`MAX_THREADS_PER_CPU`] per CPU.
pub fn threads() -> usize {
    let asked = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    let cap = MAX_THREADS_PER_CPU * cpus();
    asked.unwrap_or_else(cpus).min(cap)
}

/// Turns off flush-to-zero and denormals-are-zero on this thread.
///
/// A new thread inherits the floating-point mode of the thread that starts it, and some
/// libraries set these modes for speed (`torch.set_flush_denormal(True)`, or code compiled
/// with fast-math): a denormal input would then read as zero and a valid row be called
/// "all zeros". The library's threads compute in IEEE arithmetic whatever their creator did.
fn keep_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        const FLUSH_TO_ZERO: u32 = 1 << 15;
        const DENORMALS_ARE_ZERO: u32 = 1 << 6;
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr read and write this thread's SSE control register only;
        // clearing the two mode bits keeps every other setting.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr &= !(FLUSH_TO_ZERO | DENORMALS_ARE_ZERO);
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
        }
    }
}

/// Runs `work` in this process's pool: rayon's parallel iterators inside it use that pool.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    pool().install(work)
}

/// Threads of this process's pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Folds a parallel iterator in a fixed number of groups of consecutive items (four per
/// thread), each group with an accumulator of its own, folded in order, and merges the
/// groups' accumulators in order (`new()` if there were no items).
///
/// rayon's own `fold` makes an accumulator per piece it splits the work into, and over a
/// few dozen items (the head's class tiles) that is one per item: with accumulators that
/// hold a batch-sized buffer, that is 20 MB zeroed and 10 MB summed per step at 10k classes.
/// The groups do not depend on which thread ran what, so neither do the sums: a call
/// repeated gives the same bits (for a given thread count).
pub(crate) fn fold_in_groups<I, A>(
    items: I,
    new: impl Fn() -> A + Sync,
    step: impl Fn(A, I::Item) -> A + Sync,
    merge: impl Fn(A, A) -> A,
) -> A
where
    I: rayon::iter::IndexedParallelIterator,
    I::Item: Send,
    A: Send,
{
    use rayon::iter::ParallelIterator;
    let groups = 4 * rayon::current_num_threads().max(1);
    let per_group = items.len().div_ceil(groups).max(1);
    let parts: Vec<A> = items
        .chunks(per_group)
        .map(|group| group.into_iter().fold(new(), &step))
        .collect();
    parts.into_iter().reduce(merge).unwrap_or_else(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn fold_in_groups_makes_few_accumulators_and_repeats_its_sums_exactly() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let made = AtomicUsize::new(0);
        let values: Vec<f64> = (0..1000).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let sum = || {
            install(|| {
                fold_in_groups(
                    values.par_iter(),
                    || {
                        made.fetch_add(1, Ordering::Relaxed);
                        (0.0f64, 0usize)
                    },
                    |(s, n), &v| (s + v, n + 1),
                    |a, b| (a.0 + b.0, a.1 + b.1),
                )
            })
        };
        let first = sum();
        assert_eq!(first.1, 1000);
        assert!((first.0 - values.iter().sum::<f64>()).abs() < 1e-12);
        assert!(made.load(Ordering::Relaxed) <= 4 * num_threads());
        for _ in 0..20 {
            assert_eq!(sum().0.to_bits(), first.0.to_bits());
        }
        // no items: the merge of nothing is a fresh accumulator
        let empty = install(|| {
            fold_in_groups(
                (0..0u32).into_par_iter(),
                || 7u64,
                |a, v| a + u64::from(v),
                |a, b| a + b,
            )
        });
        assert_eq!(empty, 7);
    }

    #[test]
    fn work_runs_in_the_library_pool() {
        let threads = num_threads();
        let inside = install(rayon::current_num_threads);
        assert_eq!(inside, threads);
        let sum: u64 = install(|| (0..10_000u64).into_par_iter().sum());
        assert_eq!(sum, 10_000 * 9_999 / 2);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pool_threads_keep_denormals_whatever_their_creator_set() {
        // Flush denormals on this thread, then start a pool from it (a fresh pool, not the
        // shared one, so other tests are not affected).
        let read = || {
            let mut csr: u32 = 0;
            unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
            csr
        };
        let saved = read();
        let flushing = saved | (1 << 15) | (1 << 6);
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &flushing, options(nostack)) };
        let pool = ThreadPoolBuilder::new()
            .num_threads(1)
            .start_handler(|_| keep_denormals())
            .build()
            .unwrap();
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &saved, options(nostack)) };
        let tiny = std::hint::black_box(1e-40f32);
        let kept = pool.install(|| std::hint::black_box(tiny) * 2.0);
        // doubling a denormal is exact; flushed, it would read (and give) zero
        assert!(kept != 0.0);
        assert_eq!(kept.to_bits(), (tiny + tiny).to_bits());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_forked_child_gets_a_pool_of_its_own() {
        let before: u64 = install(|| (0..1000u64).into_par_iter().sum());
        // SAFETY: the child only runs the library's own code and then _exit()s; it never
        // returns into the test harness.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let sum: u64 = install(|| (0..1000u64).into_par_iter().sum());
            unsafe { libc::_exit(if sum == before { 0 } else { 1 }) };
        }
        let mut status = 0;
        // A hang here would be the bug; the harness's timeout catches it.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(waited, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
