//! Auto-converge: hold the vCPUs back for a share of every period, so a guest that dirties
//! memory faster than the link carries it dirties less.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::live::LiveVm;

/// One throttle period: the vCPUs are parked for `pct`% of it.
const PERIOD: Duration = Duration::from_millis(20);

/// A running throttle; stopped (vCPUs running freely) when dropped.
pub struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Start holding `vm`'s vCPUs back `pct`% of the time (0: not at all).
    pub fn start(vm: Arc<LiveVm>, pct: u32) -> std::io::Result<Self> {
        let pct = Arc::new(AtomicU32::new(pct.min(99)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("migrate-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let share = p.load(Ordering::SeqCst);
                    if share == 0 {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    let held = PERIOD * share / 100;
                    vm.hold_vcpus(held);
                    std::thread::sleep(PERIOD.saturating_sub(held));
                }
            })?;
        Ok(Self {
            pct,
            stop,
            thread: Some(thread),
        })
    }

    /// Change the share.
    pub fn set(&self, pct: u32) {
        self.pct.store(pct.min(99), Ordering::SeqCst);
    }

    /// The current share, percent.
    pub fn pct(&self) -> u32 {
        self.pct.load(Ordering::SeqCst)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
