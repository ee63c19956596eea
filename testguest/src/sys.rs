//! CPL3 side of the service calls, plus small native helpers (TSC, MMIO).

use core::arch::asm;

use crate::abi::*;

/// Performs one `int3` service call.
pub fn svc(n: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret: u64;
    // SAFETY: `int3` enters the CPL0 dispatcher, which preserves every register but rax
    // and only touches memory the arguments describe.
    unsafe {
        asm!("int3", inlateout("rax") n => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack));
    }
    ret
}

/// Writes bytes to the serial console.
pub fn write(buf: &[u8]) {
    for chunk in buf.chunks(SVC_MAX_LEN as usize) {
        svc(SVC_WRITE, chunk.as_ptr() as u64, chunk.len() as u64, 0);
    }
}

/// Reads pending serial input; returns the number of bytes stored.
pub fn read(buf: &mut [u8]) -> usize {
    let len = buf.len().min(SVC_MAX_LEN as usize);
    let n = svc(SVC_READ, buf.as_mut_ptr() as u64, len as u64, 0);
    if n == SVC_ERROR {
        0
    } else {
        (n as usize).min(len)
    }
}

/// Sleeps until the next interrupt (unless input is pending).
pub fn wait() {
    svc(SVC_WAIT, 0, 0, 0);
}

/// Port input through CPL0.
pub fn pio_in(port: u16, width: u64) -> u64 {
    svc(SVC_PIO_IN, port as u64, 0, width)
}

/// Port output through CPL0.
pub fn pio_out(port: u16, value: u64, width: u64) {
    svc(SVC_PIO_OUT, port as u64, value, width);
}

/// Writes `value` to byte port `port` `count` times in one CPL0 loop (one service call);
/// returns the TSC cycles the loop took, or `None` if `count` is 0 or above `BENCH_MAX_N`.
pub fn pio_out_repeat(port: u16, value: u8, count: u64) -> Option<u64> {
    let r = svc(SVC_PIO_OUT_REPEAT, port as u64, value as u64, count);
    (r != SVC_ERROR).then_some(r)
}

/// Raw CMOS RTC registers (see `SVC_RTC`).
pub fn rtc() -> u64 {
    svc(SVC_RTC, 0, 0, 0)
}

/// Enables or disables interrupts for CPL3.
pub fn irq_enable(on: bool) {
    svc(SVC_IRQ_ENABLE, on as u64, 0, 0);
}

/// Resets the CPU by triple fault.
pub fn triple_fault() {
    svc(SVC_TRIPLE_FAULT, 0, 0, 0);
}

/// Parks the CPU forever.
pub fn halt() -> ! {
    loop {
        svc(SVC_HALT, 0, 0, 0);
    }
}

/// Time-stamp counter (native at CPL3).
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no memory effects; CR4.TSD is clear.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}

/// CPUID (native at CPL3).
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

extern "C" {
    static mut identity_gib: u64;
    static mut pdpt: [u64; 512];
    static mut pds: [[u64; 512]; 512];
}

/// Completes the identity map to 512 GiB when boot.s could only map 4 GiB (no 1 GiB pages):
/// fills page directories 4..512 with 2 MiB pages, then makes each PDPT entry present.
/// Runs natively at CPL3 (the page tables are identity mapped and user-accessible). A
/// not-present -> present change needs no TLB invalidation.
pub fn extend_identity_map() {
    // SAFETY: single-threaded CPL3 code before anything above 4 GiB is touched; the PDs
    // written here are not referenced by any present PDPT entry until the final store.
    unsafe {
        let gib = core::ptr::addr_of!(identity_gib).read_volatile();
        if gib >= 512 {
            return;
        }
        let pdpt_ptr = core::ptr::addr_of_mut!(pdpt) as *mut u64;
        let pds_ptr = core::ptr::addr_of_mut!(pds) as *mut u64;
        for g in gib..512 {
            let pd = pds_ptr.add((g * 512) as usize);
            for e in 0..512u64 {
                pd.add(e as usize)
                    .write_volatile(((g << 30) + (e << 21)) | 0x87);
            }
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            pdpt_ptr.add(g as usize).write_volatile(pd as u64 | 7);
        }
        core::ptr::addr_of_mut!(identity_gib).write_volatile(512);
    }
}

/// Highest physical address (exclusive) covered by the identity map.
pub fn identity_limit() -> u64 {
    // SAFETY: written by boot.s before CPL3 started and by `extend_identity_map`.
    let gib = unsafe { core::ptr::addr_of!(identity_gib).read_volatile() };
    gib.min(512) << 30
}

/// True if `[addr, addr+len)` is identity mapped and not the null address.
pub fn phys_ok(addr: u64, len: u64) -> bool {
    addr != 0
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= identity_limit())
}

/// MMIO / physical-memory access helpers (identity mapped, user-accessible).
///
/// Aligned accesses are single volatile loads/stores of the given width (what MMIO
/// registers need). Unaligned ones (ACPI tables in RAM have unaligned fields) are split
/// into volatile byte accesses, little-endian.
pub mod mmio {
    /// 8-bit read.
    pub fn r8(addr: u64) -> u8 {
        // SAFETY: callers pass addresses checked with `phys_ok` (identity mapped).
        unsafe { (addr as *const u8).read_volatile() }
    }
    /// 8-bit write.
    pub fn w8(addr: u64, v: u8) {
        // SAFETY: as `r8`.
        unsafe { (addr as *mut u8).write_volatile(v) }
    }
    fn r_bytes(addr: u64, n: u64) -> u64 {
        (0..n).fold(0u64, |acc, i| {
            acc | (r8(addr.wrapping_add(i)) as u64) << (8 * i)
        })
    }
    fn w_bytes(addr: u64, v: u64, n: u64) {
        for i in 0..n {
            w8(addr.wrapping_add(i), (v >> (8 * i)) as u8);
        }
    }
    /// 16-bit read.
    pub fn r16(addr: u64) -> u16 {
        if !addr.is_multiple_of(2) {
            return r_bytes(addr, 2) as u16;
        }
        // SAFETY: as `r8`; aligned.
        unsafe { (addr as *const u16).read_volatile() }
    }
    /// 32-bit read.
    pub fn r32(addr: u64) -> u32 {
        if !addr.is_multiple_of(4) {
            return r_bytes(addr, 4) as u32;
        }
        // SAFETY: as `r8`; aligned.
        unsafe { (addr as *const u32).read_volatile() }
    }
    /// 64-bit read.
    pub fn r64(addr: u64) -> u64 {
        if !addr.is_multiple_of(8) {
            return r_bytes(addr, 8);
        }
        // SAFETY: as `r8`; aligned.
        unsafe { (addr as *const u64).read_volatile() }
    }
    /// 16-bit write.
    pub fn w16(addr: u64, v: u16) {
        if !addr.is_multiple_of(2) {
            return w_bytes(addr, v as u64, 2);
        }
        // SAFETY: as `r8`; aligned.
        unsafe { (addr as *mut u16).write_volatile(v) }
    }
    /// 32-bit write.
    pub fn w32(addr: u64, v: u32) {
        if !addr.is_multiple_of(4) {
            return w_bytes(addr, v as u64, 4);
        }
        // SAFETY: as `r8`; aligned.
        unsafe { (addr as *mut u32).write_volatile(v) }
    }
    /// 64-bit write.
    pub fn w64(addr: u64, v: u64) {
        if !addr.is_multiple_of(8) {
            return w_bytes(addr, v, 8);
        }
        // SAFETY: as `r8`; aligned.
        unsafe { (addr as *mut u64).write_volatile(v) }
    }
}
