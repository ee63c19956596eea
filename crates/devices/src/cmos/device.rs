//! The CMOS/RTC as a port-I/O bus device at 0x70 (index) / 0x71 (data), with an optional
//! interrupt timer thread for IRQ 8.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_device::{BusDevice, LegacyIrq};

use super::clock::{HostClock, WallClock};
use super::core::{RtcCore, CMOS_SIZE, REG_C};
use super::metrics::CmosMetrics;
use super::state::CmosState;
use crate::error::DeviceError;
use crate::irq::IrqLine;

/// Length of the bus range: the index port and the data port.
pub const CMOS_PORT_LEN: u64 = 2;

/// Guest RAM as the CMOS memory-size fields report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmosMemory {
    /// Bytes of RAM below 4 GiB, counted from address 0.
    pub below_4g: u64,
    /// Bytes of RAM at and above 4 GiB.
    pub above_4g: u64,
}

impl CmosMemory {
    /// Split `ram_size` bytes the way the memory map places them (below the MMIO hole, then
    /// from 4 GiB).
    pub fn from_ram_size(ram_size: u64) -> Self {
        let below_4g = ram_size.min(arch::layout::MMIO_HOLE_START);
        Self {
            below_4g,
            above_4g: ram_size - below_4g,
        }
    }
}

/// What the device and its timer thread share.
struct Shared {
    core: Mutex<RtcCore>,
    /// Wakes the timer thread when a register change moves the next deadline.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RtcCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The CMOS RTC and memory.
///
/// Without an IRQ line (the default) register C's flags can only be polled. After
/// [`Cmos::attach_irq`] a timer thread raises IRQ 8 for enabled update-ended, alarm and
/// periodic events, like the MC146818.
pub struct Cmos {
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
    metrics: Arc<CmosMetrics>,
}

impl Cmos {
    /// A CMOS whose clock follows the host's wall clock, reporting `memory`.
    pub fn new(memory: CmosMemory) -> Self {
        Self::with_clock(memory, Box::new(HostClock))
    }

    /// A CMOS whose clock follows `clock` (tests use a fake clock).
    pub fn with_clock(memory: CmosMemory, clock: Box<dyn WallClock>) -> Self {
        let core = RtcCore::new(memory, clock);
        let metrics = core.metrics.clone();
        Self {
            shared: Arc::new(Shared {
                core: Mutex::new(core),
                wake: Condvar::new(),
            }),
            timer: None,
            metrics,
        }
    }

    /// Raise `irq` (GSI 8, `irqs::RTC`) for the interrupts the guest enables in register B.
    /// Starts the timer thread; a second call replaces the line.
    pub fn attach_irq(&mut self, irq: LegacyIrq) -> Result<(), DeviceError> {
        self.shared.lock().irq = Some(IrqLine::new(irq));
        if self.timer.is_none() {
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name("ferrite-rtc".into())
                .spawn(move || run_timer(&shared))?;
            self.timer = Some(thread);
        }
        self.shared.wake.notify_all();
        Ok(())
    }

    /// The counters of this device.
    pub fn metrics(&self) -> Arc<CmosMetrics> {
        self.metrics.clone()
    }

    /// The guest-visible state, for snapshots.
    pub fn save(&self) -> CmosState {
        let core = self.shared.lock();
        CmosState {
            index: core.index,
            data: core.data.to_vec(),
            clock_offset_ns: core.clock_offset_ns,
        }
    }

    /// Load a saved state (validated: exactly 128 bytes, index in range). Events are counted
    /// from the restore on; pending flags in register C stay pending.
    pub fn restore(&mut self, state: &CmosState) -> Result<(), DeviceError> {
        let data: [u8; CMOS_SIZE] = state.data.as_slice().try_into().map_err(|_| {
            DeviceError::invalid_state(
                "cmos",
                format!(
                    "{} bytes of CMOS memory, expected {CMOS_SIZE}",
                    state.data.len()
                ),
            )
        })?;
        if usize::from(state.index) >= CMOS_SIZE {
            return Err(DeviceError::invalid_state(
                "cmos",
                format!("index {:#x} out of range", state.index),
            ));
        }
        let mut core = self.shared.lock();
        core.index = state.index;
        core.data = data;
        core.clock_offset_ns = state.clock_offset_ns;
        core.last_event_ns = core.guest_now_ns();
        // A saved, unacknowledged interrupt must reach the new VM's interrupt controller.
        core.data[usize::from(REG_C)] &= !super::core::C_IRQF;
        core.update_flags();
        drop(core);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Run `f` on the registers, then wake the timer thread if it must recompute.
    fn with_core<T>(&self, f: impl FnOnce(&mut RtcCore) -> T) -> T {
        let mut core = self.shared.lock();
        let result = f(&mut core);
        let dirty = std::mem::take(&mut core.timer_dirty);
        drop(core);
        if dirty && self.timer.is_some() {
            self.shared.wake.notify_all();
        }
        result
    }
}

impl Drop for Cmos {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.timer.take() {
            let _ = thread.join();
        }
    }
}

/// The timer thread: sleep until the next possible event, update the flags (which raises the
/// IRQ), repeat until the device is dropped.
fn run_timer(shared: &Shared) {
    let mut core = shared.lock();
    loop {
        if core.stopped {
            return;
        }
        core.update_flags();
        core.timer_dirty = false;
        core = match core.next_wait_ns() {
            None => shared.wake.wait(core).unwrap_or_else(|e| e.into_inner()),
            Some(ns) => {
                let wait = Duration::from_nanos(u64::try_from(ns).unwrap_or(1));
                match shared.wake.wait_timeout(core, wait) {
                    Ok((guard, _)) => guard,
                    Err(e) => e.into_inner().0,
                }
            }
        };
    }
}

impl BusDevice for Cmos {
    /// Each byte of a wider access goes to the next port, as an ISA bus splits it.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.with_core(|core| {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = core.read_port(offset.saturating_add(i as u64));
            }
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.with_core(|core| {
            for (i, byte) in data.iter().enumerate() {
                core.write_port(offset.saturating_add(i as u64), *byte);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::super::core::*;
    use super::*;

    /// 2024-02-29T23:59:58Z, a Thursday.
    const T0: i64 = 1_709_251_198;

    /// A clock the test moves by hand; each reading advances it by `step_ns`.
    #[derive(Clone)]
    struct FakeClock {
        now_ns: Arc<AtomicI64>,
        step_ns: i64,
    }

    impl WallClock for FakeClock {
        fn now_ns(&self) -> i64 {
            self.now_ns.fetch_add(self.step_ns, Ordering::SeqCst)
        }
    }

    fn cmos_at(ns: i64, step_ns: i64) -> (Cmos, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(ns));
        let clock = FakeClock {
            now_ns: now.clone(),
            step_ns,
        };
        (
            Cmos::with_clock(CmosMemory::default(), Box::new(clock)),
            now,
        )
    }

    fn read_reg(c: &mut Cmos, reg: u8) -> u8 {
        c.write(INDEX_OFFSET, &[reg]);
        let mut data = [0u8; 1];
        c.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn write_reg(c: &mut Cmos, reg: u8, value: u8) {
        c.write(INDEX_OFFSET, &[reg]);
        c.write(DATA_OFFSET, &[value]);
    }

    fn time_regs(c: &mut Cmos) -> [u8; 8] {
        TIME_REGS.map(|reg| read_reg(c, reg))
    }

    #[test]
    fn test_cmos_rtc_defaults_to_bcd_24h() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        let regs = time_regs(&mut c);

        // sec, min, hour, weekday (Thursday = 5), day, month, year, century.
        assert_eq!(regs, [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]);
        assert_eq!(read_reg(&mut c, REG_B), 0x02);
        assert_eq!(read_reg(&mut c, REG_D), 0x80);
    }

    #[test]
    fn test_cmos_rtc_binary_mode_per_register_b() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        write_reg(&mut c, REG_B, B_24H | B_DM_BINARY);

        assert_eq!(time_regs(&mut c), [58, 59, 23, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn test_cmos_rtc_12h_mode_sets_pm_flag() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        write_reg(&mut c, REG_B, 0);

        assert_eq!(read_reg(&mut c, REG_HOURS), 0x11 | HOUR_PM);
    }

    #[test]
    fn test_cmos_index_nmi_bit_is_masked() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);
        write_reg(&mut c, 0x40, 0xab);

        let value = read_reg(&mut c, 0x80 | 0x40);

        assert_eq!(value, 0xab);
    }

    #[test]
    fn test_cmos_uip_set_just_before_second_boundary() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC + NS_PER_SEC - 100_000, 0);

        assert_ne!(read_reg(&mut c, REG_A) & A_UIP, 0);
    }

    #[test]
    fn test_cmos_uip_poll_loop_terminates() {
        // Every clock reading advances 10 µs, like a guest polling register A.
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC + NS_PER_SEC - UIP_WINDOW_NS, 10_000);

        let mut polls = 0;
        while read_reg(&mut c, REG_A) & A_UIP != 0 {
            polls += 1;
            assert!(polls < 1000, "UIP never cleared");
        }

        assert!(polls > 0);
        assert_eq!(read_reg(&mut c, REG_SECONDS), 0x59);
    }

    #[test]
    fn test_cmos_guest_set_clock_advances_from_written_value() {
        let (mut c, now) = cmos_at(T0 * NS_PER_SEC, 0);

        // Linux's sequence: SET, write the registers, clear SET. 2031-12-31 10:20:30.
        write_reg(&mut c, REG_B, B_24H | B_SET);
        for (reg, value) in [
            (REG_SECONDS, 0x30),
            (REG_MINUTES, 0x20),
            (REG_HOURS, 0x10),
            (REG_DAY, 0x31),
            (REG_MONTH, 0x12),
            (REG_YEAR, 0x31),
            (REG_CENTURY, 0x20),
        ] {
            write_reg(&mut c, reg, value);
        }
        write_reg(&mut c, REG_B, B_24H);
        now.fetch_add(5 * NS_PER_SEC, Ordering::SeqCst);

        let regs = time_regs(&mut c);

        // 2031-12-31 was a Wednesday (4).
        assert_eq!(regs, [0x35, 0x20, 0x10, 0x04, 0x31, 0x12, 0x31, 0x20]);
        assert_eq!(c.metrics().clock_sets.get(), 1);
    }

    #[test]
    fn test_cmos_frozen_registers_read_back_written_values() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        write_reg(&mut c, REG_B, B_24H | B_SET);
        write_reg(&mut c, REG_MINUTES, 0x42);

        assert_eq!(read_reg(&mut c, REG_MINUTES), 0x42);
        assert_eq!(read_reg(&mut c, REG_SECONDS), 0x58);
        assert_eq!(read_reg(&mut c, REG_A) & A_UIP, 0);
    }

    #[test]
    fn test_cmos_lone_time_write_edits_running_clock() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        write_reg(&mut c, REG_YEAR, 0x28); // 2028-02-29 exists.

        assert_eq!(time_regs(&mut c)[6], 0x28);
        assert_eq!(time_regs(&mut c)[0], 0x58);
    }

    #[test]
    fn test_cmos_invalid_guest_time_is_ignored() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        write_reg(&mut c, REG_B, B_24H | B_SET);
        write_reg(&mut c, REG_MONTH, 0x13);
        write_reg(&mut c, REG_B, B_24H);

        assert_eq!(time_regs(&mut c)[5], 0x02);
        assert_eq!(c.metrics().invalid_clock_sets.get(), 1);
    }

    #[test]
    fn test_cmos_12h_guest_write_decodes_pm() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);

        write_reg(&mut c, REG_B, B_SET); // 12h, BCD.
        write_reg(&mut c, REG_HOURS, 0x12); // 12 AM = 00h.
        write_reg(&mut c, REG_B, 0);
        write_reg(&mut c, REG_B, B_24H);

        assert_eq!(read_reg(&mut c, REG_HOURS), 0x00);
    }

    #[test]
    fn test_cmos_memory_fields_for_large_ram() {
        let memory = CmosMemory::from_ram_size(8 << 30);
        let c = Cmos::with_clock(memory, Box::new(HostClock));
        let d = c.save().data;

        // 63 MiB cap on the KiB fields.
        assert_eq!((d[0x17], d[0x18]), (0x00, 0xfc));
        assert_eq!((d[0x30], d[0x31]), (0x00, 0xfc));
        // (3 GiB - 16 MiB) / 64 KiB = 0xbf00.
        assert_eq!((d[0x34], d[0x35]), (0x00, 0xbf));
        // 5 GiB / 64 KiB = 0x14000.
        assert_eq!((d[0x5b], d[0x5c], d[0x5d]), (0x00, 0x40, 0x01));
        assert_eq!((d[0x15], d[0x16]), (0x80, 0x02));
    }

    #[test]
    fn test_cmos_memory_fields_for_small_ram() {
        let c = Cmos::with_clock(CmosMemory::from_ram_size(32 << 20), Box::new(HostClock));
        let d = c.save().data;

        // 31 MiB above 1 MiB = 31744 KiB = 0x7c00.
        assert_eq!((d[0x30], d[0x31]), (0x00, 0x7c));
        // 16 MiB above 16 MiB = 256 chunks.
        assert_eq!((d[0x34], d[0x35]), (0x00, 0x01));
        assert_eq!((d[0x5b], d[0x5c], d[0x5d]), (0, 0, 0));
    }

    #[test]
    fn test_cmos_odd_offsets_and_widths_do_not_panic() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);
        let mut wide = [0u8; 8];
        let mut junk = [0u8; 8];

        // A 16-bit write to 0x70 sets the index then writes the data port.
        c.write(INDEX_OFFSET, &[0x41, 0x99]);
        c.read(INDEX_OFFSET, &mut wide);
        c.write(u64::MAX, &[1, 2, 3]);
        c.read(u64::MAX - 1, &mut junk);
        c.read(DATA_OFFSET, &mut []);

        assert_eq!(wide[..2], [0xff, 0x99]);
        assert_eq!(read_reg(&mut c, 0x41), 0x99);
        assert!(c.metrics().invalid_accesses.get() > 0);
    }

    #[test]
    fn test_cmos_save_restore_keeps_memory_and_clock_offset() {
        let (mut c, _) = cmos_at(T0 * NS_PER_SEC, 0);
        write_reg(&mut c, 0x50, 0x77);
        write_reg(&mut c, REG_YEAR, 0x40);
        let json = serde_json::to_string(&c.save()).unwrap();
        let (mut fresh, _) = cmos_at(T0 * NS_PER_SEC, 0);

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        assert_eq!(read_reg(&mut fresh, 0x50), 0x77);
        assert_eq!(read_reg(&mut fresh, REG_YEAR), 0x40);
    }

    #[test]
    fn test_cmos_restore_wrong_size_is_refused() {
        let (mut c, _) = cmos_at(0, 0);
        let mut state = c.save();
        state.data.pop();

        assert!(c.restore(&state).is_err());
    }

    fn with_irq(c: &mut Cmos) -> vmm_sys_util::eventfd::EventFd {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = event.try_clone().unwrap();
        c.attach_irq(LegacyIrq { gsi: 8, event }).unwrap();
        probe
    }

    #[test]
    fn test_cmos_update_flag_set_after_second_boundary_when_polled() {
        let (mut c, now) = cmos_at(T0 * NS_PER_SEC + NS_PER_SEC / 2, 0);
        write_reg(&mut c, REG_A, 0x20); // Periodic source off.
        read_reg(&mut c, REG_C);

        now.fetch_add(NS_PER_SEC, Ordering::SeqCst);
        let flags = read_reg(&mut c, REG_C);

        assert_eq!(flags, C_UF);
        assert_eq!(read_reg(&mut c, REG_C), 0);
    }

    #[test]
    fn test_cmos_update_interrupt_raises_irq_and_irqf() {
        let (mut c, now) = cmos_at(T0 * NS_PER_SEC + NS_PER_SEC / 2, 0);
        let irq = with_irq(&mut c);
        write_reg(&mut c, REG_A, 0x20);
        write_reg(&mut c, REG_B, B_24H | C_UF);

        now.fetch_add(NS_PER_SEC, Ordering::SeqCst);
        let flags = read_reg(&mut c, REG_C);

        assert_eq!(flags, C_IRQF | C_UF);
        assert!(irq.read().unwrap() >= 1);
        assert!(c.metrics().interrupts.get() >= 1);
    }

    #[test]
    fn test_cmos_alarm_flag_when_alarm_time_passes() {
        let (mut c, now) = cmos_at(T0 * NS_PER_SEC, 0);
        write_reg(&mut c, REG_A, 0x20);
        write_reg(&mut c, REG_SECONDS_ALARM, 0x00); // T0 is xx:59:58.
        write_reg(&mut c, REG_MINUTES_ALARM, 0xc0);
        write_reg(&mut c, REG_HOURS_ALARM, 0xff);
        write_reg(&mut c, REG_B, B_24H | C_AF);
        read_reg(&mut c, REG_C);

        now.fetch_add(NS_PER_SEC, Ordering::SeqCst);
        let before = read_reg(&mut c, REG_C);
        now.fetch_add(NS_PER_SEC, Ordering::SeqCst);
        let at = read_reg(&mut c, REG_C);

        assert_eq!(before, C_UF);
        assert_eq!(at, C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn test_cmos_periodic_flag_at_programmed_rate() {
        let (mut c, now) = cmos_at(T0 * NS_PER_SEC, 0);
        write_reg(&mut c, REG_A, 0x2f); // 2 Hz.
        write_reg(&mut c, REG_B, B_24H | C_PF);
        read_reg(&mut c, REG_C);

        now.fetch_add(NS_PER_SEC / 4, Ordering::SeqCst);
        let early = read_reg(&mut c, REG_C);
        now.fetch_add(NS_PER_SEC / 4, Ordering::SeqCst);
        let due = read_reg(&mut c, REG_C);

        assert_eq!(early, 0);
        assert_eq!(due, C_IRQF | C_PF);
    }

    #[test]
    fn test_cmos_frozen_clock_sets_no_update_flag() {
        let (mut c, now) = cmos_at(T0 * NS_PER_SEC, 0);
        write_reg(&mut c, REG_A, 0x20);
        write_reg(&mut c, REG_B, B_24H | B_SET);
        read_reg(&mut c, REG_C);

        now.fetch_add(3 * NS_PER_SEC, Ordering::SeqCst);

        assert_eq!(read_reg(&mut c, REG_C), 0);
    }

    #[test]
    fn test_cmos_timer_thread_raises_update_interrupt_on_host_clock() {
        let mut c = Cmos::new(CmosMemory::default());
        let irq = with_irq(&mut c);

        write_reg(&mut c, REG_B, B_24H | C_UF);
        // Wait for the thread's interrupt (the minute is a watchdog against a hang, not a
        // performance threshold: the event is due within a second).
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&irq),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 60_000) };

        assert_eq!(ready, 1);
        assert_eq!(read_reg(&mut c, REG_C) & (C_IRQF | C_UF), C_IRQF | C_UF);
    }
}
