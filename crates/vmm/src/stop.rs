//! The host's request to stop a VM (console escape, SIGTERM), shared across VM rebuilds.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A request from the host side (console escape, SIGTERM) to stop the VM; survives rebuilds.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<(AtomicU8, EventFd)>,
}

impl StopHandle {
    /// A handle nobody has triggered.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new((AtomicU8::new(0), EventFd::new(EFD_NONBLOCK)?)),
        })
    }

    /// Ask the VM to stop as soon as possible.
    pub fn request_stop(&self) {
        self.inner.0.store(1, Ordering::SeqCst);
        let _ = self.inner.1.write(1);
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst) != 0
    }

    /// Readable once a stop was requested (for poll).
    pub fn event(&self) -> &EventFd {
        &self.inner.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stop_handle_request_is_seen_by_clones_and_event() {
        let stop = StopHandle::new().unwrap();
        let clone = stop.clone();

        clone.request_stop();

        assert!(stop.requested());
        assert_eq!(stop.event().read().unwrap(), 1);
    }
}
