//! Getting a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::sync::Once;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte (null on non-vCPU threads).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    // Only a TLS read and a byte store: async-signal-safe.
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer was set by this very thread to its own mapped kvm_run, and is
            // cleared before that mapping goes away.
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

/// Install the kick handler (once per process).
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick);
    });
    result
}

/// Point this thread's kick handler at `immediate_exit` (or null to detach).
pub fn set_immediate_exit_ptr(ptr: *mut u8) {
    IMMEDIATE_EXIT.with(|p| p.set(ptr));
}

/// Send the kick signal to `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread of this process (its JoinHandle is held by the caller);
    // the signal has a handler installed, so it cannot kill the process.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
