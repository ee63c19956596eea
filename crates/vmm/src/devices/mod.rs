//! Per-device wiring of the virtio devices beyond the disks.
//!
//! Each device kind has one module here with the same shape:
//! - `XConfig`: what the user asked for (parsed from the CLI syntax by `XConfig::parse`,
//!   checked by `XConfig::validate`, serialisable so the daemon and snapshots can store it);
//! - `OpenX` and `open(&XConfig, ..)`: host resources opened once per run (a TAP device, a
//!   listening socket, handles the control socket reaches). They survive guest reboots, which
//!   rebuild the VM in-process;
//! - `attach(&OpenX, &AttachContext)`: create the device model for one VM instance and plug
//!   it into PCI bus 0.

pub mod balloon;
pub mod console;
pub mod net;
pub mod rng;
pub mod vsock;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rate_limiter::SharedRateLimiter;

use pci::PciRoot;
use virtio::{VirtioDevice, VirtioPciDevice};
use vm_device::{GuestMemoryMmap, IoEventRegistrar};

use crate::config::VmConfig;
use crate::control::{BalloonControl, StatsFn};
use crate::error::VmmError;
use crate::gsi::GsiRouter;

/// What a device needs to be plugged into a freshly built VM.
pub struct AttachContext<'a> {
    /// PCI bus 0.
    pub pci: &'a PciRoot,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// MSI routing (irqfds).
    pub router: &'a Arc<GsiRouter>,
    /// Doorbell (ioeventfd) registration.
    pub ioevents: &'a Arc<dyn IoEventRegistrar>,
}

impl AttachContext<'_> {
    /// Wrap `device` in the virtio-pci transport and add it to bus 0. `what` names the device
    /// in errors ("net0", "vsock").
    pub fn plug(
        &self,
        what: &str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
        let dev = VirtioPciDevice::new(
            device,
            self.mem.clone(),
            self.router.clone(),
            self.ioevents.clone(),
        )
        .map_err(|source| VmmError::DeviceSetup {
            device: what.to_string(),
            source,
        })?;
        let dev = Arc::new(Mutex::new(dev));
        self.pci.add_device(dev.clone()).map_err(VmmError::Pci)?;
        Ok(dev)
    }
}

/// Host resources of every non-disk device, opened once per run.
pub struct RunDevices {
    /// One per `--net`, in order.
    pub nets: Vec<net::OpenNet>,
    /// `--vsock`.
    pub vsock: Option<vsock::OpenVsock>,
    /// `--rng`.
    pub rng: Option<rng::OpenRng>,
    /// `--balloon`.
    pub balloon: Option<balloon::OpenBalloon>,
    /// `--virtio-console`.
    pub console: Option<console::OpenConsole>,
}

/// What the control socket reaches of the run's devices; they live as long as the run, so
/// the handles stay valid across guest reboots.
#[derive(Default)]
pub struct ControlHandles {
    /// Rate limiters by name (`net0.rx`, `net0.tx`, `rng`).
    pub limiters: BTreeMap<String, SharedRateLimiter>,
    /// Counters by device name (`net0`, `vsock`, `rng`, `console`).
    pub stats: BTreeMap<String, StatsFn>,
    /// The balloon, if the VM has one.
    pub balloon: Option<Arc<dyn BalloonControl>>,
}

/// A [`StatsFn`] reading `snapshot` of shared counters as JSON.
pub fn stats_fn<M, S>(metrics: &Arc<M>, snapshot: fn(&M) -> S) -> StatsFn
where
    M: Send + Sync + 'static,
    S: serde::Serialize + 'static,
{
    let metrics = metrics.clone();
    Box::new(move || serde_json::to_value(snapshot(&metrics)).unwrap_or_default())
}

impl RunDevices {
    /// The handles the control socket needs: limiters, counters and the balloon.
    pub fn control_handles(&self) -> ControlHandles {
        let mut h = ControlHandles::default();
        for (i, n) in self.nets.iter().enumerate() {
            h.stats
                .insert(format!("net{i}"), stats_fn(&n.metrics, |m| m.snapshot()));
            h.limiters
                .insert(format!("net{i}.rx"), n.rx_limiter.clone());
            h.limiters
                .insert(format!("net{i}.tx"), n.tx_limiter.clone());
        }
        if let Some(v) = &self.vsock {
            h.stats
                .insert("vsock".into(), stats_fn(&v.metrics, |m| m.snapshot()));
        }
        if let Some(r) = &self.rng {
            h.stats
                .insert("rng".into(), stats_fn(&r.metrics, |m| m.snapshot()));
            h.limiters.insert("rng".into(), r.limiter.clone());
        }
        if let Some(c) = &self.console {
            h.stats
                .insert("console".into(), stats_fn(&c.metrics, |m| m.snapshot()));
        }
        h.balloon = self.balloon.as_ref().and_then(balloon::control);
        h
    }

    /// Handles on the TAP queues a live migration can hand over (multiqueue TAPs).
    pub fn handover_taps(&self) -> Vec<::net::Tap> {
        self.nets
            .iter()
            .filter(|n| n.tap.multi_queue())
            .filter_map(|n| match n.tap.try_clone() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("{}: cannot duplicate the TAP descriptor: {e}", n.device);
                    None
                }
            })
            .collect()
    }

    /// Open everything `config` asks for.
    pub fn open(config: &VmConfig) -> Result<Self, VmmError> {
        let nets = config
            .nets
            .iter()
            .enumerate()
            .map(|(i, c)| net::open(c, i, config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            nets,
            vsock: config.vsock.as_ref().map(vsock::open).transpose()?,
            rng: config.rng.as_ref().map(rng::open).transpose()?,
            balloon: config.balloon.as_ref().map(balloon::open).transpose()?,
            console: config
                .virtio_console
                .as_ref()
                .map(console::open)
                .transpose()?,
        })
    }

    /// Plug every device into a new VM instance (after the disks, in a fixed order so PCI
    /// slots are stable: nets, vsock, rng, balloon, console).
    pub fn attach_all(
        &self,
        ctx: &AttachContext<'_>,
    ) -> Result<Vec<Arc<Mutex<VirtioPciDevice>>>, VmmError> {
        let mut out = Vec::new();
        for n in &self.nets {
            out.push(net::attach(n, ctx)?);
        }
        if let Some(v) = &self.vsock {
            out.push(vsock::attach(v, ctx)?);
        }
        if let Some(r) = &self.rng {
            out.push(rng::attach(r, ctx)?);
        }
        if let Some(b) = &self.balloon {
            out.push(balloon::attach(b, ctx)?);
        }
        if let Some(c) = &self.console {
            out.push(console::attach(c, ctx)?);
        }
        Ok(out)
    }
}
