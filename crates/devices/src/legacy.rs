//! All legacy devices of a Ferrite VM as one bundle: built together, inserted on the port-I/O
//! bus at the layout's ports in one call, saved and restored as one serde struct.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use arch::layout::ports;
use vm_device::{Bus, BusError, LegacyIrq, SharedDevice, ShutdownSignal};

use crate::acpi_pm::{
    AcpiPm, AcpiPmMetrics, AcpiPmState, AcpiResetMetrics, AcpiResetRegister, AcpiResetState,
    ACPI_PM_BLOCK_LEN, ACPI_RESET_LEN,
};
use crate::cmos::{Cmos, CmosMemory, CmosMetrics, CmosState, CMOS_PORT_LEN};
use crate::debug_port::{
    DebugPort, DebugPortMetrics, DebugPortState, POST_CODE_PORT, POST_CODE_PORT_LEN,
};
use crate::error::DeviceError;
use crate::i8042::{I8042Metrics, I8042State, I8042, I8042_PORT_LEN};
use crate::serial::{Serial, SerialMetrics, SerialState, SERIAL_PORT_LEN};

/// The interrupt lines the legacy devices raise. The VMM creates each eventfd and binds it with
/// irqfd to the GSI before handing it over.
pub struct LegacyIrqs {
    /// GSI 1 (`irqs::KEYBOARD`).
    pub keyboard: LegacyIrq,
    /// GSI 4 (`irqs::COM1`).
    pub com1: LegacyIrq,
    /// GSI 9 (`irqs::ACPI_SCI`).
    pub acpi_sci: LegacyIrq,
}

/// Every legacy device, each behind the mutex the bus locks, so the VMM can also reach them
/// (serial input, power button) from its own threads.
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// i8042 keyboard controller (reset through 0xfe).
    pub i8042: Arc<Mutex<I8042>>,
    /// CMOS/RTC.
    pub cmos: Arc<Mutex<Cmos>>,
    /// ACPI PM1a blocks and PM timer (power off, power button).
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// ACPI reset register.
    pub acpi_reset: Arc<Mutex<AcpiResetRegister>>,
    /// POST-code port 0x80.
    pub debug_port: Arc<Mutex<DebugPort>>,
}

/// Snapshot of every legacy device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LegacyDevicesState {
    /// COM1.
    pub serial: SerialState,
    /// i8042.
    pub i8042: I8042State,
    /// CMOS/RTC.
    pub cmos: CmosState,
    /// ACPI PM1a blocks and timer.
    pub acpi_pm: AcpiPmState,
    /// ACPI reset register.
    pub acpi_reset: AcpiResetState,
    /// POST-code port.
    pub debug_port: DebugPortState,
}

/// Handles on every legacy device's counters (read without locking the devices). Serialises as
/// one object of per-device counter objects.
#[derive(Debug, Clone)]
pub struct LegacyMetrics {
    /// COM1.
    pub serial: Arc<SerialMetrics>,
    /// i8042.
    pub i8042: Arc<I8042Metrics>,
    /// CMOS/RTC.
    pub cmos: Arc<CmosMetrics>,
    /// ACPI PM1a blocks and timer.
    pub acpi_pm: Arc<AcpiPmMetrics>,
    /// ACPI reset register.
    pub acpi_reset: Arc<AcpiResetMetrics>,
    /// POST-code port.
    pub debug_port: Arc<DebugPortMetrics>,
}

impl serde::Serialize for LegacyMetrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("LegacyMetrics", 6)?;
        s.serialize_field("serial", &*self.serial)?;
        s.serialize_field("i8042", &*self.i8042)?;
        s.serialize_field("cmos", &*self.cmos)?;
        s.serialize_field("acpi_pm", &*self.acpi_pm)?;
        s.serialize_field("acpi_reset", &*self.acpi_reset)?;
        s.serialize_field("debug_port", &*self.debug_port)?;
        s.end()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LegacyDevices {
    /// Build every device in its power-on state. `ram_size` feeds the CMOS memory fields,
    /// `console` receives COM1 output (pass a [`crate::serial::ConsoleWriter`] so a stalled
    /// reader cannot block a vCPU), `shutdown` receives power-off and reset requests.
    pub fn new(
        ram_size: u64,
        console: Box<dyn Write + Send>,
        irqs: LegacyIrqs,
        shutdown: ShutdownSignal,
    ) -> Result<Self, DeviceError> {
        Ok(Self {
            serial: Arc::new(Mutex::new(Serial::new(irqs.com1, console)?)),
            i8042: Arc::new(Mutex::new(I8042::new(
                shutdown.clone(),
                Some(irqs.keyboard),
            ))),
            cmos: Arc::new(Mutex::new(Cmos::new(CmosMemory::from_ram_size(ram_size)))),
            acpi_pm: Arc::new(Mutex::new(AcpiPm::new(shutdown.clone(), irqs.acpi_sci))),
            acpi_reset: Arc::new(Mutex::new(AcpiResetRegister::new(shutdown))),
            debug_port: Arc::new(Mutex::new(DebugPort::new())),
        })
    }

    /// Raise RTC interrupts (update-ended, alarm, periodic) on `irq` (GSI 8, `irqs::RTC`).
    /// Optional: without it the guest can only poll register C, which is wrong for a DSDT
    /// that gives the RTC IRQ 8 in its `_CRS` (Linux's rtc-cmos would wait for interrupts).
    pub fn attach_rtc_irq(&self, irq: LegacyIrq) -> Result<(), DeviceError> {
        lock(&self.cmos).attach_irq(irq)
    }

    /// The `(port, len)` ranges [`LegacyDevices::insert_into`] claims, with a name each.
    pub fn pio_ranges() -> [(&'static str, u16, u64); 6] {
        [
            ("i8042", ports::I8042_DATA, I8042_PORT_LEN),
            ("cmos", ports::CMOS, CMOS_PORT_LEN),
            ("com1", ports::COM1, SERIAL_PORT_LEN),
            ("acpi_pm", ports::ACPI_PM1A_EVT, ACPI_PM_BLOCK_LEN),
            ("acpi_reset", ports::ACPI_RESET, ACPI_RESET_LEN),
            ("post_code", POST_CODE_PORT, POST_CODE_PORT_LEN),
        ]
    }

    /// Insert every device on the port-I/O bus at its layout port.
    ///
    /// Port 0xcf9 sits inside the PCI CF8/CFC decoder's range (0xcf8, 8). If something already
    /// claims it, the reset register is not inserted: insert `pci::PciConfigIo` first, built
    /// `.with_port_cf9(devices.acpi_reset.clone())`, so it forwards the byte accesses. Without
    /// PCI, the reset register is inserted at (0xcf9, 1).
    pub fn insert_into(&self, pio: &Bus) -> Result<(), BusError> {
        let devices: [SharedDevice; 6] = [
            self.i8042.clone(),
            self.cmos.clone(),
            self.serial.clone(),
            self.acpi_pm.clone(),
            self.acpi_reset.clone(),
            self.debug_port.clone(),
        ];
        for (device, (name, port, len)) in devices.into_iter().zip(Self::pio_ranges()) {
            if port == ports::ACPI_RESET && pio.resolve(u64::from(port)).is_some() {
                tracing::debug!(
                    "Port {port:#x} already decoded (PCI CF8/CFC); {name} not inserted"
                );
                continue;
            }
            pio.insert(device, u64::from(port), len)?;
        }
        Ok(())
    }

    /// Counter handles of every device.
    pub fn metrics(&self) -> LegacyMetrics {
        LegacyMetrics {
            serial: lock(&self.serial).metrics(),
            i8042: lock(&self.i8042).metrics(),
            cmos: lock(&self.cmos).metrics(),
            acpi_pm: lock(&self.acpi_pm).metrics(),
            acpi_reset: lock(&self.acpi_reset).metrics(),
            debug_port: lock(&self.debug_port).metrics(),
        }
    }

    /// Snapshot every device (call with the vCPUs paused).
    pub fn save(&self) -> LegacyDevicesState {
        LegacyDevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            cmos: lock(&self.cmos).save(),
            acpi_pm: lock(&self.acpi_pm).save(),
            acpi_reset: lock(&self.acpi_reset).save(),
            debug_port: lock(&self.debug_port).save(),
        }
    }

    /// Restore every device from a snapshot (call before the vCPUs run). Stops at the first
    /// invalid device state.
    pub fn restore(&self, state: &LegacyDevicesState) -> Result<(), DeviceError> {
        lock(&self.serial).restore(&state.serial)?;
        lock(&self.i8042).restore(&state.i8042)?;
        lock(&self.cmos).restore(&state.cmos)?;
        lock(&self.acpi_pm).restore(&state.acpi_pm)?;
        lock(&self.acpi_reset).restore(&state.acpi_reset)?;
        lock(&self.debug_port).restore(&state.debug_port)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use arch::layout::{irqs, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};
    use vm_device::ShutdownKind;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn irq(gsi: u32) -> LegacyIrq {
        LegacyIrq {
            gsi,
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Legacy devices not yet inserted into any bus, and their shutdown signal.
    fn unattached_devices() -> (LegacyDevices, ShutdownSignal) {
        let shutdown = ShutdownSignal::new().unwrap();
        let irqs = LegacyIrqs {
            keyboard: irq(irqs::KEYBOARD),
            com1: irq(irqs::COM1),
            acpi_sci: irq(irqs::ACPI_SCI),
        };
        let devs =
            LegacyDevices::new(512 << 20, Box::new(io::sink()), irqs, shutdown.clone()).unwrap();
        (devs, shutdown)
    }

    fn devices() -> (LegacyDevices, Bus, ShutdownSignal) {
        let (devs, shutdown) = unattached_devices();
        let bus = Bus::new();
        devs.insert_into(&bus).unwrap();
        (devs, bus, shutdown)
    }

    #[test]
    fn test_legacy_bus_routes_i8042_status_port() {
        let (_devs, bus, _) = devices();
        let mut status = [0u8; 1];

        assert!(bus.read(u64::from(ports::I8042_COMMAND), &mut status));

        assert_eq!(status[0] & 0x04, 0x04);
    }

    #[test]
    fn test_legacy_bus_s5_write_powers_off() {
        let (_devs, bus, shutdown) = devices();
        let value = (u16::from(ACPI_S5_SLP_TYP) << 10) | (1 << 13);

        bus.write(u64::from(ports::ACPI_PM1A_CNT), &value.to_le_bytes());

        assert_eq!(shutdown.requested(), Some(ShutdownKind::PowerOff));
    }

    #[test]
    fn test_legacy_bus_reset_register_resets() {
        let (_devs, bus, shutdown) = devices();

        bus.write(u64::from(ports::ACPI_RESET), &[ACPI_RESET_VALUE]);

        assert_eq!(shutdown.requested(), Some(ShutdownKind::Reset));
    }

    #[test]
    fn test_legacy_bus_pm_timer_and_cmos_are_reachable() {
        let (_devs, bus, _) = devices();
        let mut data = [0u8; 4];

        assert!(bus.read(u64::from(ports::ACPI_PM_TMR), &mut data));
        bus.write(u64::from(ports::CMOS), &[0x0d]);
        assert!(bus.read(u64::from(ports::CMOS) + 1, &mut data[..1]));

        assert_eq!(data[0], 0x80);
    }

    /// Stands in for the PCI CF8/CFC decoder: forwards offset 1 to the reset register.
    struct Cf8(SharedDevice);

    impl vm_device::BusDevice for Cf8 {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            if offset == 1 {
                self.0.lock().unwrap().write(0, data);
            }
        }
    }

    #[test]
    fn test_legacy_insert_leaves_cf9_to_pci_decoder_inserted_first() {
        let (devs, shutdown) = unattached_devices();
        let bus = Bus::new();
        let cf8: SharedDevice = Arc::new(Mutex::new(Cf8(devs.acpi_reset.clone())));
        bus.insert(cf8, u64::from(ports::PCI_CONFIG_ADDRESS), 8)
            .unwrap();

        devs.insert_into(&bus).unwrap();
        bus.write(u64::from(ports::ACPI_RESET), &[ACPI_RESET_VALUE]);

        assert_eq!(shutdown.requested(), Some(ShutdownKind::Reset));
    }

    #[test]
    fn test_legacy_rtc_irq_fires_after_attach() {
        let (devs, bus, _) = devices();
        let line = irq(irqs::RTC);
        let probe = line.event.try_clone().unwrap();
        devs.attach_rtc_irq(line).unwrap();
        let cmos = u64::from(ports::CMOS);

        // Enable the update-ended interrupt, then wait for it (watchdog, not a threshold).
        bus.write(cmos, &[0x0b, 0x12]);
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&probe),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 60_000) };

        assert_eq!(ready, 1);
        assert_eq!(devs.metrics().cmos.interrupts.get(), 1);
    }

    #[test]
    fn test_legacy_save_restore_round_trips_through_json() {
        let (devs, bus, _) = devices();
        bus.write(u64::from(ports::COM1) + 7, &[0x5a]);
        bus.write(u64::from(POST_CODE_PORT), &[0x42]);
        let saved = devs.save();
        let json = serde_json::to_string(&saved).unwrap();
        let (fresh, fresh_bus, _) = devices();

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        let mut scratch = [0u8; 1];
        fresh_bus.read(u64::from(ports::COM1) + 7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        assert_eq!(fresh.save().debug_port, saved.debug_port);
    }

    #[test]
    fn test_legacy_metrics_serialise() {
        let (devs, bus, _) = devices();
        bus.write(u64::from(ports::COM1), b"x");

        let json = serde_json::to_value(devs.metrics()).unwrap();

        assert_eq!(json["serial"]["tx_bytes"], 1);
    }
}
