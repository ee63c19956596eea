//! The CMOS/RTC register model: CMOS memory, the clock, and the interrupt flags of register C.
//!
//! Shared between the bus-facing [`super::Cmos`] and its interrupt timer thread.

use std::sync::Arc;

use super::calendar::{decode, encode, DateTime};
use super::clock::WallClock;
use super::device::CmosMemory;
use super::metrics::CmosMetrics;
use crate::irq::IrqLine;

/// Bytes of CMOS memory.
pub const CMOS_SIZE: usize = 128;

pub(super) const INDEX_OFFSET: u64 = 0;
pub(super) const DATA_OFFSET: u64 = 1;
/// Bit 7 of the index port disables NMI on real hardware; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;

// RTC registers.
pub(super) const REG_SECONDS: u8 = 0x00;
pub(super) const REG_MINUTES: u8 = 0x02;
pub(super) const REG_HOURS: u8 = 0x04;
pub(super) const REG_WEEKDAY: u8 = 0x06;
pub(super) const REG_DAY: u8 = 0x07;
pub(super) const REG_MONTH: u8 = 0x08;
pub(super) const REG_YEAR: u8 = 0x09;
pub(super) const REG_A: u8 = 0x0a;
pub(super) const REG_B: u8 = 0x0b;
pub(super) const REG_C: u8 = 0x0c;
pub(super) const REG_D: u8 = 0x0d;
pub(super) const REG_CENTURY: u8 = 0x32;
/// Registers that hold the current time.
pub(super) const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

/// Register A: update in progress (read-only).
pub(super) const A_UIP: u8 = 0x80;
/// Register A default: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: SET, updates halted so the guest can write the time.
pub(super) const B_SET: u8 = 0x80;
/// Register B: periodic, alarm and update-ended interrupt enables (same bit positions as the
/// matching flags in register C).
pub(super) const B_INTERRUPT_ENABLES: u8 = 0x70;
/// Register C: interrupt request flag (any enabled flag set).
pub(super) const C_IRQF: u8 = 0x80;
/// Register C: periodic interrupt flag.
pub(super) const C_PF: u8 = 0x40;
/// Register C: alarm flag.
pub(super) const C_AF: u8 = 0x20;
/// Register C: update-ended flag.
pub(super) const C_UF: u8 = 0x10;
/// Register A: divider bits; 010 is the running 32.768 kHz time base.
const A_DIVIDER_MASK: u8 = 0x70;
const A_DIVIDER_NORMAL: u8 = 0x20;
/// Register A: periodic rate selector.
pub(super) const A_RATE_MASK: u8 = 0x0f;
// Alarm registers; a value with both top bits set matches anything.
pub(super) const REG_SECONDS_ALARM: u8 = 0x01;
pub(super) const REG_MINUTES_ALARM: u8 = 0x03;
pub(super) const REG_HOURS_ALARM: u8 = 0x05;
const ALARM_DONT_CARE: u8 = 0xc0;
/// Alarm matching looks at most one day of missed seconds (every alarm repeats daily).
const ALARM_SCAN_LIMIT: i64 = 86_400;
/// The RTC time base, in Hz.
const RTC_BASE_HZ: i128 = 32_768;
/// Register B: data mode binary (clear = BCD).
pub(super) const B_DM_BINARY: u8 = 0x04;
/// Register B: 24-hour mode (clear = 12-hour).
pub(super) const B_24H: u8 = 0x02;
/// Register B default: 24-hour, BCD.
const B_DEFAULT: u8 = B_24H;
/// Register D: valid RAM and time (battery good).
pub(super) const D_VRT: u8 = 0x80;
/// 12-hour mode: PM flag in the hours register.
pub(super) const HOUR_PM: u8 = 0x80;

/// UIP is set for this long before each second boundary, like the MC146818: a guest that saw
/// UIP clear has at least this long to read a consistent time. It is wall-clock time, so a
/// guest polling UIP always sees it clear again shortly (Linux's `mc146818_avoid_UIP` ends).
pub(super) const UIP_WINDOW_NS: i64 = 244_000;
pub(super) const NS_PER_SEC: i64 = 1_000_000_000;

// Memory-size fields.
const REG_BASE_MEM_LO: usize = 0x15;
const REG_BASE_MEM_HI: usize = 0x16;
const REG_EXT_MEM_LO: usize = 0x17;
const REG_EXT_MEM_HI: usize = 0x18;
const REG_CHECKSUM_HI: usize = 0x2e;
const REG_CHECKSUM_LO: usize = 0x2f;
const REG_EXT_MEM2_LO: usize = 0x30;
const REG_EXT_MEM2_HI: usize = 0x31;
const REG_MEM_ABOVE_16M_LO: usize = 0x34;
const REG_MEM_ABOVE_16M_HI: usize = 0x35;
const REG_MEM_ABOVE_4G_LO: usize = 0x5b;
const REG_MEM_ABOVE_4G_MID: usize = 0x5c;
const REG_MEM_ABOVE_4G_HI: usize = 0x5d;
/// Conventional memory reported: 640 KiB.
const BASE_MEMORY_KIB: u64 = 640;
/// The extended-memory fields (KiB above 1 MiB) saturate at 63 MiB.
const EXT_MEMORY_MAX_KIB: u64 = 0xfc00;

const MIB: u64 = 1 << 20;
const CHUNK_64K: u64 = 64 << 10;

/// The registers and clock of the CMOS/RTC.
pub(super) struct RtcCore {
    pub(super) index: u8,
    pub(super) data: [u8; CMOS_SIZE],
    pub(super) clock_offset_ns: i64,
    clock: Box<dyn WallClock>,
    pub(super) metrics: Arc<CmosMetrics>,
    /// IRQ 8, once the VMM attached it.
    pub(super) irq: Option<IrqLine>,
    /// Guest time up to which register C's flags are computed.
    pub(super) last_event_ns: i64,
    /// Something changed that moves the next interrupt deadline (wake the timer thread).
    pub(super) timer_dirty: bool,
    /// The owning device is gone: the timer thread ends.
    pub(super) stopped: bool,
}

impl RtcCore {
    pub(super) fn new(memory: CmosMemory, clock: Box<dyn WallClock>) -> Self {
        let mut data = [0u8; CMOS_SIZE];
        data[usize::from(REG_A)] = A_DEFAULT;
        data[usize::from(REG_B)] = B_DEFAULT;
        data[usize::from(REG_D)] = D_VRT;
        fill_memory_fields(&mut data, memory);
        let mut core = Self {
            index: 0,
            data,
            clock_offset_ns: 0,
            clock,
            metrics: Arc::new(CmosMetrics::default()),
            irq: None,
            last_event_ns: 0,
            timer_dirty: false,
            stopped: false,
        };
        core.last_event_ns = core.guest_now_ns();
        core
    }

    /// Periodic interrupt period in 1/32768 s units, or `None` if the periodic source is off.
    fn periodic_period(&self) -> Option<i128> {
        let a = self.data[usize::from(REG_A)];
        if a & A_DIVIDER_MASK != A_DIVIDER_NORMAL {
            return None;
        }
        match a & A_RATE_MASK {
            0 => None,
            // Rates 1 and 2 alias to 256 Hz and 128 Hz.
            1 => Some(128),
            2 => Some(256),
            rate => Some(1 << (rate - 1)),
        }
    }

    /// Whether the alarm registers match the time `secs` (guest seconds since the epoch).
    fn alarm_matches(&self, secs: i64) -> bool {
        let now = DateTime::from_unix(secs);
        [
            (REG_SECONDS_ALARM, REG_SECONDS),
            (REG_MINUTES_ALARM, REG_MINUTES),
            (REG_HOURS_ALARM, REG_HOURS),
        ]
        .into_iter()
        .all(|(alarm, reg)| {
            let want = self.data[usize::from(alarm)];
            want & ALARM_DONT_CARE == ALARM_DONT_CARE || want == self.encode_time_reg(reg, &now)
        })
    }

    /// Set register C's flags for the events between the last update and now, and raise IRQ 8
    /// when an enabled flag appears while IRQF is clear (the line stays "asserted" until the
    /// guest reads register C).
    pub(super) fn update_flags(&mut self) {
        let now = self.guest_now_ns();
        let from = self.last_event_ns;
        self.last_event_ns = now;
        let mut flags = 0;
        if now > from {
            if !self.frozen() {
                let (first, last) = (from.div_euclid(NS_PER_SEC), now.div_euclid(NS_PER_SEC));
                if last > first {
                    flags |= C_UF;
                    let scan_from = first.max(last - ALARM_SCAN_LIMIT) + 1;
                    if (scan_from..=last).any(|secs| self.alarm_matches(secs)) {
                        flags |= C_AF;
                    }
                }
            }
            if let Some(period) = self.periodic_period() {
                let tick = |ns: i64| {
                    (i128::from(ns) * RTC_BASE_HZ)
                        .div_euclid(i128::from(NS_PER_SEC))
                        .div_euclid(period)
                };
                if tick(now) > tick(from) {
                    flags |= C_PF;
                }
            }
        }
        // A clock stepped backwards just resynchronises (no events).
        let b = self.data[usize::from(REG_B)];
        let c = &mut self.data[usize::from(REG_C)];
        *c |= flags;
        if *c & b & B_INTERRUPT_ENABLES != 0 && *c & C_IRQF == 0 {
            *c |= C_IRQF;
            if let Some(irq) = &self.irq {
                self.metrics.interrupts.inc();
                irq.trigger();
            }
        }
    }

    /// How long the timer thread may sleep before the next interrupt can be due, or `None` if
    /// no interrupt can happen until a register changes (nothing enabled, no IRQ line, or IRQF
    /// still set because the guest has not read register C).
    pub(super) fn next_wait_ns(&self) -> Option<i64> {
        let b = self.data[usize::from(REG_B)];
        let enabled = b & B_INTERRUPT_ENABLES;
        if self.irq.is_none() || enabled == 0 || self.data[usize::from(REG_C)] & C_IRQF != 0 {
            return None;
        }
        let now = self.guest_now_ns();
        let mut wait: Option<i64> = None;
        if enabled & (C_UF | C_AF) != 0 && !self.frozen() {
            wait = Some(NS_PER_SEC - now.rem_euclid(NS_PER_SEC));
        }
        if enabled & C_PF != 0 {
            if let Some(period) = self.periodic_period() {
                let ticks = i128::from(now) * RTC_BASE_HZ;
                let period_ns = period * i128::from(NS_PER_SEC);
                // Next multiple of the period (units: ns × Hz).
                let next = (ticks.div_euclid(period_ns) + 1) * period_ns;
                // Rounded up so the tick has passed when the thread wakes.
                let until = (next - ticks + RTC_BASE_HZ - 1) / RTC_BASE_HZ;
                let until = i64::try_from(until).unwrap_or(NS_PER_SEC).max(1);
                wait = Some(wait.map_or(until, |w| w.min(until)));
            }
        }
        wait
    }

    fn reg_b(&self) -> u8 {
        self.data[usize::from(REG_B)]
    }

    fn bcd(&self) -> bool {
        self.reg_b() & B_DM_BINARY == 0
    }

    /// Whether the guest halted updates to write the time (registers hold what it wrote).
    fn frozen(&self) -> bool {
        self.reg_b() & B_SET != 0
    }

    pub(super) fn guest_now_ns(&self) -> i64 {
        self.clock.now_ns().saturating_add(self.clock_offset_ns)
    }

    fn update_in_progress(&self) -> bool {
        !self.frozen() && self.guest_now_ns().rem_euclid(NS_PER_SEC) >= NS_PER_SEC - UIP_WINDOW_NS
    }

    /// The time register `reg` encoded for `now` in the current data mode and hour format.
    fn encode_time_reg(&self, reg: u8, now: &DateTime) -> u8 {
        let bcd = self.bcd();
        match reg {
            REG_SECONDS => encode(now.second, bcd),
            REG_MINUTES => encode(now.minute, bcd),
            REG_HOURS if self.reg_b() & B_24H != 0 => encode(now.hour, bcd),
            REG_HOURS => {
                let hour12 = match now.hour % 12 {
                    0 => 12,
                    h => h,
                };
                let pm = if now.hour >= 12 { HOUR_PM } else { 0 };
                encode(hour12, bcd) | pm
            }
            REG_WEEKDAY => encode(now.weekday + 1, bcd),
            REG_DAY => encode(now.day, bcd),
            REG_MONTH => encode(now.month, bcd),
            REG_YEAR => encode(now.year.rem_euclid(100) as u8, bcd),
            REG_CENTURY => encode(now.year.div_euclid(100).rem_euclid(100) as u8, bcd),
            _ => 0,
        }
    }

    /// Copy the running clock into the time registers (before the guest edits them).
    fn latch_time(&mut self) {
        let now = DateTime::from_unix(self.guest_now_ns().div_euclid(NS_PER_SEC));
        for reg in TIME_REGS {
            self.data[usize::from(reg)] = self.encode_time_reg(reg, &now);
        }
    }

    /// Decode the time registers, or `None` if they hold no valid date and time.
    fn decode_time_regs(&self) -> Option<i64> {
        let bcd = self.bcd();
        let field = |reg: u8| decode(self.data[usize::from(reg)], bcd);
        let hours = self.data[usize::from(REG_HOURS)];
        let hour = if self.reg_b() & B_24H != 0 {
            field(REG_HOURS)?
        } else {
            let hour12 = decode(hours & !HOUR_PM, bcd)?;
            if !(1..=12).contains(&hour12) {
                return None;
            }
            hour12 % 12 + if hours & HOUR_PM != 0 { 12 } else { 0 }
        };
        let year = i64::from(field(REG_CENTURY)?) * 100 + i64::from(field(REG_YEAR)?);
        DateTime {
            year,
            month: field(REG_MONTH)?,
            day: field(REG_DAY)?,
            hour,
            minute: field(REG_MINUTES)?,
            second: field(REG_SECONDS)?,
            weekday: 0,
        }
        .to_unix()
    }

    /// Start the clock from the time registers: the guest sees it advance from what it wrote.
    fn commit_time(&mut self) {
        match self.decode_time_regs() {
            Some(secs) => {
                let target_ns = i128::from(secs) * i128::from(NS_PER_SEC);
                let offset = target_ns - i128::from(self.clock.now_ns());
                self.clock_offset_ns =
                    i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
                self.metrics.clock_sets.inc();
                // Events are counted from the new time on.
                self.last_event_ns = self.guest_now_ns();
                self.timer_dirty = true;
            }
            None => {
                self.metrics.invalid_clock_sets.inc();
                if self.metrics.invalid_clock_sets.get() == 1 {
                    tracing::warn!("CMOS: guest wrote an invalid date/time; clock unchanged");
                }
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let reg = self.index;
        match reg {
            _ if TIME_REGS.contains(&reg) && !self.frozen() => {
                let now = DateTime::from_unix(self.guest_now_ns().div_euclid(NS_PER_SEC));
                self.encode_time_reg(reg, &now)
            }
            REG_A => {
                let uip = if self.update_in_progress() { A_UIP } else { 0 };
                (self.data[usize::from(REG_A)] & !A_UIP) | uip
            }
            REG_C => {
                self.update_flags();
                // Reading acknowledges: the timer may need to run again.
                self.timer_dirty = true;
                std::mem::take(&mut self.data[usize::from(REG_C)])
            }
            REG_D => D_VRT,
            _ => self.data[usize::from(reg & INDEX_MASK)],
        }
    }

    fn write_data(&mut self, value: u8) {
        let reg = self.index;
        match reg {
            _ if TIME_REGS.contains(&reg) => {
                if self.frozen() {
                    self.data[usize::from(reg)] = value;
                } else {
                    // A lone write while the clock runs: edit the current time in place.
                    self.latch_time();
                    self.data[usize::from(reg)] = value;
                    self.commit_time();
                }
            }
            REG_A => {
                self.update_flags();
                self.data[usize::from(REG_A)] = value & !A_UIP;
                self.timer_dirty = true;
            }
            REG_B => self.write_reg_b(value),
            // Read-only.
            REG_C | REG_D => {}
            _ => self.data[usize::from(reg & INDEX_MASK)] = value,
        }
    }

    fn write_reg_b(&mut self, value: u8) {
        let was_frozen = self.frozen();
        let now_frozen = value & B_SET != 0;
        if value & B_INTERRUPT_ENABLES != 0 && self.irq.is_none() {
            self.metrics.unsupported_interrupt_enables.inc();
            // Once: a guest could otherwise flood the log.
            if self.metrics.unsupported_interrupt_enables.get() == 1 {
                tracing::warn!(
                    "CMOS: RTC interrupts are not supported without an IRQ line \
                     (register B {value:#04x}); flags can only be polled"
                );
            }
        }
        // Account for time passed under the old settings first.
        self.update_flags();
        if !was_frozen && now_frozen {
            // Freeze the registers at the current time in the old format.
            self.latch_time();
        }
        self.data[usize::from(REG_B)] = value;
        if was_frozen && !now_frozen {
            self.commit_time();
        }
        // Enabling an interrupt whose flag is already set asserts the line.
        self.update_flags();
        self.timer_dirty = true;
    }

    pub(super) fn read_port(&mut self, offset: u64) -> u8 {
        match offset {
            // The index port is write-only.
            INDEX_OFFSET => 0xff,
            DATA_OFFSET => self.read_data(),
            _ => {
                self.metrics.invalid_accesses.inc();
                0
            }
        }
    }

    pub(super) fn write_port(&mut self, offset: u64, value: u8) {
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            DATA_OFFSET => self.write_data(value),
            _ => self.metrics.invalid_accesses.inc(),
        }
    }
}

/// Fill the memory-size fields and the standard checksum over 0x10..=0x2d.
fn fill_memory_fields(data: &mut [u8; CMOS_SIZE], memory: CmosMemory) {
    let put16 = |data: &mut [u8; CMOS_SIZE], lo: usize, hi: usize, value: u64| {
        data[lo] = value as u8;
        data[hi] = (value >> 8) as u8;
    };
    put16(data, REG_BASE_MEM_LO, REG_BASE_MEM_HI, BASE_MEMORY_KIB);
    let ext_kib = (memory.below_4g.saturating_sub(MIB) / 1024).min(EXT_MEMORY_MAX_KIB);
    put16(data, REG_EXT_MEM_LO, REG_EXT_MEM_HI, ext_kib);
    put16(data, REG_EXT_MEM2_LO, REG_EXT_MEM2_HI, ext_kib);
    let above_16m = (memory.below_4g.saturating_sub(16 * MIB) / CHUNK_64K).min(0xffff);
    put16(data, REG_MEM_ABOVE_16M_LO, REG_MEM_ABOVE_16M_HI, above_16m);
    let above_4g = (memory.above_4g / CHUNK_64K).min(0xff_ffff);
    data[REG_MEM_ABOVE_4G_LO] = above_4g as u8;
    data[REG_MEM_ABOVE_4G_MID] = (above_4g >> 8) as u8;
    data[REG_MEM_ABOVE_4G_HI] = (above_4g >> 16) as u8;
    let checksum: u16 = data[0x10..=0x2d].iter().map(|b| u16::from(*b)).sum();
    put16(data, REG_CHECKSUM_LO, REG_CHECKSUM_HI, u64::from(checksum));
}

#[cfg(test)]
mod tests {
    use vm_device::LegacyIrq;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    /// 2024-02-29T23:59:58Z.
    const T0: i64 = 1_709_251_198;

    struct Fixed(i64);

    impl WallClock for Fixed {
        fn now_ns(&self) -> i64 {
            self.0
        }
    }

    fn core_at(ns: i64) -> RtcCore {
        let mut core = RtcCore::new(CmosMemory::default(), Box::new(Fixed(ns)));
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        core.irq = Some(IrqLine::new(LegacyIrq { gsi: 8, event }));
        core
    }

    #[test]
    fn test_rtc_next_wait_none_without_enabled_interrupts() {
        let core = core_at(T0 * NS_PER_SEC);

        assert_eq!(core.next_wait_ns(), None);
    }

    #[test]
    fn test_rtc_next_wait_update_interrupt_is_next_second() {
        let mut core = core_at(T0 * NS_PER_SEC + NS_PER_SEC / 4);
        core.data[usize::from(REG_B)] = B_24H | C_UF;

        assert_eq!(core.next_wait_ns(), Some(NS_PER_SEC * 3 / 4));
    }

    #[test]
    fn test_rtc_next_wait_periodic_is_next_tick() {
        let mut core = core_at(T0 * NS_PER_SEC);
        core.data[usize::from(REG_A)] = 0x2f; // 2 Hz.
        core.data[usize::from(REG_B)] = B_24H | C_PF;

        assert_eq!(core.next_wait_ns(), Some(NS_PER_SEC / 2));
    }

    #[test]
    fn test_rtc_next_wait_none_while_irqf_unacknowledged() {
        let mut core = core_at(T0 * NS_PER_SEC);
        core.data[usize::from(REG_B)] = B_24H | C_UF;
        core.data[usize::from(REG_C)] = C_IRQF | C_UF;

        assert_eq!(core.next_wait_ns(), None);
    }
}
