//! The CPL0 part: IDT/TSS setup, the trap dispatcher and the `int3` service calls.
//!
//! Everything in this module runs at CPL0, which our KVM emulates instruction by
//! instruction, so it stays small: no formatting, no copies beyond a few bytes, no
//! x87/SSE (the target is soft-float), no `int3`/`int n`.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::*;

/// Registers saved by `isr_common` in boot.s, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

extern "C" {
    static isr_stubs: u8;
    static mut idt: [u64; 512];
    static mut gdt: [u64; 10];
    static tss: u8;
}

/// Local APIC MMIO base used for EOI (CPL3 updates it from the MADT).
pub static LAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
/// Interrupt counters, readable from CPL3 (RAM is user-accessible).
pub static IRQ_COUNTS: [AtomicU64; IRQ_COUNT_SLOTS] =
    [const { AtomicU64::new(0) }; IRQ_COUNT_SLOTS];

const RX_RING: usize = 1024;
static mut RX_BUF: [u8; RX_RING] = [0; RX_RING];
static RX_HEAD: AtomicU64 = AtomicU64::new(0);
static RX_TAIL: AtomicU64 = AtomicU64::new(0);

/// Builds the IDT (all 256 vectors; #BP callable from CPL3) and the TSS descriptor.
#[no_mangle]
extern "C" fn kernel_init() {
    // SAFETY: runs once on the boot CPU before any interrupt can arrive; the IDT and GDT
    // are static arrays defined in boot.s and nothing else accesses them concurrently.
    unsafe {
        let stubs = &isr_stubs as *const u8 as u64;
        let idt_ptr = core::ptr::addr_of_mut!(idt) as *mut u64;
        let mut v = 0u64;
        while v < 256 {
            let addr = stubs + v * 16;
            let dpl: u64 = if v == 3 { 3 } else { 0 };
            let low = (addr & 0xffff)
                | (0x10 << 16)
                | ((0x8e | (dpl << 5)) << 40)
                | (((addr >> 16) & 0xffff) << 48);
            idt_ptr.add((v * 2) as usize).write_volatile(low);
            idt_ptr.add((v * 2 + 1) as usize).write_volatile(addr >> 32);
            v += 1;
        }
        let base = &tss as *const u8 as u64;
        let desc = 0x67 | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((base >> 24) & 0xff) << 56);
        let gdt_ptr = core::ptr::addr_of_mut!(gdt) as *mut u64;
        gdt_ptr.add(8).write_volatile(desc);
        gdt_ptr.add(9).write_volatile(base >> 32);
    }
}

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O at CPL0 on ports chosen by this guest; no memory is touched.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}
fn outw(port: u16, v: u16) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}
fn outl(port: u16, v: u32) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}
fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}
fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}
fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// TSC at CPL0 (`rdtsc` is plain and emulated fine; no `rdtscp`).
fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no memory effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}

/// Writes `value` to byte port `port` `count` (>= 1) times in one tight loop of plain
/// instructions (`out`, `dec`, `jnz`: no string I/O, no `loop`) and returns the TSC cycles
/// the loop took. Each `out` is one VM exit; this is what `bench-pio` measures.
fn pio_out_repeat(port: u16, value: u8, count: u64) -> u64 {
    let t0 = rdtsc();
    // SAFETY: port I/O at CPL0 on a port the caller chose; no memory is touched. `count` is
    // at least 1 (checked by the dispatcher), so the loop ends after `count` writes.
    unsafe {
        asm!(
            "2:",
            "out dx, al",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) count => _,
            in("dx") port,
            in("al") value,
            options(nomem, nostack),
        )
    }
    rdtsc().wrapping_sub(t0)
}

const COM1: u16 = 0x3f8;

fn serial_putc(b: u8) {
    let mut tries = 0;
    while inb(COM1 + 5) & 0x20 == 0 && tries < 100_000 {
        tries += 1;
    }
    outb(COM1, b);
}

fn serial_hex(v: u64) {
    serial_putc(b'0');
    serial_putc(b'x');
    let mut shift = 64;
    while shift > 0 {
        shift -= 4;
        let d = ((v >> shift) & 0xf) as u8;
        serial_putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

fn serial_str(s: &[u8]) {
    for &b in s {
        serial_putc(b);
    }
}

/// Moves received bytes from the UART into the RX ring (bounded). Stops when the ring is
/// full, leaving the rest in the UART so the VMM's input backs up instead of being lost.
fn serial_drain() {
    let mut n = 0;
    while n < 64 {
        let head = RX_HEAD.load(Ordering::Relaxed);
        let tail = RX_TAIL.load(Ordering::Relaxed);
        if head.wrapping_sub(tail) >= RX_RING as u64 || inb(COM1 + 5) & 1 == 0 {
            break;
        }
        let b = inb(COM1);
        // SAFETY: index reduced modulo the ring size; only CPL0 with IF=0 touches the ring.
        unsafe { (*core::ptr::addr_of_mut!(RX_BUF))[(head as usize) % RX_RING] = b };
        RX_HEAD.store(head.wrapping_add(1), Ordering::Relaxed);
        n += 1;
    }
}

fn lapic_eoi() {
    let base = LAPIC_BASE.load(Ordering::Relaxed);
    // SAFETY: the LAPIC EOI register is MMIO inside the identity map.
    unsafe { ((base + 0xb0) as *mut u32).write_volatile(0) };
}

fn count(slot: usize) {
    if let Some(c) = IRQ_COUNTS.get(slot) {
        // Plain load/store: only this CPU (IF=0) updates the counters.
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

/// Prints a fatal-trap report on COM1 and parks the CPU forever.
fn fatal(f: &TrapFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 at CPL0 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    serial_str(b"\r\nFERRITE-TESTGUEST FATAL vector=");
    serial_hex(f.vector);
    serial_str(b" error=");
    serial_hex(f.error);
    serial_str(b" rip=");
    serial_hex(f.rip);
    serial_str(b" cs=");
    serial_hex(f.cs);
    serial_str(b" rsp=");
    serial_hex(f.rsp);
    serial_str(b" cr2=");
    serial_hex(cr2);
    serial_str(b"\r\n");
    halt_forever()
}

/// Parks this CPU with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CPL0 halt; nothing to preserve.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Panic at CPL0: report on COM1 directly (no services from CPL0) and park.
pub fn kernel_panic() -> ! {
    serial_str(b"\r\nFERRITE-TESTGUEST FATAL panic at CPL0\r\n");
    halt_forever()
}

/// Entry from `isr_common` for every vector.
#[no_mangle]
extern "C" fn trap_dispatch(f: &mut TrapFrame) {
    match f.vector {
        3 if f.cs & 3 == 3 => service(f),
        VEC_TIMER => {
            count(IRQ_SLOT_TIMER);
            lapic_eoi();
        }
        VEC_COM1 => {
            count(IRQ_SLOT_COM1);
            serial_drain();
            lapic_eoi();
        }
        VEC_SPURIOUS => count(IRQ_SLOT_SPURIOUS),
        v if (VEC_MSIX_FIRST..VEC_MSIX_FIRST + MSIX_VECTORS).contains(&v) => {
            count(IRQ_SLOT_MSIX + (v - VEC_MSIX_FIRST) as usize);
            lapic_eoi();
        }
        0..=31 => fatal(f),
        _ => {
            count(IRQ_SLOT_OTHER);
            lapic_eoi();
        }
    }
}

fn user_range_ok(ptr: u64, len: u64) -> bool {
    len <= SVC_MAX_LEN
        && ptr >= 0x1000
        && ptr
            .checked_add(len)
            .is_some_and(|end| end <= crate::sys::identity_limit())
}

/// The `int3` service dispatcher (see docs/testguest.md "Service calls").
fn service(f: &mut TrapFrame) {
    let (a, b, c) = (f.rdi, f.rsi, f.rdx);
    f.rax = match f.rax {
        SVC_WRITE => {
            if user_range_ok(a, b) {
                let mut i = 0;
                while i < b {
                    // SAFETY: range checked above; the whole range is identity mapped.
                    serial_putc(unsafe { ((a + i) as *const u8).read_volatile() });
                    i += 1;
                }
                b
            } else {
                SVC_ERROR
            }
        }
        SVC_READ => {
            if user_range_ok(a, b) {
                serial_drain();
                let mut n = 0;
                while n < b {
                    let head = RX_HEAD.load(Ordering::Relaxed);
                    let tail = RX_TAIL.load(Ordering::Relaxed);
                    if head == tail {
                        break;
                    }
                    // SAFETY: ring index reduced modulo its size; destination range checked.
                    unsafe {
                        let byte = (*core::ptr::addr_of!(RX_BUF))[(tail as usize) % RX_RING];
                        ((a + n) as *mut u8).write_volatile(byte);
                    }
                    RX_TAIL.store(tail.wrapping_add(1), Ordering::Relaxed);
                    n += 1;
                }
                n
            } else {
                SVC_ERROR
            }
        }
        SVC_WAIT => {
            let empty = RX_HEAD.load(Ordering::Relaxed) == RX_TAIL.load(Ordering::Relaxed);
            if empty && inb(COM1 + 5) & 1 == 0 {
                // SAFETY: sti;hlt is atomic w.r.t. interrupts (STI shadow); IF is cleared again
                // before iretq restores the caller's RFLAGS.
                unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
            }
            0
        }
        SVC_PIO_IN => match c {
            1 => inb(a as u16) as u64,
            2 => inw(a as u16) as u64,
            4 => inl(a as u16) as u64,
            _ => SVC_ERROR,
        },
        SVC_PIO_OUT => match c {
            1 => {
                outb(a as u16, b as u8);
                0
            }
            2 => {
                outw(a as u16, b as u16);
                0
            }
            4 => {
                outl(a as u16, b as u32);
                0
            }
            _ => SVC_ERROR,
        },
        SVC_RTC => rtc_read(),
        SVC_IRQ_ENABLE => {
            if a != 0 {
                f.rflags |= 0x200;
            } else {
                f.rflags &= !0x200;
            }
            0
        }
        SVC_TRIPLE_FAULT => {
            let null_idt: [u64; 2] = [0, 0];
            // SAFETY: deliberately loads an empty IDT and faults: the CPU shuts down (reset).
            unsafe { asm!("lidt [{}]", "ud2", in(reg) null_idt.as_ptr(), options(nostack)) };
            SVC_ERROR
        }
        SVC_HALT => halt_forever(),
        SVC_PIO_OUT_REPEAT => {
            if (1..=BENCH_MAX_N).contains(&c) {
                pio_out_repeat(a as u16, b as u8, c)
            } else {
                SVC_ERROR
            }
        }
        _ => SVC_ERROR,
    };
}

fn cmos(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

/// Reads the CMOS RTC once no update is in progress; packed as documented in abi.rs.
fn rtc_read() -> u64 {
    let mut tries = 0;
    while cmos(0x0a) & 0x80 != 0 && tries < 10_000 {
        tries += 1;
    }
    let regs = [0x00u8, 0x02, 0x04, 0x07, 0x08, 0x09, 0x0b, 0x32];
    let mut packed = 0u64;
    for (i, &r) in regs.iter().enumerate() {
        packed |= (cmos(r) as u64) << (i * 8);
    }
    packed
}
