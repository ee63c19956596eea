//! The `int3` service-call ABI shared by the CPL0 dispatcher and CPL3 wrappers.
//!
//! CPL3 puts the service number in `rax`, arguments in `rdi`, `rsi`, `rdx`, executes
//! `int3`, and gets the result in `rax` (`SVC_ERROR` on bad arguments). All other
//! registers are preserved.

/// Write `rsi` bytes at `rdi` to COM1 (polling LSR.THRE). Returns the count.
pub const SVC_WRITE: u64 = 1;
/// Copy up to `rsi` received COM1 bytes to `rdi`. Returns the count (0 if none).
pub const SVC_READ: u64 = 2;
/// Halt (`sti; hlt`) until the next interrupt unless COM1 input is already pending.
pub const SVC_WAIT: u64 = 3;
/// Read port `rdi` with width `rdx` (1, 2 or 4 bytes). Returns the value.
pub const SVC_PIO_IN: u64 = 4;
/// Write `rsi` to port `rdi` with width `rdx` (1, 2 or 4 bytes).
pub const SVC_PIO_OUT: u64 = 5;
/// Read the CMOS RTC: bytes (LSB first) sec, min, hour, day, month, year, status B, century.
pub const SVC_RTC: u64 = 6;
/// Set (`rdi` != 0) or clear the caller's RFLAGS.IF.
pub const SVC_IRQ_ENABLE: u64 = 7;
/// Load an empty IDT and fault: triple fault, i.e. a CPU reset.
pub const SVC_TRIPLE_FAULT: u64 = 8;
/// Park this CPU forever (`cli; hlt`).
pub const SVC_HALT: u64 = 9;
/// Write the byte `rsi` to port `rdi` `rdx` times (1..=`BENCH_MAX_N`) in one CPL0 loop
/// (`out dx, al; dec; jnz`). Returns the TSC cycles the loop took (read at CPL0).
pub const SVC_PIO_OUT_REPEAT: u64 = 10;

/// Largest N the `bench-pio`/`bench-mmio` commands (and `SVC_PIO_OUT_REPEAT`) accept.
pub const BENCH_MAX_N: u64 = 10_000_000;

/// Result of a rejected service call.
pub const SVC_ERROR: u64 = u64::MAX;
/// Largest buffer a write/read service accepts.
pub const SVC_MAX_LEN: u64 = 4096;

/// LAPIC timer vector.
pub const VEC_TIMER: u64 = 0x20;
/// COM1 receive interrupt vector (IOAPIC pin of IRQ 4).
pub const VEC_COM1: u64 = 0x24;
/// First MSI-X vector used by virtio devices.
pub const VEC_MSIX_FIRST: u64 = 0x30;
/// Number of MSI-X vectors counted.
pub const MSIX_VECTORS: u64 = 16;
/// LAPIC spurious vector.
pub const VEC_SPURIOUS: u64 = 0xff;

/// Counter slot of the LAPIC timer.
pub const IRQ_SLOT_TIMER: usize = 0;
/// Counter slot of COM1.
pub const IRQ_SLOT_COM1: usize = 1;
/// Counter slot of spurious interrupts.
pub const IRQ_SLOT_SPURIOUS: usize = 2;
/// Counter slot of unexpected vectors.
pub const IRQ_SLOT_OTHER: usize = 3;
/// First counter slot of the MSI-X vectors.
pub const IRQ_SLOT_MSIX: usize = 4;
/// Number of counter slots.
pub const IRQ_COUNT_SLOTS: usize = IRQ_SLOT_MSIX + MSIX_VECTORS as usize;
