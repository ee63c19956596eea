//! The guest-physical memory map and interrupt assignments of a Ferrite x86_64 VM.
//!
//! One table that every crate (loader, ACPI, PCI, devices, test guest docs) agrees on.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA           (reserved in e820 from 0x9fc00)
//! 0x0000_0500  boot GDT, then IDT
//! 0x0000_6000  PVH hvm_start_info, then its memory map (PVH boots)
//! 0x0000_7000  Linux zero page / boot_params (bzImage boots)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  boot page tables: PML4, PDPT, PD (identity map of the first 1 GiB, bzImage boots)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  EBDA .. 0x000f_ffff: reserved; ACPI tables live at 0x000e_0000, VMGENID at 0xff000
//! 0x0010_0000  kernel (HIMEM_START), then RAM up to min(ram, 3 GiB)
//! 0xc000_0000  32-bit PCI MMIO window (BARs), 512 MiB
//! 0xe000_0000  PCIe ECAM (MMCONFIG), 256 MiB: one bus used, all reserved
//! 0xf000_0000  platform MMIO (future devices), up to the IOAPIC
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  local APIC
//! 0x1_0000_0000 RAM above 4 GiB (what did not fit below 3 GiB)
//! then         64-bit PCI MMIO window (1 GiB aligned, after the top of RAM)
//! ```

/// Boot GDT location (PVH and 64-bit bzImage entry).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT location (an empty IDT is loaded at entry).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (e820-style `hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum PVH memory-map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6100) / 24;
/// Linux boot_params ("zero page") for bzImage boots.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables (bzImage 64-bit entry needs paging on).
pub const PML4_START: u64 = 0x9000;
/// Boot page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Boot page directory (512 × 2 MiB = first 1 GiB identity mapped).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, including the NUL (Linux x86 COMMAND_LINE_SIZE is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below it is usable low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI RSDP and tables are written (inside the reserved BIOS area).
pub const ACPI_TABLES_START: u64 = 0xe0000;
/// End (exclusive) of the reserved BIOS area the ACPI tables live in.
pub const ACPI_TABLES_END: u64 = 0x100000;
/// The VM generation ID (VMGENID, 16 bytes) lives in the last page of the ACPI area, which the
/// tables themselves never reach (the DSDT's `\\_SB.VGEN.ADDR` returns this address).
pub const VMGENID_ADDR: u64 = ACPI_TABLES_END - 0x1000;
/// Size of the VM generation ID.
pub const VMGENID_LEN: usize = 16;
/// First byte of "high" memory; kernels load here.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the hole below 4 GiB that holds all 32-bit MMIO.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the hole below 4 GiB.
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe enhanced configuration access mechanism (ECAM / MMCONFIG) base.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM window reserved (256 buses × 1 MiB); only bus 0 is populated.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Last PCI bus number decoded (MCFG end bus).
pub const PCI_LAST_BUS: u8 = 0;
/// Platform MMIO area for non-PCI devices.
pub const PLATFORM_MMIO_START: u64 = 0xf000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// First address above 4 GiB.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Alignment of the 64-bit PCI window that follows RAM.
pub const PCI_MMIO64_ALIGN: u64 = 0x4000_0000;
/// Size of the 64-bit PCI window.
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;

/// Smallest guest RAM accepted (a bzImage needs ~128 MiB to decompress itself).
pub const MIN_MEMORY: u64 = 128 << 20;

/// Legacy I/O ports.
pub mod ports {
    /// i8042 keyboard controller data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port (0xfe here pulses reset).
    pub const I8042_COMMAND: u16 = 0x64;
    /// CMOS/RTC index and data ports (2 bytes).
    pub const CMOS: u16 = 0x70;
    /// COM1 16550 UART (8 ports).
    pub const COM1: u16 = 0x3f8;
    /// ACPI PM1a event block (status + enable, 4 bytes).
    pub const ACPI_PM1A_EVT: u16 = 0x600;
    /// ACPI PM1a control block (2 bytes): SLP_TYP | SLP_EN powers off.
    pub const ACPI_PM1A_CNT: u16 = 0x604;
    /// ACPI PM timer (4 bytes, 3.579545 MHz).
    pub const ACPI_PM_TMR: u16 = 0x608;
    /// ACPI GPE0 block (1 status byte, 1 enable byte): bit 0 is the VM generation ID change.
    pub const ACPI_GPE0: u16 = 0x60c;
    /// ACPI reset register (FADT RESET_REG): write ACPI_RESET_VALUE to reset.
    pub const ACPI_RESET: u16 = 0xcf9;
    /// PCI configuration address port (mechanism #1).
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    /// PCI configuration data port (4 ports).
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
}

/// Value written to [`ports::ACPI_RESET`] to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 0x06;
/// SLP_TYP value of the \_S5 (soft-off) object in the DSDT.
pub const ACPI_S5_SLP_TYP: u8 = 5;

/// IOAPIC pins (== GSIs) of the legacy devices.
pub mod irqs {
    /// PIT timer (GSI 0 is remapped to IOAPIC pin 2 by the MADT override).
    pub const PIT: u32 = 0;
    /// i8042 keyboard.
    pub const KEYBOARD: u32 = 1;
    /// COM1.
    pub const COM1: u32 = 4;
    /// RTC.
    pub const RTC: u32 = 8;
    /// ACPI system control interrupt.
    pub const ACPI_SCI: u32 = 9;
    /// Number of IOAPIC pins.
    pub const IOAPIC_PINS: u32 = 24;
    /// First GSI handed out for MSI routes.
    pub const FIRST_MSI_GSI: u32 = 24;
}
