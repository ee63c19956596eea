//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT, MCFG and an AML DSDT.
//!
//! What Linux expects:
//! - An RSDP (revision 2) it finds through `boot_params.acpi_rsdp_addr` / PVH `rsdp_paddr`, or
//!   by scanning 0xe0000..0xfffff on 16-byte boundaries, pointing at an XSDT.
//! - A full (not hardware-reduced) FADT: PM1a event/control and PM timer blocks in I/O space,
//!   `SCI_INT`, a FACS (mandatory unless hardware-reduced), the DSDT, the reset register (used
//!   by `reboot=acpi`, Linux's default), the CMOS century index and `IAPC_BOOT_ARCH` telling
//!   it an i8042 exists and VGA does not. `SMI_CMD` = 0 means "always in ACPI mode", so the
//!   PM1a control register must read back with `SCI_EN` set.
//! - A MADT with one enabled Local APIC entry per vCPU (x2APIC entries above ID 254), the
//!   IOAPIC, `PCAT_COMPAT` (dual 8259s present) and the ISA overrides: IRQ0 → GSI2 (the PIT is
//!   wired to IOAPIC pin 2) and IRQ9 (SCI) level-triggered active-high.
//! - An MCFG with the ECAM window, which Linux only uses if it is also reserved (e820 and/or a
//!   PNP0C02 `_CRS`).
//! - A DSDT with the PCI host bridge `\_SB.PCI0` (PNP0A08/PNP0A03) whose `_CRS` gives the bus
//!   range and the I/O and MMIO windows BARs may be assigned from, the legacy ISA devices
//!   (COM1, i8042 keyboard, RTC) for PNP, and `\_S5_` whose SLP_TYP Linux writes with SLP_EN
//!   into PM1a_CNT on `poweroff`.
//! - A VM generation ID device `\_SB.VGEN` (Microsoft's "Virtual Machine Generation ID" spec,
//!   Linux `drivers/virt/vmgenid.c`): `_CID "VM_Gen_Counter"`, and `ADDR` returning
//!   `Package { low 32 bits, high 32 bits }` of the 16-byte ID at [`VMGENID_ADDR`]. The VMM
//!   writes a new ID there when a snapshot is restored as a clone and sets GPE0 bit 0
//!   ([`VMGENID_GPE`]), whose `\_GPE._E00` sends `Notify(\_SB.VGEN, 0x80)`; the FADT's GPE0
//!   block is `ports::ACPI_GPE0` (one status byte, one enable byte).
//!
//! Every table's bytes sum to zero (checksum), and all of them are placed between
//! [`ACPI_TABLES_START`] and [`VMGENID_ADDR`] (the last page before
//! [`crate::layout::ACPI_TABLES_END`] holds the VM generation ID).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Method,
    Name, Notify, Package, Path, ResourceTemplate, Return, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    irqs, ports, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_TABLES_START, APIC_START, IOAPIC_START,
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_LAST_BUS, VMGENID_ADDR,
};

/// Errors from building or writing the ACPI tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A VM needs at least one vCPU.
    #[error("ACPI tables need at least one vCPU")]
    NoVcpus,
    /// An MMIO window is empty, wraps, or does not fit its descriptor.
    #[error("Invalid PCI MMIO window {start:#x}+{size:#x}")]
    InvalidWindow {
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
    },
    /// The tables do not fit in the reserved area.
    #[error("ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// Writing the tables into guest memory failed.
    #[error("Cannot write the ACPI tables to guest memory")]
    Write,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"FERRIT";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FERRITE ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// CMOS index of the century register (FADT `CENTURY`).
pub const CMOS_CENTURY_INDEX: u8 = 0x32;

/// GPE0 bit the VM generation ID change is signalled on (`\_GPE._E00`).
pub const VMGENID_GPE: u8 = 0;
/// Length of the FADT GPE0 block: one status byte and one enable byte.
pub const GPE0_BLK_LEN: u8 = 2;

/// IAPC_BOOT_ARCH: legacy (ISA/LPC) devices present.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
const IAPC_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH: no VGA hardware (Linux skips probing it).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT flag: the system also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// Highest APIC ID a (non-x2APIC) Processor Local APIC entry may carry (0xff is broadcast).
const MAX_XAPIC_ID: u32 = 254;

/// A guest-physical MMIO window the PCI host bridge decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioWindow {
    /// First address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl MmioWindow {
    fn last(&self) -> Result<u64> {
        if self.size == 0 {
            return Err(self.invalid());
        }
        self.start
            .checked_add(self.size - 1)
            .ok_or_else(|| self.invalid())
    }

    fn invalid(&self) -> Error {
        Error::InvalidWindow {
            start: self.start,
            size: self.size,
        }
    }
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU i has APIC ID i.
    pub vcpu_count: u32,
    /// 32-bit PCI BAR window (normally `PCI_MMIO32_START`/`PCI_MMIO32_SIZE`).
    pub pci_mmio32: MmioWindow,
    /// 64-bit PCI BAR window (normally `MemoryLayout::pci_mmio64_start()`/`_size()`).
    pub pci_mmio64: MmioWindow,
}

impl AcpiConfig {
    /// The usual configuration for `vcpu_count` vCPUs and the memory map `layout`: the fixed
    /// 32-bit PCI window and the 64-bit window `layout` places above RAM.
    pub fn new(vcpu_count: u32, layout: &crate::e820::MemoryLayout) -> Self {
        Self {
            vcpu_count,
            pci_mmio32: MmioWindow {
                start: crate::layout::PCI_MMIO32_START,
                size: crate::layout::PCI_MMIO32_SIZE,
            },
            pci_mmio64: MmioWindow {
                start: layout.pci_mmio64_start(),
                size: layout.pci_mmio64_size(),
            },
        }
    }
}

/// The tables as one blob to be copied to [`ACPI_TABLES_START`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Table bytes; `bytes[0]` goes to [`ACPI_TABLES_START`].
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP (for `boot_params` / `hvm_start_info`).
    pub rsdp_addr: GuestAddress,
}

/// Builds all tables (pure). See [`create_acpi_tables`] to also write them.
pub fn build_acpi_tables(config: &AcpiConfig) -> Result<AcpiTables> {
    if config.vcpu_count == 0 {
        return Err(Error::NoVcpus);
    }
    let mut blob = Blob::default();
    // The RSDP goes first (16-byte aligned, inside the BIOS area Linux scans); its contents
    // need the XSDT address, so reserve its space now.
    let rsdp_offset = blob.reserve(Rsdp::len(), 16);
    let facs = blob.place(&aml_bytes(&FACS::new()), 64);
    let dsdt = blob.place(&dsdt(config)?, 8);
    let fadt = blob.place(&aml_bytes(&fadt(dsdt, facs)), 8);
    let madt = blob.place(madt(config.vcpu_count).as_slice(), 8);
    let mcfg = blob.place(&aml_bytes(&mcfg()), 8);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in [fadt, madt, mcfg] {
        xsdt.add_entry(table);
    }
    let xsdt = blob.place(&aml_bytes(&xsdt), 8);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt));
    blob.bytes[rsdp_offset..rsdp_offset + rsdp.len()].copy_from_slice(&rsdp);

    // The last page of the area holds the VM generation ID.
    let available = (VMGENID_ADDR - ACPI_TABLES_START) as usize;
    if blob.bytes.len() > available {
        return Err(Error::TooLarge {
            needed: blob.bytes.len(),
            available,
        });
    }
    Ok(AcpiTables {
        bytes: blob.bytes,
        rsdp_addr: GuestAddress(ACPI_TABLES_START + rsdp_offset as u64),
    })
}

/// Builds the tables and writes them at [`ACPI_TABLES_START`]; returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    config: &AcpiConfig,
) -> Result<GuestAddress> {
    let tables = build_acpi_tables(config)?;
    mem.write_slice(&tables.bytes, GuestAddress(ACPI_TABLES_START))
        .map_err(|_| Error::Write)?;
    Ok(tables.rsdp_addr)
}

/// Tables laid out one after another from [`ACPI_TABLES_START`].
#[derive(Default)]
struct Blob {
    bytes: Vec<u8>,
}

impl Blob {
    fn reserve(&mut self, len: usize, align: usize) -> usize {
        let offset = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(offset + len, 0);
        offset
    }

    /// Appends `data` aligned to `align`; returns its guest-physical address.
    fn place(&mut self, data: &[u8], align: usize) -> u64 {
        let offset = self.reserve(data.len(), align);
        self.bytes[offset..].copy_from_slice(data);
        ACPI_TABLES_START + offset as u64
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn io_gas(width_bits: u8, access: AccessSize, port: u16) -> GAS {
    GAS::new(GasSpace::SystemIo, width_bits, 0, access, u64::from(port))
}

fn fadt(dsdt: u64, facs: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup);
    // Power button stays a fixed feature (PWR_BUTTON flag clear).
    fadt.sci_int = (irqs::ACPI_SCI as u16).into();
    fadt.smi_cmd = 0.into();
    fadt.pm1a_evt_blk = u32::from(ports::ACPI_PM1A_EVT).into();
    fadt.pm1a_cnt_blk = u32::from(ports::ACPI_PM1A_CNT).into();
    fadt.pm_tmr_blk = u32::from(ports::ACPI_PM_TMR).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.pm_tmr_len = 4;
    fadt.gpe0_blk = u32::from(ports::ACPI_GPE0).into();
    fadt.gpe0_blk_len = GPE0_BLK_LEN;
    fadt.x_gpe0_blk = io_gas(GPE0_BLK_LEN * 8, AccessSize::ByteAccess, ports::ACPI_GPE0);
    fadt.x_pm1a_evt_blk = io_gas(32, AccessSize::DwordAccess, ports::ACPI_PM1A_EVT);
    fadt.x_pm1a_cnt_blk = io_gas(16, AccessSize::WordAccess, ports::ACPI_PM1A_CNT);
    fadt.x_pm_tmr_blk = io_gas(32, AccessSize::DwordAccess, ports::ACPI_PM_TMR);
    fadt.reset_reg = io_gas(8, AccessSize::ByteAccess, ports::ACPI_RESET);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.century = CMOS_CENTURY_INDEX;
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.finalize()
}

fn mcfg() -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, PCI_LAST_BUS);
    mcfg
}

fn madt(vcpu_count: u32) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    let mut has_x2apic = false;
    for id in 0..vcpu_count {
        if id <= MAX_XAPIC_ID {
            // Processor Local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
            entries.extend_from_slice(&[0, 8, id as u8, id as u8]);
            entries.extend_from_slice(&1u32.to_le_bytes());
        } else {
            // Processor Local x2APIC: type 9, length 16, reserved, x2APIC ID, flags, UID.
            has_x2apic = true;
            entries.extend_from_slice(&[9, 16, 0, 0]);
            entries.extend_from_slice(&id.to_le_bytes());
            entries.extend_from_slice(&1u32.to_le_bytes());
            entries.extend_from_slice(&id.to_le_bytes());
        }
    }
    // I/O APIC: type 1, length 12, ID 0, reserved, address, GSI base 0.
    entries.extend_from_slice(&[1, 12, 0, 0]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides: type 2, length 10, bus 0 (ISA), source, GSI, flags.
    let mut iso = |source: u8, gsi: u32, flags: u16| {
        entries.extend_from_slice(&[2, 10, 0, source]);
        entries.extend_from_slice(&gsi.to_le_bytes());
        entries.extend_from_slice(&flags.to_le_bytes());
    };
    // PIT: IRQ0 → GSI2, conforming polarity/trigger.
    iso(irqs::PIT as u8, 2, 0);
    // SCI: active high (01), level triggered (11 << 2).
    iso(irqs::ACPI_SCI as u8, irqs::ACPI_SCI, 0x000d);
    // Local APIC NMI: type 4, length 6, all processors (0xff), flags 0, LINT1.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    if has_x2apic {
        // Local x2APIC NMI: type 0xa, length 12, flags 0, all processors, LINT1, reserved.
        entries.extend_from_slice(&[0xa, 12, 0, 0]);
        entries.extend_from_slice(&u32::MAX.to_le_bytes());
        entries.extend_from_slice(&[1, 0, 0, 0]);
    }
    madt.append_slice(&entries);
    madt
}

fn dsdt(config: &AcpiConfig) -> Result<Vec<u8>> {
    let mmio32_last = config.pci_mmio32.last()?;
    let mmio32_start =
        u32::try_from(config.pci_mmio32.start).map_err(|_| config.pci_mmio32.invalid())?;
    let mmio32_last = u32::try_from(mmio32_last).map_err(|_| config.pci_mmio32.invalid())?;
    let mmio64_last = config.pci_mmio64.last()?;

    // \_SB.PCI0: the PCIe host bridge.
    let pci_hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let pci_cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let pci_adr = Name::new("_ADR".into(), &aml::ZERO);
    let pci_seg = Name::new("_SEG".into(), &aml::ZERO);
    let pci_uid = Name::new("_UID".into(), &aml::ZERO);
    let pci_bbn = Name::new("_BBN".into(), &aml::ZERO);
    let bus_range = AddressSpace::new_bus_number(0u16, u16::from(PCI_LAST_BUS));
    let config_io = IO::new(ports::PCI_CONFIG_ADDRESS, ports::PCI_CONFIG_ADDRESS, 1, 8);
    let io_low = AddressSpace::new_io(0u16, ports::PCI_CONFIG_ADDRESS - 1, None);
    let io_high = AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_start,
        mmio32_last,
        None,
    );
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        config.pci_mmio64.start,
        mmio64_last,
        None,
    );
    let pci_crs_template = ResourceTemplate::new(vec![
        &bus_range, &config_io, &io_low, &io_high, &mmio32, &mmio64,
    ]);
    let pci_crs = Name::new("_CRS".into(), &pci_crs_template);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![
            &pci_hid, &pci_cid, &pci_adr, &pci_seg, &pci_uid, &pci_bbn, &pci_crs,
        ],
    );

    // COM1.
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &aml::ONE);
    let com1_io = IO::new(ports::COM1, ports::COM1, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, irqs::COM1);
    let com1_res = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = Name::new("_CRS".into(), &com1_res);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    // i8042 keyboard controller.
    let kbd_hid = Name::new("_HID".into(), &EISAName::new("PNP0303"));
    let kbd_data = IO::new(ports::I8042_DATA, ports::I8042_DATA, 1, 1);
    let kbd_cmd = IO::new(ports::I8042_COMMAND, ports::I8042_COMMAND, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, irqs::KEYBOARD);
    let kbd_res = ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_crs = Name::new("_CRS".into(), &kbd_res);
    let kbd = Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs]);

    // CMOS RTC.
    let rtc_hid = Name::new("_HID".into(), &EISAName::new("PNP0B00"));
    let rtc_io = IO::new(ports::CMOS, ports::CMOS, 1, 2);
    let rtc_irq = Interrupt::new(true, true, false, false, irqs::RTC);
    let rtc_res = ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_crs = Name::new("_CRS".into(), &rtc_res);
    let rtc = Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs]);

    // Motherboard resources: the ECAM window and the ACPI PM ports.
    let mb_hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let mb_uid = Name::new("_UID".into(), &aml::ZERO);
    let ecam = Memory32Fixed::new(true, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let pm_len = (ports::ACPI_GPE0 + u16::from(GPE0_BLK_LEN) - ports::ACPI_PM1A_EVT) as u8;
    let pm_io = IO::new(ports::ACPI_PM1A_EVT, ports::ACPI_PM1A_EVT, 1, pm_len);
    let mb_res = ResourceTemplate::new(vec![&ecam, &pm_io]);
    let mb_crs = Name::new("_CRS".into(), &mb_res);
    let mb = Device::new("MBRS".into(), vec![&mb_hid, &mb_uid, &mb_crs]);

    // VM generation ID: ADDR returns Package { low, high } of its guest-physical address.
    let vgen_hid = Name::new("_HID".into(), &"FERRGNID");
    let vgen_cid = Name::new("_CID".into(), &"VM_Gen_Counter");
    let vgen_ddn = Name::new("_DDN".into(), &"VM_Gen_Counter");
    let vgen_lo = VMGENID_ADDR as u32;
    let vgen_hi = (VMGENID_ADDR >> 32) as u32;
    let vgen_pkg = Package::new(vec![&vgen_lo, &vgen_hi]);
    let vgen_ret = Return::new(&vgen_pkg);
    let vgen_addr = Method::new("ADDR".into(), 0, false, vec![&vgen_ret]);
    let vgen = Device::new(
        "VGEN".into(),
        vec![&vgen_hid, &vgen_cid, &vgen_ddn, &vgen_addr],
    );

    let sb = Scope::new("\\_SB_".into(), vec![&pci0, &com1, &kbd, &rtc, &mb, &vgen]);
    // \_GPE._E00: the VM generation ID changed.
    let vgen_path = Path::new("\\_SB_.VGEN");
    let notify_value = 0x80u8;
    let vgen_notify = Notify::new(&vgen_path, &notify_value);
    let e00 = Method::new("_E00".into(), 0, false, vec![&vgen_notify]);
    let gpe = Scope::new("\\_GPE".into(), vec![&e00]);
    // \_S5_: Package { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    let s5_pkg = Package::new(vec![&ACPI_S5_SLP_TYP, &ACPI_S5_SLP_TYP, &0u8, &0u8]);
    let s5 = Name::new(Path::new("\\_S5_"), &s5_pkg);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    gpe.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::MemoryLayout;
    use vm_memory::GuestMemoryMmap;

    fn config(vcpus: u32) -> AcpiConfig {
        AcpiConfig::new(vcpus, &MemoryLayout::new(1 << 30, None).unwrap())
    }

    /// Parsed view of the blob for assertions.
    struct View<'a> {
        tables: &'a AcpiTables,
    }

    impl<'a> View<'a> {
        fn at(&self, addr: u64, len: usize) -> &'a [u8] {
            let off = (addr - ACPI_TABLES_START) as usize;
            &self.tables.bytes[off..off + len]
        }

        fn u32_at(&self, addr: u64) -> u32 {
            u32::from_le_bytes(self.at(addr, 4).try_into().unwrap())
        }

        fn u64_at(&self, addr: u64) -> u64 {
            u64::from_le_bytes(self.at(addr, 8).try_into().unwrap())
        }

        /// Whole table at `addr` (length from its header).
        fn table(&self, addr: u64) -> &'a [u8] {
            let len = self.u32_at(addr + 4) as usize;
            self.at(addr, len)
        }

        fn rsdp(&self) -> &'a [u8] {
            self.at(self.tables.rsdp_addr.0, 36)
        }

        fn xsdt_entries(&self) -> Vec<u64> {
            let xsdt_addr = u64::from_le_bytes(self.rsdp()[24..32].try_into().unwrap());
            let xsdt = self.table(xsdt_addr);
            assert_eq!(&xsdt[0..4], b"XSDT");
            xsdt[36..]
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        }

        fn find(&self, sig: &[u8; 4]) -> &'a [u8] {
            let addr = self.find_addr(sig);
            self.table(addr)
        }

        fn find_addr(&self, sig: &[u8; 4]) -> u64 {
            if sig == b"DSDT" {
                let fadt = self.find_addr(b"FACP");
                return self.u64_at(fadt + 140);
            }
            *self
                .xsdt_entries()
                .iter()
                .find(|&&a| self.at(a, 4) == sig)
                .expect("table present")
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// MADT sub-tables as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = madt[off + 1] as usize;
            out.push((madt[off], &madt[off..off + len]));
            off += len;
        }
        out
    }

    #[test]
    fn test_build_acpi_tables_rsdp_valid() {
        let tables = build_acpi_tables(&config(1)).unwrap();
        let view = View { tables: &tables };

        let rsdp = view.rsdp();

        assert_eq!(tables.rsdp_addr, GuestAddress(ACPI_TABLES_START));
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(rsdp), 0);
        assert_eq!(u32::from_le_bytes(rsdp[20..24].try_into().unwrap()), 36);
    }

    #[test]
    fn test_build_acpi_tables_every_checksum_zero_and_length_right() {
        let tables = build_acpi_tables(&config(4)).unwrap();
        let view = View { tables: &tables };

        for sig in [b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT"] {
            let addr = if sig == b"XSDT" {
                u64::from_le_bytes(view.rsdp()[24..32].try_into().unwrap())
            } else {
                view.find_addr(sig)
            };
            let table = view.table(addr);
            assert_eq!(&table[0..4], sig);
            assert_eq!(sum(table), 0, "{}", String::from_utf8_lossy(sig));
            assert_eq!(addr % 8, 0);
        }
        assert_eq!(view.find(b"FACP").len(), 276);
        assert_eq!(view.find(b"MCFG").len(), 36 + 8 + 16);
        assert_eq!(view.xsdt_entries().len(), 3);
    }

    #[test]
    fn test_build_acpi_tables_fadt_fields() {
        let tables = build_acpi_tables(&config(1)).unwrap();
        let view = View { tables: &tables };

        let fadt = view.find(b"FACP");

        assert_eq!(fadt[8], 6, "revision");
        let u16_at = |o: usize| u16::from_le_bytes(fadt[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(fadt[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(fadt[o..o + 8].try_into().unwrap());
        assert_eq!(u16_at(46), 9, "SCI_INT");
        assert_eq!(u32_at(48), 0, "SMI_CMD");
        assert_eq!(u32_at(56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(76), 0x608, "PM_TMR_BLK");
        assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 4), "block lengths");
        assert_eq!(fadt[108], 0x32, "CENTURY");
        assert_eq!(u16_at(109) & 0x2, 0x2, "8042");
        let flags = u32_at(112);
        assert_eq!(flags & 1, 1, "WBINVD");
        assert_eq!(flags & (1 << 10), 1 << 10, "RESET_REG_SUP");
        assert_eq!(flags & (1 << 20), 0, "not hardware reduced");
        assert_eq!(flags & (1 << 4), 0, "fixed power button");
        // RESET_REG GAS: system I/O, 8 bits, port 0xcf9; then RESET_VALUE.
        assert_eq!(fadt[116], 1);
        assert_eq!(fadt[117], 8);
        assert_eq!(u64_at(120), 0xcf9);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // X_FIRMWARE_CTRL → FACS, X_DSDT → DSDT.
        let facs = u64_at(132);
        assert_eq!(view.at(facs, 4), b"FACS");
        assert_eq!(facs % 64, 0);
        assert_eq!(view.at(u64_at(140), 4), b"DSDT");
        // X_PM1a_CNT_BLK GAS address.
        assert_eq!(u64_at(172 + 4), 0x604);
    }

    #[test]
    fn test_build_acpi_tables_madt_has_lapic_per_vcpu() {
        for vcpus in [1u32, 4, 64] {
            let tables = build_acpi_tables(&config(vcpus)).unwrap();
            let view = View { tables: &tables };

            let madt = view.find(b"APIC");

            assert_eq!(
                u32::from_le_bytes(madt[36..40].try_into().unwrap()),
                0xfee0_0000
            );
            assert_eq!(u32::from_le_bytes(madt[40..44].try_into().unwrap()), 1);
            let entries = madt_entries(madt);
            let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
            assert_eq!(lapics.len(), vcpus as usize);
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!((e[2], e[3]), (i as u8, i as u8));
                assert_eq!(
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                    1,
                    "enabled"
                );
            }
        }
    }

    #[test]
    fn test_build_acpi_tables_madt_ioapic_and_overrides() {
        let tables = build_acpi_tables(&config(2)).unwrap();
        let view = View { tables: &tables };

        let entries = madt_entries(view.find(b"APIC"));

        let ioapic = entries.iter().find(|(t, _)| *t == 1).unwrap().1;
        assert_eq!(ioapic[2], 0);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xfec0_0000
        );
        assert_eq!(u32::from_le_bytes(ioapic[8..12].try_into().unwrap()), 0);
        let isos: Vec<_> = entries
            .iter()
            .filter(|(t, _)| *t == 2)
            .map(|e| e.1)
            .collect();
        assert_eq!(isos.len(), 2);
        assert_eq!(isos[0], &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(isos[1], &[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
        assert!(entries.iter().any(|(t, e)| *t == 4 && e[5] == 1));
    }

    #[test]
    fn test_build_acpi_tables_madt_uses_x2apic_above_254() {
        let tables = build_acpi_tables(&config(300)).unwrap();
        let view = View { tables: &tables };

        let entries = madt_entries(view.find(b"APIC"));

        assert_eq!(entries.iter().filter(|(t, _)| *t == 0).count(), 255);
        let x2: Vec<_> = entries.iter().filter(|(t, _)| *t == 9).collect();
        assert_eq!(x2.len(), 45);
        assert_eq!(u32::from_le_bytes(x2[0].1[4..8].try_into().unwrap()), 255);
        assert!(entries.iter().any(|(t, _)| *t == 0xa));
    }

    #[test]
    fn test_build_acpi_tables_mcfg_ecam() {
        let tables = build_acpi_tables(&config(1)).unwrap();
        let view = View { tables: &tables };

        let mcfg = view.find(b"MCFG");

        let entry = &mcfg[44..60];
        assert_eq!(
            u64::from_le_bytes(entry[0..8].try_into().unwrap()),
            PCI_ECAM_START
        );
        assert_eq!(u16::from_le_bytes(entry[8..10].try_into().unwrap()), 0);
        assert_eq!((entry[10], entry[11]), (0, PCI_LAST_BUS));
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn test_build_acpi_tables_dsdt_has_devices_and_s5() {
        let tables = build_acpi_tables(&config(1)).unwrap();
        let view = View { tables: &tables };

        let dsdt = view.find(b"DSDT");

        assert_eq!(dsdt[8], 2, "revision 2: 64-bit integers");
        for name in [
            &b"PCI0"[..],
            b"COM1",
            b"PS2K",
            b"RTC_",
            b"MBRS",
            b"_SB_",
            b"_CRS",
        ] {
            assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        // NameOp "\_S5_" PackageOp len=7 count=4 BytePrefix 5 BytePrefix 5 Zero Zero.
        assert!(contains(
            dsdt,
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0, 0]
        ));
        // PNP0A08 EISA id (0x080ad041) encoded as DWordPrefix.
        assert!(contains(dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        // QWord memory descriptor for the 64-bit window contains its start.
        assert!(contains(dsdt, &config(1).pci_mmio64.start.to_le_bytes()));
    }

    #[test]
    fn test_build_acpi_tables_dsdt_has_vmgenid_device_and_gpe_method() {
        let tables = build_acpi_tables(&config(1)).unwrap();
        let view = View { tables: &tables };

        let dsdt = view.find(b"DSDT");
        let fadt = view.find(b"FACP");

        assert!(contains(dsdt, b"VGEN"));
        assert!(contains(dsdt, b"VM_Gen_Counter\0"));
        // Method ADDR: Return (Package (2) { DWord 0xff000, Zero }).
        let addr = [0x0c, 0x00, 0xf0, 0x0f, 0x00, 0x00];
        let mut method = b"ADDR".to_vec();
        method.extend_from_slice(&[0x00, 0xa4, 0x12, 0x08, 0x02]);
        method.extend_from_slice(&addr);
        assert!(contains(dsdt, &method));
        assert!(contains(dsdt, b"_E00"));
        // Notify (\_SB.VGEN, 0x80).
        assert!(contains(
            dsdt,
            &[0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'V', b'G', b'E', b'N', 0x0a, 0x80]
        ));
        // FADT GPE0_BLK (offset 80) and GPE0_BLK_LEN (offset 92).
        assert_eq!(u32::from_le_bytes(fadt[80..84].try_into().unwrap()), 0x60c);
        assert_eq!(fadt[92], GPE0_BLK_LEN);
    }

    #[test]
    fn test_build_acpi_tables_fit_for_max_vcpus() {
        let tables = build_acpi_tables(&config(1024)).unwrap();

        assert!(tables.bytes.len() <= (VMGENID_ADDR - ACPI_TABLES_START) as usize);
    }

    #[test]
    fn test_build_acpi_tables_zero_vcpus_is_error() {
        assert_eq!(build_acpi_tables(&config(0)).unwrap_err(), Error::NoVcpus);
    }

    #[test]
    fn test_build_acpi_tables_empty_window_is_error() {
        let mut cfg = config(1);
        cfg.pci_mmio64.size = 0;

        let err = build_acpi_tables(&cfg).unwrap_err();

        assert!(matches!(err, Error::InvalidWindow { size: 0, .. }));
    }

    #[test]
    fn test_build_acpi_tables_mmio32_above_4g_is_error() {
        let mut cfg = config(1);
        cfg.pci_mmio32.start = 1 << 32;

        let err = build_acpi_tables(&cfg).unwrap_err();

        assert!(matches!(err, Error::InvalidWindow { .. }));
    }

    #[test]
    fn test_create_acpi_tables_writes_to_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();

        let rsdp = create_acpi_tables(&mem, &config(2)).unwrap();

        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn test_create_acpi_tables_without_memory_is_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();

        let err = create_acpi_tables(&mem, &config(1)).unwrap_err();

        assert_eq!(err, Error::Write);
    }
}
