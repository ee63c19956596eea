//! Interrupt controllers, timers, CPU start-up and power control, driven from CPL3
//! (LAPIC/IOAPIC are MMIO; legacy ports go through the port-I/O services).

use core::sync::atomic::{AtomicU32, Ordering};

use crate::abi::{VEC_COM1, VEC_SPURIOUS, VEC_TIMER};
use crate::acpi::{Acpi, Madt};
use crate::kernel::LAPIC_BASE;
use crate::sys::{self, mmio, phys_ok};

/// Physical address the AP trampoline is copied to (SIPI vector 0x08).
pub const AP_TRAMPOLINE: u64 = 0x8000;

/// Idle wake-up period without a COM1 interrupt: 10 ms at KVM's 1 GHz APIC clock / 16.
const WAKE_COUNT_POLL: u32 = 625_000;
/// Idle wake-up period with a COM1 interrupt: 100 ms at KVM's APIC clock.
const WAKE_COUNT_IRQ: u32 = 6_250_000;
/// LAPIC timer initial count for the idle wake-up (0 = timer not set up).
static WAKE_COUNT: AtomicU32 = AtomicU32::new(0);

fn lapic() -> u64 {
    LAPIC_BASE.load(Ordering::Relaxed)
}

/// APIC ID of the boot CPU (from the LAPIC ID register).
pub fn bsp_apic_id() -> u32 {
    mmio::r32(lapic() + 0x20) >> 24
}

/// Arms the one-shot LAPIC timer so an idle `wait` also wakes up without input.
pub fn arm_wakeup_timer() {
    let count = WAKE_COUNT.load(Ordering::Relaxed);
    if count != 0 {
        mmio::w32(lapic() + 0x380, count);
    }
}

/// Result of interrupt set-up, for the boot banner.
pub struct IrqSetup {
    /// BSP local APIC ID.
    pub bsp_apic_id: u32,
    /// COM1 routed through the IOAPIC.
    pub com1_irq: bool,
}

/// Masks the PICs, enables the LAPIC (+ one-shot timer), routes COM1 RX through the
/// IOAPIC and finally enables interrupts for CPL3.
pub fn setup_interrupts(acpi: Option<&Acpi>) -> IrqSetup {
    // Legacy 8259s: mask everything (they would deliver ExtINT on LINT0).
    sys::pio_out(0x21, 0xff, 1);
    sys::pio_out(0xa1, 0xff, 1);
    let madt: Option<&Madt> = acpi.and_then(|a| a.madt.as_ref());
    if let Some(m) = madt {
        if m.lapic_base != 0 && phys_ok(m.lapic_base, 0x1000) {
            LAPIC_BASE.store(m.lapic_base, Ordering::Relaxed);
        }
    }
    let l = lapic();
    mmio::w32(l + 0xf0, 0x100 | VEC_SPURIOUS as u32); // software enable
    mmio::w32(l + 0x80, 0); // TPR
    mmio::w32(l + 0x350, 1 << 16); // LINT0 masked
    mmio::w32(l + 0x370, 1 << 16); // LVT error masked
    mmio::w32(l + 0x3e0, 0x3); // divide by 16
    mmio::w32(l + 0x320, VEC_TIMER as u32); // one-shot, unmasked
    WAKE_COUNT.store(WAKE_COUNT_POLL, Ordering::Relaxed);
    let bsp = bsp_apic_id();

    // COM1: receive-data interrupt, OUT2 (gates the IRQ line on a 16550).
    sys::pio_out(0x3f9, 0x01, 1);
    sys::pio_out(0x3fc, 0x0b, 1);
    let mut com1_irq = false;
    let (ioapic, gsi_base, gsi) = match madt {
        Some(m) => (m.ioapic_base.unwrap_or(0), m.ioapic_gsi_base, m.com1_gsi),
        None => (0xfec0_0000, 0, 4),
    };
    if ioapic != 0 && phys_ok(ioapic, 0x20) && gsi >= gsi_base {
        let pin = gsi - gsi_base;
        mmio::w32(ioapic, 0x01);
        let entries = ((mmio::r32(ioapic + 0x10) >> 16) & 0xff) + 1;
        if pin < entries {
            mmio::w32(ioapic, 0x10 + 2 * pin + 1);
            mmio::w32(ioapic + 0x10, bsp << 24);
            mmio::w32(ioapic, 0x10 + 2 * pin);
            mmio::w32(ioapic + 0x10, VEC_COM1 as u32); // fixed, physical, edge, active high
            com1_irq = true;
            // The COM1 interrupt wakes `wait`; the timer only guards against a lost edge.
            WAKE_COUNT.store(WAKE_COUNT_IRQ, Ordering::Relaxed);
        }
    }
    sys::irq_enable(true);
    IrqSetup {
        bsp_apic_id: bsp,
        com1_irq,
    }
}

/// TSC frequency and how it was found.
pub struct TscInfo {
    /// Ticks per second.
    pub hz: u64,
    /// "pmtimer", "cpuid15", "cpuid16", "hypervisor" or "guess".
    pub source: &'static str,
}

/// Determines the TSC frequency: ACPI PM timer measurement, else CPUID, else a guess.
pub fn tsc_frequency(acpi: Option<&Acpi>) -> TscInfo {
    let pm = acpi.and_then(|a| a.fadt).map(|f| f.pm_tmr).unwrap_or(0);
    if pm != 0 && pm <= 0xffff {
        let read = || (sys::pio_in(pm as u16, 4) & 0xff_ffff) as u32;
        let start = read();
        let t0 = sys::rdtsc();
        let mut tries = 0u32;
        // 35795 ticks = 10 ms at 3.579545 MHz.
        loop {
            let now = read();
            let delta = now.wrapping_sub(start) & 0xff_ffff;
            if delta >= 35_795 {
                let t1 = sys::rdtsc();
                let hz = (t1 - t0) as u128 * 3_579_545 / delta as u128;
                if hz > 10_000_000 {
                    return TscInfo {
                        hz: hz as u64,
                        source: "pmtimer",
                    };
                }
                break;
            }
            tries += 1;
            if tries > 200_000 || (tries > 1000 && delta == 0) {
                break;
            }
        }
    }
    let max = sys::cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, crystal, _] = sys::cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return TscInfo {
                hz: crystal as u64 * num as u64 / den as u64,
                source: "cpuid15",
            };
        }
    }
    if max >= 0x16 {
        let mhz = sys::cpuid(0x16, 0)[0] & 0xffff;
        if mhz != 0 {
            return TscInfo {
                hz: mhz as u64 * 1_000_000,
                source: "cpuid16",
            };
        }
    }
    let hv = sys::cpuid(0x4000_0000, 0)[0];
    if (0x4000_0010..0x4001_0000).contains(&hv) {
        let khz = sys::cpuid(0x4000_0010, 0)[0];
        if khz != 0 {
            return TscInfo {
                hz: khz as u64 * 1000,
                source: "hypervisor",
            };
        }
    }
    TscInfo {
        hz: 2_000_000_000,
        source: "guess",
    }
}

/// Busy-waits about `us` microseconds using the TSC.
pub fn delay_us(tsc_hz: u64, us: u64) {
    let end = sys::rdtsc().wrapping_add(tsc_hz / 1_000_000 * us);
    while (sys::rdtsc().wrapping_sub(end) as i64) < 0 {
        core::hint::spin_loop();
    }
}

fn icr_send(dest: u32, low: u32) {
    let l = lapic();
    let mut tries = 0;
    while mmio::r32(l + 0x300) & (1 << 12) != 0 && tries < 100_000 {
        tries += 1;
    }
    mmio::w32(l + 0x310, dest << 24);
    mmio::w32(l + 0x300, low);
}

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static mut ap_started: u32;
}

fn ap_count() -> u32 {
    // SAFETY: a 32-bit counter in .data that APs increment with `lock inc`.
    unsafe { core::ptr::addr_of!(ap_started).read_volatile() }
}

/// Starts every enabled MADT processor except the BSP with INIT-SIPI-SIPI; returns how
/// many CPUs run (BSP included).
pub fn start_aps(madt: &Madt, bsp: u32, tsc_hz: u64) -> u32 {
    // SAFETY: the trampoline bytes are a static blob in .rodata delimited by two symbols.
    let blob = unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let len = core::ptr::addr_of!(ap_tramp_end) as usize - start as usize;
        core::slice::from_raw_parts(start, len)
    };
    for (i, &b) in blob.iter().enumerate() {
        mmio::w8(AP_TRAMPOLINE + i as u64, b);
    }
    // SAFETY: no AP runs yet; reset the counter they increment.
    unsafe { core::ptr::addr_of_mut!(ap_started).write_volatile(0) };
    let ids = &madt.apic_ids[..(madt.cpus as usize).min(madt.apic_ids.len())];
    let targets = || ids.iter().copied().filter(|&id| id != bsp && id < 255);
    let expected = targets().count() as u32;
    if expected == 0 {
        return 1;
    }
    for id in targets() {
        icr_send(id, 0x4500); // INIT, assert
    }
    delay_us(tsc_hz, 10_000);
    for _ in 0..2 {
        for id in targets() {
            icr_send(id, 0x4600 | (AP_TRAMPOLINE >> 12) as u32); // STARTUP
        }
        delay_us(tsc_hz, 200);
    }
    let deadline = sys::rdtsc().wrapping_add(tsc_hz.saturating_mul(5));
    while ap_count() < expected && (sys::rdtsc().wrapping_sub(deadline) as i64) < 0 {
        delay_us(tsc_hz, 1000);
    }
    1 + ap_count()
}

fn gas_write(space: u8, addr: u64, value: u64, width: u64) -> bool {
    match space {
        1 if addr <= 0xffff => {
            sys::pio_out(addr as u16, value, width);
            true
        }
        0 if phys_ok(addr, width) => {
            match width {
                1 => mmio::w8(addr, value as u8),
                2 => mmio::w16(addr, value as u16),
                _ => mmio::w32(addr, value as u32),
            }
            true
        }
        _ => false,
    }
}

/// ACPI soft-off (S5): PM1a_CNT, or the hardware-reduced sleep control register.
/// Returns only if the machine is still running.
pub fn poweroff(acpi: Option<&Acpi>, tsc_hz: u64) {
    let fadt = acpi.and_then(|a| a.fadt);
    let typ = fadt.and_then(|f| f.s5_typ).unwrap_or(5) as u64;
    match fadt {
        Some(f) if f.pm1a_cnt != 0 && f.pm1a_cnt <= 0xffff => {
            sys::pio_out(f.pm1a_cnt as u16, ((typ & 7) << 10) | (1 << 13), 2)
        }
        Some(f) if f.sleep_ctl.is_some() => {
            if let Some(g) = f.sleep_ctl {
                gas_write(g.space, g.addr, ((typ & 7) << 2) | (1 << 5), 1);
            }
        }
        _ => sys::pio_out(0x604, (5 << 10) | (1 << 13), 2),
    }
    delay_us(tsc_hz, 500_000);
}

/// Reset: FADT reset register, then the i8042 (0xfe to port 0x64), then a triple fault.
pub fn reboot(acpi: Option<&Acpi>, tsc_hz: u64) {
    if let Some((g, v)) = acpi.and_then(|a| a.fadt).and_then(|f| f.reset) {
        gas_write(g.space, g.addr, v as u64, 1);
        delay_us(tsc_hz, 200_000);
    }
    sys::pio_out(0x64, 0xfe, 1);
    delay_us(tsc_hz, 200_000);
    sys::triple_fault();
}
