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

use std::sync::{Arc, Mutex};

use pci::PciRoot;
use virtio::{VirtioDevice, VirtioPciDevice};
use vm_device::{GuestMemoryMmap, IoEventRegistrar};

use crate::config::VmConfig;
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

impl RunDevices {
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
