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
        .thread_name(|i| format!("arcface_rs-{i}"))
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

/// Runs `work` in this process's pool: rayon's parallel iterators inside it use that pool.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    pool().install(work)
}

/// Threads of this process's pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn work_runs_in_the_library_pool() {
        let threads = num_threads();
        let inside = install(rayon::current_num_threads);
        assert_eq!(inside, threads);
        let sum: u64 = install(|| (0..10_000u64).into_par_iter().sum());
        assert_eq!(sum, 10_000 * 9_999 / 2);
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
