//! SIGINT/SIGTERM/SIGHUP/SIGQUIT: blocked in every thread and received by one thread with
//! `sigwait`, which stops the VM cleanly (the main thread restores the terminal and exits).

use std::sync::atomic::{AtomicI32, Ordering};

use vmm::StopHandle;

/// The signals that stop the VM.
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The stop signal received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block the stop signals in this thread (call before spawning any thread, so all inherit the
/// mask) and start the thread that waits for them.
pub fn install(stop: StopHandle) -> std::io::Result<()> {
    let set = stop_set();
    // SAFETY: valid sigset; changes only this thread's mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("ferrite-signals".into())
        .stack_size(64 << 10)
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: valid sigset and out pointer; the signals are blocked in every thread.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            let first = RECEIVED
                .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if first {
                stop.request_stop();
            } else {
                // A second signal while stopping: give up on a clean stop.
                crate::terminal::restore();
                std::process::exit(crate::cli::exit::STOPPED);
            }
        })?;
    Ok(())
}

/// The name of the stop signal received, if any.
pub fn received() -> Option<&'static str> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        libc::SIGQUIT => Some("SIGQUIT"),
        _ => Some("a signal"),
    }
}
