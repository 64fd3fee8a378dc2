//! A gate that `fork()` closes. Operations that hold shared state's locks while other
//! threads run (a Gallery's searches and changes, which release the GIL) pass through it,
//! and a fork waits until none is inside: a child forked in the middle of one would inherit
//! a lock held by a thread that does not exist in it, and wait on that lock forever.
//!
//! Python's `os.register_at_fork` closes the gate before a fork and opens it after, in the
//! parent and in the child (`arcface_rs/__init__.py`); a fork that bypasses those hooks (a
//! C library calling fork() itself) is not covered.

use std::cell::RefCell;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// The closed gate, held by the thread that forks, from [`close`] to [`open`] (the
    /// child's only thread is that same thread).
    static CLOSED: RefCell<Option<RwLockWriteGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// Enters the gate for one operation, until the guard drops. Operations do not wait for
/// each other, only for a fork in progress. Never nest two passes in one thread: a fork
/// waiting to close the gate holds back the inner one while the outer keeps it from closing.
pub fn pass() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(|e| e.into_inner())
}

/// Before a fork: waits for the operations inside to leave, then keeps new ones out. A
/// second call before [`open`] does nothing.
pub fn close() {
    CLOSED.with(|closed| {
        let mut closed = closed.borrow_mut();
        if closed.is_none() {
            *closed = Some(GATE.write().unwrap_or_else(|e| e.into_inner()));
        }
    });
}

/// After a fork, in the parent and in the child: lets operations in again.
pub fn open() {
    CLOSED.with(|closed| closed.borrow_mut().take());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn close_waits_for_the_operation_inside_and_open_lets_new_ones_in() {
        let inside = pass();
        let closed = Arc::new(AtomicBool::new(false));
        let closer = {
            let closed = closed.clone();
            std::thread::spawn(move || {
                close();
                closed.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                open();
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !closed.load(Ordering::SeqCst),
            "closed while an operation was inside"
        );
        drop(inside);
        while !closed.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        drop(pass()); // waits for the closer's open
        closer.join().unwrap();
        close();
        close(); // a second close is a no-op, not a self-deadlock
        open();
        drop(pass());
    }
}
