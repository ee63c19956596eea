//! How a device (ACPI PM, i8042, reset register) or a vCPU asks the VMM to end or restart the VM.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM should stop running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShutdownKind {
    /// The guest powered itself off (ACPI S5): exit status 0.
    PowerOff = 1,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, triple fault).
    Reset = 2,
    /// The guest was migrated away: it runs on another host now, this VMM stops.
    Migrated = 3,
}

/// A one-shot, cloneable request to stop the VM; the first request wins.
/// The VMM's main loop waits on [`ShutdownSignal::event`].
#[derive(Clone)]
pub struct ShutdownSignal {
    inner: Arc<(AtomicU8, EventFd)>,
}

impl ShutdownSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new((AtomicU8::new(0), EventFd::new(EFD_NONBLOCK)?)),
        })
    }

    /// Ask for the VM to stop; later requests do not override the first.
    pub fn request(&self, kind: ShutdownKind) {
        if self
            .inner
            .0
            .compare_exchange(0, kind as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // A failed eventfd write only delays the wake-up; the flag is already set.
            let _ = self.inner.1.write(1);
        }
    }

    /// The request made so far, if any.
    pub fn requested(&self) -> Option<ShutdownKind> {
        match self.inner.0.load(Ordering::SeqCst) {
            1 => Some(ShutdownKind::PowerOff),
            2 => Some(ShutdownKind::Reset),
            3 => Some(ShutdownKind::Migrated),
            _ => None,
        }
    }

    /// Readable once a request was made (for epoll).
    pub fn event(&self) -> &EventFd {
        &self.inner.1
    }
}
