//! What a PCI function implements to sit on the [`crate::PciRoot`].

use crate::configuration::{PciConfiguration, PciConfigurationState};
use crate::PciError;

/// A PCI function (always function 0 of its slot here).
///
/// The root does the generic work — BAR allocation, moving BAR mappings on the MMIO bus when
/// the guest reprograms them, gating on memory decode — and calls into the device for what only
/// it knows. Every method must tolerate any guest-chosen offset and width without panicking.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &PciConfiguration;

    /// Mutable configuration space (the root programs BAR addresses at allocation).
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// The memory BARs this function declares (the root allocates and maps them).
    fn bars(&self) -> Vec<crate::configuration::BarInfo> {
        self.config().bars().to_vec()
    }

    /// Guest read of dword register `reg` (0..1024).
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of register `reg`.
    /// Devices override this to see writes to their capabilities (e.g. MSI-X enable).
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data)
    }

    /// Guest read inside BAR `bar` at byte `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Guest write inside BAR `bar` at byte `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` was unmapped from `old` and/or mapped at `new` (the guest moved it, or turned
    /// memory decode off/on). Devices with ioeventfds inside the BAR re-register them here.
    fn bar_moved(
        &mut self,
        bar: usize,
        old: Option<u64>,
        new: Option<u64>,
    ) -> Result<(), PciError> {
        let _ = (bar, old, new);
        Ok(())
    }

    /// Serialisable configuration space (device-specific state is exposed by the device type).
    fn config_state(&self) -> PciConfigurationState {
        self.config().state()
    }
}

/// The host bridge at 00:00.0: identity only, no BARs.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

/// Host bridge vendor ID (Intel).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Host bridge device ID (a generic Intel host bridge, as other VMMs use).
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

impl HostBridge {
    /// A fresh host bridge.
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new_host_bridge(HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
