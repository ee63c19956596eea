//! Raw terminal mode for the serial console, restored on every way out: normal return, error,
//! panic (hook), and SIGINT/SIGTERM/SIGHUP (the signal thread restores before exiting).

use std::sync::Mutex;

/// The settings to restore, shared with the panic hook and the signal thread.
static SAVED: Mutex<Option<(libc::c_int, libc::termios)>> = Mutex::new(None);

/// Whether `fd` is a terminal.
pub fn is_tty(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts a terminal in raw mode for as long as it lives.
pub struct RawMode(());

impl RawMode {
    /// Switch `fd` to raw input (no echo, no line editing, no signals from keys) while keeping
    /// output post-processing so `\n` still returns the carriage.
    pub fn enable(fd: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios.
        if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, original));
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = std::io::Error::last_os_error();
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Err(err);
        }
        Ok(Self(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Restore the saved terminal settings, if any (idempotent; safe from any thread).
pub fn restore() {
    let saved = match SAVED.try_lock() {
        Ok(mut g) => g.take(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some((fd, termios)) = saved {
        // SAFETY: restoring settings previously read from the same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

/// Make panics restore the terminal before the message is printed, whether or not the panic
/// later unwinds far enough for Drop to run.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        default(info);
    }));
}
