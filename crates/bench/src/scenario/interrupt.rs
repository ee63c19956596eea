//! SIGINT/SIGTERM during a scenario that starts VMMs: a flag instead of the harness dying, so
//! the scenario stops after its current step and still kills its VMMs (some live in their own
//! sessions, out of reach of `PR_SET_PDEATHSIG`) and removes its directory.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT or SIGTERM arrived while a [`SignalGuard`] was installed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err("interrupted")` once SIGINT or SIGTERM arrived, for `?` between steps.
pub fn check_interrupted() -> Result<(), String> {
    if interrupted() {
        Err("interrupted".to_string())
    } else {
        Ok(())
    }
}

/// While alive, SIGINT/SIGTERM only set the flag [`interrupted`] reads.
pub struct SignalGuard;

impl SignalGuard {
    /// Catch SIGINT and SIGTERM until dropped.
    pub fn install() -> Self {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
        }
        SignalGuard
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the default disposition.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
        }
    }
}
