//! The Intel MultiProcessor Specification 1.4 table, for guests booted with `acpi=off`.
//!
//! What Linux expects (`arch/x86/kernel/mpparse.c`): a 16-byte floating pointer "_MP_" on a
//! 16-byte boundary in the first KiB of the EBDA, the last KiB of base memory, or
//! 0xf0000..0xfffff, whose checksum is zero and which points at a "PCMP" configuration table
//! (also checksummed) listing every processor (APIC ID, enabled, BSP flag), the ISA bus, the
//! IOAPIC and the ISA interrupt routing. The routing here matches the ACPI MADT: IRQ0 → pin 2,
//! IRQ9 level/active-high, others identity; LINT0 ExtINT and LINT1 NMI. Written at
//! [`MPTABLE_START`] (= the EBDA, inside the e820-reserved BIOS area). With ACPI enabled Linux
//! ignores this table, so writing both is safe. MP tables cannot express x2APIC IDs: at most
//! [`MAX_MPTABLE_CPUS`] vCPUs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{irqs, ACPI_TABLES_START, APIC_START, EBDA_START, IOAPIC_START};

/// Errors from building or writing the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A VM needs at least one vCPU.
    #[error("MP table needs at least one vCPU")]
    NoVcpus,
    /// MP tables only hold 8-bit APIC IDs (and one ID is the IOAPIC's).
    #[error("MP table supports at most {max} vCPUs, {count} requested")]
    TooManyCpus {
        /// Requested vCPUs.
        count: u32,
        /// Maximum.
        max: u32,
    },
    /// Writing the table into guest memory failed.
    #[error("Cannot write the MP table to guest memory")]
    Write,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the floating pointer and the configuration table are written (the EBDA).
pub const MPTABLE_START: u64 = EBDA_START;
/// Most vCPUs an MP table can describe (APIC IDs 0..=253, the IOAPIC takes the next ID).
pub const MAX_MPTABLE_CPUS: u32 = 254;

const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity active high (01) | trigger level (11 << 2).
const IRQ_FLAGS_LEVEL_HIGH: u16 = 0x000d;
const ISA_BUS_ID: u8 = 0;
/// Number of ISA IRQs routed to the IOAPIC.
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, for `vcpu_count` vCPUs
/// with APIC IDs 0..vcpu_count (vCPU 0 is the BSP). Pure. The bytes go at [`MPTABLE_START`].
pub fn build_mptable(vcpu_count: u32) -> Result<Vec<u8>> {
    if vcpu_count == 0 {
        return Err(Error::NoVcpus);
    }
    if vcpu_count > MAX_MPTABLE_CPUS {
        return Err(Error::TooManyCpus {
            count: vcpu_count,
            max: MAX_MPTABLE_CPUS,
        });
    }
    let ioapic_id = vcpu_count as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpu_count {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id as u8, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU | APIC); then 8 reserved bytes.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        if irq == 2 {
            continue; // cascade: pin 2 carries IRQ0
        }
        let pin = if u32::from(irq) == irqs::PIT { 2 } else { irq };
        let flags = if u32::from(irq) == irqs::ACPI_SCI {
            IRQ_FLAGS_LEVEL_HIGH
        } else {
            0
        };
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 = ExtINT (8259 output) on the BSP, LINT1 = NMI on every local APIC (0xff).
    for (kind, dst, lint) in [(INT_TYPE_EXTINT, 0u8, 0u8), (INT_TYPE_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[ENTRY_LINT, kind, 0, 0, ISA_BUS_ID, 0, dst, lint]);
        count += 1;
    }

    let table_addr = MPTABLE_START + 16;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum
    table.extend_from_slice(b"FERRITE ");
    table.extend_from_slice(b"FERRITE VM  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Builds the MP table and writes it at [`MPTABLE_START`].
pub fn create_mptable<M: GuestMemoryBackend>(mem: &M, vcpu_count: u32) -> Result<()> {
    let bytes = build_mptable(vcpu_count)?;
    // Must not run into the ACPI tables.
    if MPTABLE_START + bytes.len() as u64 > ACPI_TABLES_START {
        return Err(Error::Write);
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn entries(bytes: &[u8]) -> Vec<&[u8]> {
        let table = &bytes[16..];
        let mut out = Vec::new();
        let mut off = 44;
        while off < table.len() {
            let len = if table[off] == ENTRY_PROCESSOR { 20 } else { 8 };
            out.push(&table[off..off + len]);
            off += len;
        }
        out
    }

    #[test]
    fn test_build_mptable_checksums_zero() {
        let bytes = build_mptable(4).unwrap();

        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[0..16]), 0);
        let len = u16::from_le_bytes([bytes[20], bytes[21]]) as usize;
        assert_eq!(16 + len, bytes.len());
        assert_eq!(&bytes[16..20], b"PCMP");
        assert_eq!(sum(&bytes[16..]), 0);
        assert_eq!(
            u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64,
            MPTABLE_START + 16
        );
    }

    #[test]
    fn test_build_mptable_one_processor_entry_per_vcpu() {
        for vcpus in [1u32, 4, 64, MAX_MPTABLE_CPUS] {
            let bytes = build_mptable(vcpus).unwrap();

            let all = entries(&bytes);
            let cpus: Vec<_> = all.iter().filter(|e| e[0] == ENTRY_PROCESSOR).collect();
            assert_eq!(cpus.len(), vcpus as usize);
            assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BSP);
            assert!(cpus[1..].iter().all(|e| e[3] == CPU_ENABLED));
            let count = u16::from_le_bytes([bytes[16 + 34], bytes[16 + 35]]) as usize;
            assert_eq!(count, all.len());
        }
    }

    #[test]
    fn test_build_mptable_irq0_routed_to_pin2_and_sci_level() {
        let bytes = build_mptable(2).unwrap();

        let ints: Vec<_> = entries(&bytes)
            .into_iter()
            .filter(|e| e[0] == ENTRY_IOINT)
            .collect();
        assert_eq!(ints.len(), 15);
        let irq0 = ints.iter().find(|e| e[5] == 0).unwrap();
        assert_eq!(irq0[7], 2);
        let sci = ints.iter().find(|e| e[5] == 9).unwrap();
        assert_eq!(u16::from_le_bytes([sci[2], sci[3]]), 0x0d);
        assert!(ints.iter().all(|e| e[6] == 2), "all to IOAPIC id 2");
    }

    #[test]
    fn test_build_mptable_too_many_cpus_is_error() {
        let err = build_mptable(255).unwrap_err();

        assert_eq!(
            err,
            Error::TooManyCpus {
                count: 255,
                max: MAX_MPTABLE_CPUS
            }
        );
    }

    #[test]
    fn test_build_mptable_zero_cpus_is_error() {
        assert_eq!(build_mptable(0).unwrap_err(), Error::NoVcpus);
    }

    #[test]
    fn test_create_mptable_writes_floating_pointer() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();

        create_mptable(&mem, MAX_MPTABLE_CPUS).unwrap();

        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
