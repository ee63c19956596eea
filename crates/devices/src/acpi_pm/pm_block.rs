//! PM1a event block (PM1_STS, PM1_EN), PM1a control block (PM1_CNT), the PM timer and the GPE0
//! block (GPE0_STS, GPE0_EN: one byte each) as one bus device spanning
//! `ports::ACPI_PM1A_EVT .. ports::ACPI_GPE0 + 2`.

use std::sync::Arc;

use arch::layout::{ports, ACPI_S5_SLP_TYP};
use vm_device::{BusDevice, LegacyIrq, ShutdownKind, ShutdownSignal};

use super::metrics::AcpiPmMetrics;
use super::pm_timer::PmTimer;
use super::state::AcpiPmState;
use crate::error::DeviceError;
use crate::irq::IrqLine;

/// Offset of PM1_STS (2 bytes) in the block.
const STS_OFFSET: u64 = 0;
/// Offset of PM1_EN (2 bytes): second half of the PM1a event block.
const EN_OFFSET: u64 = 2;
/// Offset of PM1_CNT (2 bytes).
const CNT_OFFSET: u64 = (ports::ACPI_PM1A_CNT - ports::ACPI_PM1A_EVT) as u64;
/// Offset of PM_TMR (4 bytes).
const TMR_OFFSET: u64 = (ports::ACPI_PM_TMR - ports::ACPI_PM1A_EVT) as u64;

/// Offset of GPE0_STS (1 byte).
const GPE_STS_OFFSET: u64 = (ports::ACPI_GPE0 - ports::ACPI_PM1A_EVT) as u64;
/// Offset of GPE0_EN (1 byte): second half of the GPE0 block.
const GPE_EN_OFFSET: u64 = GPE_STS_OFFSET + 1;

/// Length of the bus range starting at `ports::ACPI_PM1A_EVT` (bytes between the blocks read as
/// zero).
pub const ACPI_PM_BLOCK_LEN: u64 = GPE_EN_OFFSET + 1;

// The layout must keep the blocks in this order without overlap.
const _: () = assert!(
    CNT_OFFSET >= EN_OFFSET + 2 && TMR_OFFSET >= CNT_OFFSET + 2 && GPE_STS_OFFSET >= TMR_OFFSET + 4
);

/// GPE0 bits that exist (the ones [`AcpiPm::raise_gpe`] may set; the DSDT has a handler for
/// bit 0 only, the VM generation ID change).
const GPE_VALID: u8 = 0x01;

// PM1_STS / PM1_EN bits.
const PWRBTN: u16 = 1 << 8;
/// Enable bits that exist: TMR, GBL, PWRBTN, SLPBTN, RTC, PCIEXP_WAKE_DIS.
const EN_VALID: u16 = 0x4721;
/// Events that can raise the SCI (only the power button is ever set by this model).
const SCI_EVENTS: u16 = PWRBTN;

// PM1_CNT bits.
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// Bits of PM1_CNT that hold a value (BM_RLD, SLP_TYP); GBL_RLS and SLP_EN are write-only.
const CNT_STORED: u16 = (1 << 1) | SLP_TYP_MASK;

/// A register of the block: where it is, how wide.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reg {
    Sts,
    En,
    Cnt,
    Tmr,
    GpeSts,
    GpeEn,
}

impl Reg {
    const ALL: [Reg; 6] = [
        Reg::Sts,
        Reg::En,
        Reg::Cnt,
        Reg::Tmr,
        Reg::GpeSts,
        Reg::GpeEn,
    ];

    fn offset(self) -> u64 {
        match self {
            Reg::Sts => STS_OFFSET,
            Reg::En => EN_OFFSET,
            Reg::Cnt => CNT_OFFSET,
            Reg::Tmr => TMR_OFFSET,
            Reg::GpeSts => GPE_STS_OFFSET,
            Reg::GpeEn => GPE_EN_OFFSET,
        }
    }

    fn len(self) -> u64 {
        match self {
            Reg::Tmr => 4,
            Reg::GpeSts | Reg::GpeEn => 1,
            _ => 2,
        }
    }

    /// The register holding byte `addr` and the byte's index inside it.
    fn at(addr: u64) -> Option<(Reg, u32)> {
        Reg::ALL.into_iter().find_map(|reg| {
            let index = addr.checked_sub(reg.offset())?;
            (index < reg.len()).then_some((reg, index as u32))
        })
    }
}

/// The ACPI PM1a blocks, PM timer and GPE0 block.
pub struct AcpiPm {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe0_sts: u8,
    gpe0_en: u8,
    timer: PmTimer,
    sci: IrqLine,
    shutdown: ShutdownSignal,
    metrics: Arc<AcpiPmMetrics>,
}

impl AcpiPm {
    /// A PM block that requests `ShutdownKind::PowerOff` on `shutdown` for S5 and raises `sci`
    /// (GSI 9, `irqs::ACPI_SCI`) for enabled events.
    pub fn new(shutdown: ShutdownSignal, sci: LegacyIrq) -> Self {
        Self {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 0,
            gpe0_sts: 0,
            gpe0_en: 0,
            timer: PmTimer::new(),
            sci: IrqLine::new(sci),
            shutdown,
            metrics: Arc::new(AcpiPmMetrics::default()),
        }
    }

    /// The counters of this device.
    pub fn metrics(&self) -> Arc<AcpiPmMetrics> {
        self.metrics.clone()
    }

    /// Press the power button: the guest's ACPI driver sees PWRBTN_STS and normally shuts down
    /// (ending in an S5 write). Returns whether the guest had enabled the power-button event; if
    /// not, no SCI is raised now (one is when the guest enables it) and the caller may need
    /// another way to stop the VM.
    pub fn press_power_button(&mut self) -> bool {
        self.metrics.power_button_presses.inc();
        self.pm1_sts |= PWRBTN;
        self.update_sci();
        self.pm1_en & PWRBTN != 0
    }

    /// Set general-purpose event `bit` of GPE0 (e.g. `arch::acpi::VMGENID_GPE`) and raise the
    /// SCI if the guest enabled it (else when it does). Returns whether it was enabled; bits
    /// without a handler in the DSDT are refused (`false`, nothing set).
    pub fn raise_gpe(&mut self, bit: u8) -> bool {
        let Some(mask) = 1u8
            .checked_shl(u32::from(bit))
            .filter(|m| m & GPE_VALID != 0)
        else {
            return false;
        };
        self.gpe0_sts |= mask;
        self.update_sci();
        self.gpe0_en & mask != 0
    }

    /// The guest-visible state, for snapshots.
    pub fn save(&self) -> AcpiPmState {
        AcpiPmState {
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            pm_timer: self.timer.value(),
            gpe0_sts: self.gpe0_sts,
            gpe0_en: self.gpe0_en,
        }
    }

    /// Load a saved state; the PM timer continues from the saved count. Bits no register has are
    /// dropped. A pending enabled event re-raises the SCI.
    pub fn restore(&mut self, state: &AcpiPmState) -> Result<(), DeviceError> {
        self.pm1_sts = state.pm1_sts;
        self.pm1_en = state.pm1_en & EN_VALID;
        self.pm1_cnt = state.pm1_cnt & CNT_STORED;
        self.gpe0_sts = state.gpe0_sts & GPE_VALID;
        self.gpe0_en = state.gpe0_en & GPE_VALID;
        self.timer.set(state.pm_timer);
        self.update_sci();
        Ok(())
    }

    /// Raise the SCI if an enabled event is pending (edge per transition; the guest handler
    /// processes every pending bit).
    fn update_sci(&self) {
        if self.pm1_sts & self.pm1_en & SCI_EVENTS != 0 || self.gpe0_sts & self.gpe0_en != 0 {
            self.metrics.sci_raised.inc();
            self.sci.trigger();
        }
    }

    fn reg_value(&self, reg: Reg, timer: u32) -> u32 {
        match reg {
            Reg::Sts => u32::from(self.pm1_sts),
            Reg::En => u32::from(self.pm1_en),
            // Always in ACPI mode: there is no SMI_CMD to switch.
            Reg::Cnt => u32::from(self.pm1_cnt | SCI_EN),
            Reg::Tmr => timer,
            Reg::GpeSts => u32::from(self.gpe0_sts),
            Reg::GpeEn => u32::from(self.gpe0_en),
        }
    }

    fn write_reg(&mut self, reg: Reg, value: u32, mask: u32) {
        let (value, mask) = ((value & mask) as u16, mask as u16);
        match reg {
            // Write 1 to clear.
            Reg::Sts => self.pm1_sts &= !value,
            Reg::En => {
                self.pm1_en = ((self.pm1_en & !mask) | value) & EN_VALID;
                self.update_sci();
            }
            Reg::Cnt => {
                self.pm1_cnt = ((self.pm1_cnt & !mask) | value) & CNT_STORED;
                if value & SLP_EN != 0 {
                    self.sleep(((self.pm1_cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT) as u8);
                }
            }
            Reg::Tmr => self.metrics.invalid_accesses.inc(),
            // Write 1 to clear.
            Reg::GpeSts => self.gpe0_sts &= !(value as u8),
            Reg::GpeEn => {
                self.gpe0_en = value as u8 & GPE_VALID;
                self.update_sci();
            }
        }
    }

    fn sleep(&mut self, slp_typ: u8) {
        if slp_typ == ACPI_S5_SLP_TYP {
            self.metrics.power_off_requests.inc();
            tracing::info!("ACPI: guest entered S5 (soft off)");
            self.shutdown.request(ShutdownKind::PowerOff);
        } else {
            self.metrics.unsupported_sleep_requests.inc();
            // Once: a guest could otherwise flood the log.
            if self.metrics.unsupported_sleep_requests.get() == 1 {
                tracing::warn!("ACPI: sleep type {slp_typ} is not supported; ignored");
            }
        }
    }
}

impl BusDevice for AcpiPm {
    /// Any width at any offset: each byte comes from the register covering it (0 between
    /// registers). The timer is sampled once per access so a 4-byte read is consistent.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let timer = self.timer.value();
        let mut invalid = false;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64).and_then(Reg::at) {
                Some((reg, index)) => (self.reg_value(reg, timer) >> (8 * index)) as u8,
                None => {
                    invalid = true;
                    0
                }
            };
        }
        if invalid {
            self.metrics.invalid_accesses.inc();
        }
    }

    /// Bytes are gathered per register and applied as one masked write to each register.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut parts = [(0u32, 0u32); Reg::ALL.len()];
        let mut invalid = false;
        for (i, byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64).and_then(Reg::at) {
                Some((reg, index)) => {
                    let slot = &mut parts[reg as usize];
                    slot.0 |= u32::from(*byte) << (8 * index);
                    slot.1 |= 0xff << (8 * index);
                }
                None => invalid = true,
            }
        }
        if invalid {
            self.metrics.invalid_accesses.inc();
        }
        for reg in Reg::ALL {
            let (value, mask) = parts[reg as usize];
            if mask != 0 {
                self.write_reg(reg, value, mask);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn device() -> (AcpiPm, ShutdownSignal, EventFd) {
        let shutdown = ShutdownSignal::new().unwrap();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = event.try_clone().unwrap();
        let dev = AcpiPm::new(shutdown.clone(), LegacyIrq { gsi: 9, event });
        (dev, shutdown, probe)
    }

    fn read16(dev: &mut AcpiPm, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        dev.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    fn read32(dev: &mut AcpiPm, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn s5_command() -> u16 {
        (u16::from(ACPI_S5_SLP_TYP) << SLP_TYP_SHIFT) | SLP_EN
    }

    #[test]
    fn test_acpi_pm_layout_offsets_match_ports() {
        assert_eq!(CNT_OFFSET, 4);
        assert_eq!(TMR_OFFSET, 8);
        assert_eq!(GPE_STS_OFFSET, 12);
        assert_eq!(ACPI_PM_BLOCK_LEN, 14);
    }

    #[test]
    fn test_acpi_pm_sci_en_always_reads_set() {
        let (mut dev, _, _) = device();

        dev.write(CNT_OFFSET, &0u16.to_le_bytes());

        assert_eq!(read16(&mut dev, CNT_OFFSET) & SCI_EN, SCI_EN);
    }

    #[test]
    fn test_acpi_pm_slp_en_with_s5_requests_power_off() {
        let (mut dev, shutdown, _) = device();

        dev.write(CNT_OFFSET, &s5_command().to_le_bytes());

        assert_eq!(shutdown.requested(), Some(ShutdownKind::PowerOff));
        assert_eq!(dev.metrics().power_off_requests.get(), 1);
        // SLP_EN is write-only.
        assert_eq!(read16(&mut dev, CNT_OFFSET) & SLP_EN, 0);
    }

    #[test]
    fn test_acpi_pm_acpica_two_step_s5_write_requests_power_off() {
        let (mut dev, shutdown, _) = device();
        let typ = u16::from(ACPI_S5_SLP_TYP) << SLP_TYP_SHIFT;

        dev.write(CNT_OFFSET, &typ.to_le_bytes());
        assert_eq!(shutdown.requested(), None);
        dev.write(CNT_OFFSET + 1, &[((typ | SLP_EN) >> 8) as u8]);

        assert_eq!(shutdown.requested(), Some(ShutdownKind::PowerOff));
    }

    #[test]
    fn test_acpi_pm_other_sleep_type_is_ignored() {
        let (mut dev, shutdown, _) = device();

        dev.write(
            CNT_OFFSET,
            &((3u16 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );

        assert_eq!(shutdown.requested(), None);
        assert_eq!(dev.metrics().unsupported_sleep_requests.get(), 1);
    }

    #[test]
    fn test_acpi_pm_slp_typ_without_slp_en_does_nothing() {
        let (mut dev, shutdown, _) = device();

        dev.write(
            CNT_OFFSET,
            &(u16::from(ACPI_S5_SLP_TYP) << SLP_TYP_SHIFT).to_le_bytes(),
        );

        assert_eq!(shutdown.requested(), None);
    }

    #[test]
    fn test_acpi_pm_power_button_raises_sci_when_enabled() {
        let (mut dev, _, sci) = device();
        dev.write(EN_OFFSET, &PWRBTN.to_le_bytes());

        let enabled = dev.press_power_button();

        assert!(enabled);
        assert_eq!(sci.read().unwrap(), 1);
        assert_eq!(read16(&mut dev, STS_OFFSET) & PWRBTN, PWRBTN);
    }

    #[test]
    fn test_acpi_pm_power_button_disabled_raises_sci_on_enable() {
        let (mut dev, _, sci) = device();

        let enabled = dev.press_power_button();
        assert!(!enabled);
        assert_eq!(sci.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        dev.write(EN_OFFSET, &PWRBTN.to_le_bytes());

        assert_eq!(sci.read().unwrap(), 1);
    }

    #[test]
    fn test_acpi_pm_status_is_write_one_to_clear() {
        let (mut dev, _, _) = device();
        dev.press_power_button();

        dev.write(STS_OFFSET, &0u16.to_le_bytes());
        assert_eq!(read16(&mut dev, STS_OFFSET) & PWRBTN, PWRBTN);
        dev.write(STS_OFFSET, &PWRBTN.to_le_bytes());

        assert_eq!(read16(&mut dev, STS_OFFSET), 0);
    }

    #[test]
    fn test_acpi_pm_enable_keeps_only_defined_bits() {
        let (mut dev, _, _) = device();

        dev.write(EN_OFFSET, &0xffffu16.to_le_bytes());

        assert_eq!(read16(&mut dev, EN_OFFSET), EN_VALID);
    }

    #[test]
    fn test_acpi_pm_32bit_event_block_access_covers_sts_and_en() {
        let (mut dev, _, _) = device();
        dev.press_power_button();

        dev.write(STS_OFFSET, &(u32::from(PWRBTN) << 16).to_le_bytes());
        let both = read32(&mut dev, STS_OFFSET);

        assert_eq!(both, u32::from(PWRBTN) | (u32::from(PWRBTN) << 16));
    }

    #[test]
    fn test_acpi_pm_timer_is_read_only_and_counts_forward() {
        let (mut dev, _, _) = device();
        let first = read32(&mut dev, TMR_OFFSET);

        dev.write(TMR_OFFSET, &0u32.to_le_bytes());
        let second = read32(&mut dev, TMR_OFFSET);

        assert!(second.wrapping_sub(first) < 1 << 31);
        assert_eq!(dev.metrics().invalid_accesses.get(), 1);
    }

    #[test]
    fn test_acpi_pm_odd_offsets_and_widths_do_not_panic() {
        let (mut dev, shutdown, _) = device();
        let mut wide = [0xffu8; 16];

        dev.read(6, &mut wide[..2]);
        assert_eq!(wide[..2], [0, 0]);
        dev.read(u64::MAX, &mut wide);
        dev.read(15, &mut wide);
        dev.write(u64::MAX - 2, &[0xff; 8]);
        dev.write(6, &[0xff; 16]);
        dev.read(0, &mut []);
        dev.write(0, &[]);

        assert_eq!(shutdown.requested(), None);
        assert!(dev.metrics().invalid_accesses.get() >= 4);
    }

    #[test]
    fn test_acpi_pm_gpe_raises_sci_when_enabled_and_clears_on_write_one() {
        let (mut dev, _, sci) = device();

        assert!(!dev.raise_gpe(0));
        assert_eq!(sci.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        dev.write(GPE_EN_OFFSET, &[0xff]);
        assert_eq!(sci.read().unwrap(), 1);
        let mut b = [0u8; 2];
        dev.read(GPE_STS_OFFSET, &mut b);
        assert_eq!(b, [1, GPE_VALID]);
        dev.write(GPE_STS_OFFSET, &[1]);
        dev.read(GPE_STS_OFFSET, &mut b[..1]);

        assert_eq!(b[0], 0);
        assert!(dev.raise_gpe(0));
        assert_eq!(sci.read().unwrap(), 1);
    }

    #[test]
    fn test_acpi_pm_gpe_without_handler_is_refused() {
        let (mut dev, _, _) = device();

        assert!(!dev.raise_gpe(3));
        assert!(!dev.raise_gpe(200));

        assert_eq!(dev.save().gpe0_sts, 0);
    }

    #[test]
    fn test_acpi_pm_save_restore_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(EN_OFFSET, &PWRBTN.to_le_bytes());
        dev.write(CNT_OFFSET, &(3u16 << SLP_TYP_SHIFT).to_le_bytes());
        dev.press_power_button();
        let saved = dev.save();
        let json = serde_json::to_string(&saved).unwrap();
        let (mut fresh, _, sci) = device();

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        let restored = fresh.save();
        assert_eq!(
            (restored.pm1_sts, restored.pm1_en, restored.pm1_cnt),
            (saved.pm1_sts, saved.pm1_en, saved.pm1_cnt)
        );
        assert!(restored.pm_timer.wrapping_sub(saved.pm_timer) < 1 << 31);
        // The pending, enabled power-button event is re-announced.
        assert_eq!(sci.read().unwrap(), 1);
    }
}
