//! The control socket's handle on one running VM instance: pause/resume, power button, reboot
//! and per-vCPU statistics (see [`crate::control::VmOps`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::AcpiPm;
use serde_json::{json, Value};
use virtio::VirtioPciDevice;
use vm_device::{ShutdownKind, ShutdownSignal};

use crate::control::VmOps;
use crate::stats::ExitCounters;
use crate::vcpu::RunControl;

/// How long `pause` waits for the vCPUs to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One vCPU as the control socket sees it.
pub struct LiveVcpu {
    /// vCPU index.
    pub id: u32,
    /// Its thread, for kicks. Valid while the instance is in the live slot: the VM clears
    /// the slot (waiting for any running operation) before it joins the threads.
    pub thread: libc::pthread_t,
    /// Kernel thread id (0 until the thread started).
    pub tid: Arc<AtomicI32>,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
}

/// What the control socket holds of a running VM instance.
pub struct LiveVm {
    /// vCPU coordination.
    pub control: Arc<RunControl>,
    /// The vCPUs.
    pub vcpus: Vec<LiveVcpu>,
    /// Virtio functions (their workers are paused with the vCPUs).
    pub virtio_devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// The ACPI PM block (power button).
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// Where the reset request goes.
    pub shutdown: ShutdownSignal,
    /// Whether `pause` is in effect.
    pub paused: AtomicBool,
}

impl LiveVm {
    fn resume_devices(&self) -> Result<(), (&'static str, String)> {
        let mut first_err = None;
        for dev in &self.virtio_devices {
            if let Err(e) = dev.lock().unwrap_or_else(|e| e.into_inner()).resume() {
                first_err.get_or_insert(("device-error", format!("Cannot resume a device: {e}")));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// CPU time of thread `tid` in ns: the first field of `/proc/self/task/TID/schedstat`.
fn cpu_ns(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

impl VmOps for LiveVm {
    fn pause(&self) -> Result<(), (&'static str, String)> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.control.request_pause();
        let kick = || {
            for v in &self.vcpus {
                crate::kick::kick(v.thread);
            }
        };
        if !self
            .control
            .wait_parked_timeout(self.vcpus.len(), PAUSE_TIMEOUT, kick)
        {
            self.control.resume();
            return Err((
                "timeout",
                format!(
                    "The vCPUs did not stop within {} s; the VM keeps running",
                    PAUSE_TIMEOUT.as_secs()
                ),
            ));
        }
        for (i, dev) in self.virtio_devices.iter().enumerate() {
            if let Err(e) = dev.lock().unwrap_or_else(|e| e.into_inner()).pause() {
                // Undo: the VM keeps running.
                for d in &self.virtio_devices[..i] {
                    let _ = d.lock().unwrap_or_else(|e| e.into_inner()).resume();
                }
                self.control.resume();
                return Err(("device-error", format!("Cannot pause a device: {e}")));
            }
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> Result<(), (&'static str, String)> {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let devices = self.resume_devices();
        self.control.resume();
        devices
    }

    fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn power_button(&self) -> bool {
        self.acpi_pm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .press_power_button()
    }

    fn reboot(&self) {
        self.shutdown.request(ShutdownKind::Reset);
    }

    fn vcpus(&self) -> Value {
        self.vcpus
            .iter()
            .map(|v| {
                let tid = v.tid.load(Ordering::SeqCst);
                let exits: BTreeMap<&str, u64> = v.counters.snapshot().into_iter().collect();
                json!({
                    "id": v.id,
                    "tid": tid,
                    "cpu_ns": if tid > 0 { cpu_ns(tid) } else { None },
                    "exits": exits,
                })
            })
            .collect()
    }
}

impl Drop for LiveVm {
    /// A VM torn down while paused: let the device workers run again so they can be stopped.
    fn drop(&mut self) {
        if self.paused.load(Ordering::SeqCst) {
            let _ = self.resume_devices();
        }
    }
}
