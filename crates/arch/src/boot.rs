//! Loading a Linux kernel and writing the boot structures it reads at entry.
//!
//! What Linux expects:
//! - **PVH** (an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note): entry in 32-bit protected
//!   mode, paging off, `EBX` = guest-physical address of an `hvm_start_info` (magic
//!   0x336ec578, version 1) giving the command line, the initrd as module 0, the e820-style
//!   memory map and the ACPI RSDP address.
//! - **64-bit boot protocol** (bzImage, `Documentation/arch/x86/boot.rst`): the protected-mode
//!   kernel loaded at `code32_start`, entry at load address + 0x200 in long mode with an
//!   identity map, `RSI` = the zero page (`boot_params`) holding the setup header copied from
//!   the image (with `type_of_loader` = 0xff, `cmd_line_ptr`, `ramdisk_image`/`ramdisk_size`
//!   filled in), the e820 table and `acpi_rsdp_addr`.
//! - **ELF without PVH note**: same as the 64-bit protocol but entered at `e_entry`
//!   (`startup_64`), with a synthesized setup header.
//!
//! The initrd must lie in RAM below `initrd_addr_max` (bzImage) and not overlap the kernel;
//! it is placed at the top of RAM below the MMIO hole, page aligned.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::e820::{MemoryLayout, PAGE_SIZE};
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// `boot_flag` value of a valid setup header.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value ("HdrS") of a valid setup header.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default kernel alignment for a synthesized setup header (CONFIG_PHYSICAL_ALIGN).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Offset of the 64-bit entry point from the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// xloadflags bit: the kernel has the legacy 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// First boot protocol version with `xloadflags` (2.12).
const BOOT_PROTOCOL_XLOADFLAGS: u16 = 0x020c;
/// First boot protocol version with `initrd_addr_max` (2.03).
const BOOT_PROTOCOL_INITRD_ADDR_MAX: u16 = 0x0203;
/// First boot protocol version with `cmdline_size` (2.06).
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;
/// initrd limit for boot protocols before 2.03.
const LEGACY_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Offset of the setup header's "HdrS" magic in a bzImage.
const BZIMAGE_HDR_MAGIC_OFFSET: u64 = 0x202;

/// Errors from kernel loading and boot-structure setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be read.
    #[error("Cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// The file is neither an ELF nor a bzImage.
    #[error("Not a kernel: neither ELF nor bzImage")]
    NotAKernel,
    /// linux-loader rejected the ELF image.
    #[error("Invalid ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    /// linux-loader rejected the bzImage.
    #[error("Invalid bzImage kernel")]
    BzImage(#[source] linux_loader::loader::Error),
    /// The bzImage cannot be entered in 64-bit mode.
    #[error(
        "bzImage has no 64-bit entry point (boot protocol {version:#06x}, xloadflags {xloadflags:#x})"
    )]
    No64BitEntry {
        /// Boot protocol version from the setup header.
        version: u16,
        /// xloadflags from the setup header.
        xloadflags: u16,
    },
    /// The command line contains a NUL byte.
    #[error("Kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The command line is longer than the platform or kernel accepts.
    #[error("Kernel command line is {len} bytes; at most {max} are allowed")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// Maximum including the terminating NUL.
        max: usize,
    },
    /// Writing the command line to guest memory failed.
    #[error("Cannot write the kernel command line to guest memory")]
    CmdlineWrite(#[source] vm_memory::GuestMemoryError),
    /// The initrd file is empty.
    #[error("Initrd is empty")]
    InitrdEmpty,
    /// The initrd could not be read.
    #[error("Cannot read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    /// The initrd does not fit in low RAM above the kernel.
    #[error(
        "Initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooLarge {
        /// initrd size in bytes.
        size: u64,
        /// First byte after the kernel's memory footprint.
        kernel_end: u64,
        /// End (exclusive) of the memory the initrd may use.
        limit: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("Cannot copy the initrd into guest memory")]
    InitrdWrite(#[source] vm_memory::GuestMemoryError),
    /// The initrd is larger than this host can address.
    #[error("Initrd of {0} bytes is too large")]
    InitrdSize(u64),
    /// The memory map has more entries than the boot structure holds.
    #[error("Memory map has {0} entries, more than the boot structure holds")]
    TooManyE820Entries(usize),
    /// linux-loader could not write `boot_params` or `hvm_start_info`.
    #[error("Cannot write boot parameters to guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    /// The kernel needs more memory below the MMIO hole than the guest has.
    #[error("Kernel needs RAM up to {kernel_end:#x} but RAM below 4 GiB ends at {ram_end:#x}")]
    KernelTooLarge {
        /// First byte after the kernel's memory footprint.
        kernel_end: u64,
        /// End of RAM below the MMIO hole.
        ram_end: u64,
    },
    /// A value does not fit the 32-bit field of the boot structure.
    #[error("{0} is above 4 GiB and cannot be passed to the kernel")]
    AddressTooHigh(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, `EBX` = `hvm_start_info`.
    Pvh,
    /// bzImage 64-bit boot protocol: long mode at load address + 0x200, `RSI` = zero page.
    Linux64,
    /// ELF kernel without PVH note: long mode at `e_entry`, `RSI` = zero page.
    Elf64,
}

impl BootProtocol {
    /// Whether the kernel reads a Linux zero page (`boot_params`) rather than `hvm_start_info`.
    pub fn uses_zero_page(self) -> bool {
        !matches!(self, BootProtocol::Pvh)
    }
}

/// What [`load_kernel`] found and where the boot vCPU must start.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// Guest-physical address the boot vCPU's RIP/EIP is set to.
    pub entry_addr: GuestAddress,
    /// Boot protocol to use.
    pub kind: BootProtocol,
    /// Setup header read from a bzImage (`None` for ELF kernels).
    pub setup_header: Option<setup_header>,
    /// Where the kernel image was loaded.
    pub kernel_load: GuestAddress,
    /// First byte after the memory the kernel needs (including its decompression area for a
    /// bzImage); nothing else may be placed below this above `kernel_load`.
    pub kernel_end: u64,
}

/// Loads a kernel image into guest memory, detecting its format.
///
/// ELF with a PVH note → [`BootProtocol::Pvh`]; ELF without → [`BootProtocol::Elf64`];
/// bzImage → [`BootProtocol::Linux64`] (entry at load address + 0x200).
pub fn load_kernel<M, F>(mem: &M, kernel: &mut F) -> Result<KernelEntry>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let mut magic = [0u8; 4];
    kernel.rewind().map_err(Error::ReadKernel)?;
    let is_elf = match kernel.read_exact(&mut magic) {
        Ok(()) => magic == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(Error::ReadKernel(e)),
    };
    if is_elf {
        let result =
            Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(Error::Elf)?;
        return Ok(elf_entry(&result));
    }
    if !has_bzimage_magic(kernel)? {
        return Err(Error::NotAKernel);
    }
    let result = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(Error::BzImage)?;
    bzimage_entry(&result)
}

fn has_bzimage_magic<F: Read + Seek>(kernel: &mut F) -> Result<bool> {
    let mut magic = [0u8; 4];
    kernel
        .seek(SeekFrom::Start(BZIMAGE_HDR_MAGIC_OFFSET))
        .map_err(Error::ReadKernel)?;
    match kernel.read_exact(&mut magic) {
        Ok(()) => Ok(u32::from_le_bytes(magic) == KERNEL_HDR_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::ReadKernel(e)),
    }
}

fn elf_entry(result: &KernelLoaderResult) -> KernelEntry {
    let (entry_addr, kind) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (addr, BootProtocol::Pvh),
        _ => (result.kernel_load, BootProtocol::Elf64),
    };
    KernelEntry {
        entry_addr,
        kind,
        setup_header: None,
        kernel_load: result.kernel_load,
        kernel_end: result.kernel_end,
    }
}

fn bzimage_entry(result: &KernelLoaderResult) -> Result<KernelEntry> {
    // BzImage::load always returns the header; treat a missing one as a broken image.
    let hdr = result.setup_header.ok_or(Error::NotAKernel)?;
    let version = hdr.version;
    let xloadflags = if version >= BOOT_PROTOCOL_XLOADFLAGS {
        hdr.xloadflags
    } else {
        0
    };
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry {
            version,
            xloadflags,
        });
    }
    // The compressed kernel decompresses to pref_address and needs init_size bytes there.
    let pref_address = hdr.pref_address;
    let footprint_end = pref_address.saturating_add(u64::from(hdr.init_size));
    Ok(KernelEntry {
        entry_addr: result
            .kernel_load
            .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
            .ok_or(Error::NotAKernel)?,
        kind: BootProtocol::Linux64,
        setup_header: Some(hdr),
        kernel_load: result.kernel_load,
        kernel_end: result.kernel_end.max(footprint_end),
    })
}

/// Validates `cmdline` and writes it, NUL terminated, at [`CMDLINE_START`].
///
/// Returns the length without the NUL (what goes into `boot_params.hdr.cmdline_size`).
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<usize> {
    check_cmdline(cmdline, CMDLINE_MAX_SIZE)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(Error::CmdlineWrite)?;
    Ok(cmdline.len())
}

fn check_cmdline(cmdline: &str, max_with_nul: usize) -> Result<()> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    if len > max_with_nul {
        return Err(Error::CmdlineTooLong {
            len,
            max: max_with_nul,
        });
    }
    Ok(())
}

/// Where an initrd was placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest-physical start (page aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Highest address (exclusive) the kernel accepts for the initrd's end.
fn initrd_limit(layout: &MemoryLayout, kernel: &KernelEntry) -> u64 {
    let mut limit = layout.low_ram_end();
    if let Some(hdr) = kernel.setup_header {
        let version = hdr.version;
        let max = if version >= BOOT_PROTOCOL_INITRD_ADDR_MAX {
            u64::from(hdr.initrd_addr_max)
        } else {
            LEGACY_INITRD_ADDR_MAX
        };
        // initrd_addr_max is the address of the last byte the initrd may occupy.
        limit = limit.min(max.saturating_add(1));
    }
    limit
}

/// Picks the initrd address: top of RAM below the MMIO hole (and below the bzImage's
/// `initrd_addr_max`), page aligned, above the kernel.
pub fn initrd_address(
    layout: &MemoryLayout,
    kernel: &KernelEntry,
    size: u64,
) -> Result<GuestAddress> {
    if size == 0 {
        return Err(Error::InitrdEmpty);
    }
    let limit = initrd_limit(layout, kernel);
    let too_large = Error::InitrdTooLarge {
        size,
        kernel_end: kernel.kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel.kernel_end.max(HIMEM_START) {
        return Err(Error::InitrdTooLarge {
            size,
            kernel_end: kernel.kernel_end,
            limit,
        });
    }
    Ok(GuestAddress(start))
}

/// Reads the whole initrd into guest memory at [`initrd_address`].
pub fn load_initrd<M, F>(
    mem: &M,
    layout: &MemoryLayout,
    kernel: &KernelEntry,
    initrd: &mut F,
) -> Result<InitrdRegion>
where
    M: GuestMemoryBackend,
    F: ReadVolatile + Seek,
{
    let size = initrd.seek(SeekFrom::End(0)).map_err(Error::ReadInitrd)?;
    initrd.rewind().map_err(Error::ReadInitrd)?;
    let addr = initrd_address(layout, kernel, size)?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdSize(size))?;
    mem.read_exact_volatile_from(addr, initrd, len)
        .map_err(Error::InitrdWrite)?;
    Ok(InitrdRegion { addr, size })
}

/// Everything the boot structures point at besides the memory map.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig<'a> {
    /// Kernel command line (without NUL); written to [`CMDLINE_START`].
    pub cmdline: &'a str,
    /// The initrd, if one was loaded with [`load_initrd`].
    pub initrd: Option<InitrdRegion>,
    /// Address of the ACPI RSDP (from `acpi::create_acpi_tables`), if ACPI is enabled.
    pub rsdp_addr: Option<GuestAddress>,
}

/// Writes the command line and the boot structure `kernel.kind` needs (`boot_params` at
/// [`ZERO_PAGE_START`] or `hvm_start_info` at [`PVH_INFO_START`]).
pub fn configure_boot<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    kernel: &KernelEntry,
    config: &BootConfig<'_>,
) -> Result<()> {
    if kernel.kernel_end > layout.low_ram_end() {
        return Err(Error::KernelTooLarge {
            kernel_end: kernel.kernel_end,
            ram_end: layout.low_ram_end(),
        });
    }
    match kernel.kind {
        BootProtocol::Pvh => {
            write_cmdline(mem, config.cmdline)?;
            write_pvh_start_info(mem, layout, config)
        }
        BootProtocol::Linux64 | BootProtocol::Elf64 => {
            // A bzImage may accept less than the platform maximum.
            if let Some(hdr) = kernel.setup_header {
                let version = hdr.version;
                let kernel_max = hdr.cmdline_size as usize;
                if version >= BOOT_PROTOCOL_CMDLINE_SIZE && kernel_max > 0 {
                    check_cmdline(config.cmdline, kernel_max.saturating_add(1))?;
                }
            }
            let len = write_cmdline(mem, config.cmdline)?;
            write_boot_params(mem, layout, kernel, config, len)
        }
    }
}

/// Builds the zero page (`boot_params`) for a 64-bit Linux entry. Pure: no guest memory.
pub fn build_boot_params(
    layout: &MemoryLayout,
    kernel: &KernelEntry,
    config: &BootConfig<'_>,
    cmdline_len: usize,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.cmdline_size = cmdline_len as u32;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr =
        u32::try_from(CMDLINE_START).map_err(|_| Error::AddressTooHigh("Command line"))?;
    params.ext_cmd_line_ptr = 0;
    if let Some(initrd) = config.initrd {
        params.hdr.ramdisk_image =
            u32::try_from(initrd.addr.raw_value()).map_err(|_| Error::AddressTooHigh("Initrd"))?;
        params.hdr.ramdisk_size =
            u32::try_from(initrd.size).map_err(|_| Error::AddressTooHigh("Initrd size"))?;
    }
    if let Some(rsdp) = config.rsdp_addr {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let entries = layout.e820_entries();
    if entries.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TooManyE820Entries(entries.len()));
    }
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, entry) in table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.type_code(),
        };
    }
    params.e820_table = table;
    params.e820_entries = entries.len() as u8;
    Ok(params)
}

/// Writes `boot_params` at [`ZERO_PAGE_START`] (the command line must already be written).
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    kernel: &KernelEntry,
    config: &BootConfig<'_>,
    cmdline_len: usize,
) -> Result<()> {
    let params = build_boot_params(layout, kernel, config, cmdline_len)?;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(Error::WriteBootParams)
}

/// Builds `hvm_start_info` and its memory map for a PVH entry. Pure: no guest memory.
pub fn build_pvh_start_info(
    layout: &MemoryLayout,
    config: &BootConfig<'_>,
) -> Result<(
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Option<hvm_modlist_entry>,
)> {
    let entries = layout.e820_entries();
    if entries.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries(entries.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = entries
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.type_code(),
            reserved: 0,
        })
        .collect();
    let module = config.initrd.map(|initrd| hvm_modlist_entry {
        paddr: initrd.addr.raw_value(),
        size: initrd.size,
        cmdline_paddr: 0,
        reserved: 0,
    });
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: config.rsdp_addr.map_or(0, |a| a.raw_value()),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok((info, memmap, module))
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`], the module list and the memory map.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    config: &BootConfig<'_>,
) -> Result<()> {
    let (info, memmap, module) = build_pvh_start_info(layout, config)?;
    let mut boot = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    boot.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(module) = module {
        boot.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&boot, mem).map_err(Error::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    use crate::e820::E820Type;

    type Mem = GuestMemoryMmap<()>;

    const KERNEL_PADDR: u64 = 0x100_0000;
    const PVH_ENTRY: u32 = 0x100_0040;

    fn guest(layout: &MemoryLayout) -> Mem {
        Mem::from_ranges(&layout.ram_ranges()).unwrap()
    }

    fn layout() -> MemoryLayout {
        MemoryLayout::new(256 << 20, None).unwrap()
    }

    /// A minimal ELF64 executable: one PT_LOAD of 16 bytes at KERNEL_PADDR and, optionally, a
    /// PT_NOTE with the Xen PVH entry note.
    fn elf_image(with_pvh_note: bool) -> Vec<u8> {
        let phnum: u16 = if with_pvh_note { 2 } else { 1 };
        let load_off: u64 = 0x200;
        let note_off: u64 = 0x180;
        let mut img = vec![0u8; 0x210];
        // e_ident
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = 2; // ELFCLASS64
        img[5] = 1; // little endian
        img[6] = 1; // EV_CURRENT
        img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        img[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        img[20..24].copy_from_slice(&1u32.to_le_bytes());
        img[24..32].copy_from_slice(&KERNEL_PADDR.to_le_bytes()); // e_entry
        img[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        img[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        img[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        img[56..58].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD
        let ph = 64;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        img[ph + 8..ph + 16].copy_from_slice(&load_off.to_le_bytes());
        img[ph + 16..ph + 24].copy_from_slice(&KERNEL_PADDR.to_le_bytes());
        img[ph + 24..ph + 32].copy_from_slice(&KERNEL_PADDR.to_le_bytes());
        img[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
        img[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes());
        if with_pvh_note {
            let ph = 64 + 56;
            img[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            img[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
            img[ph + 32..ph + 40].copy_from_slice(&20u64.to_le_bytes());
            let n = note_off as usize;
            img[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
            img[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
            img[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes()); // PHYS32_ENTRY
            img[n + 12..n + 16].copy_from_slice(b"Xen\0");
            img[n + 16..n + 20].copy_from_slice(&PVH_ENTRY.to_le_bytes());
        }
        img[load_off as usize..load_off as usize + 16].copy_from_slice(&[0x90; 16]);
        img
    }

    /// A minimal bzImage: 4 setup sectors + 1 boot sector, then a 4 KiB "compressed kernel".
    fn bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + 4096];
        img[0x1f1] = 4; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes()); // init_size
        img[5 * 512] = 0xf4;
        img
    }

    #[test]
    fn test_load_kernel_elf_with_pvh_note_is_pvh() {
        let mem = guest(&layout());

        let entry = load_kernel(&mem, &mut Cursor::new(elf_image(true))).unwrap();

        assert_eq!(entry.kind, BootProtocol::Pvh);
        assert_eq!(entry.entry_addr, GuestAddress(u64::from(PVH_ENTRY)));
        let byte: u8 = mem.read_obj(GuestAddress(KERNEL_PADDR)).unwrap();
        assert_eq!(byte, 0x90);
    }

    #[test]
    fn test_load_kernel_elf_without_note_is_elf64() {
        let mem = guest(&layout());

        let entry = load_kernel(&mem, &mut Cursor::new(elf_image(false))).unwrap();

        assert_eq!(entry.kind, BootProtocol::Elf64);
        assert_eq!(entry.entry_addr, GuestAddress(KERNEL_PADDR));
        assert_eq!(entry.kernel_end, KERNEL_PADDR + 0x2000);
        assert!(entry.setup_header.is_none());
    }

    #[test]
    fn test_load_kernel_bzimage_enters_at_plus_0x200() {
        let mem = guest(&layout());

        let entry = load_kernel(&mem, &mut Cursor::new(bzimage(0x020f, 1))).unwrap();

        assert_eq!(entry.kind, BootProtocol::Linux64);
        assert_eq!(entry.kernel_load, GuestAddress(HIMEM_START));
        assert_eq!(entry.entry_addr, GuestAddress(HIMEM_START + 0x200));
        assert_eq!(entry.kernel_end, 0x300_0000);
        let byte: u8 = mem.read_obj(GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(byte, 0xf4);
    }

    #[test]
    fn test_load_kernel_bzimage_without_64bit_entry_is_rejected() {
        let mem = guest(&layout());

        let err = load_kernel(&mem, &mut Cursor::new(bzimage(0x020f, 0))).unwrap_err();

        assert!(matches!(
            err,
            Error::No64BitEntry {
                version: 0x020f,
                ..
            }
        ));
    }

    #[test]
    fn test_load_kernel_garbage_is_not_a_kernel() {
        let mem = guest(&layout());

        let err = load_kernel(&mem, &mut Cursor::new(vec![0x42u8; 4096])).unwrap_err();

        assert!(matches!(err, Error::NotAKernel));
        assert_eq!(err.to_string(), "Not a kernel: neither ELF nor bzImage");
    }

    #[test]
    fn test_load_kernel_tiny_file_is_not_a_kernel() {
        let mem = guest(&layout());

        let err = load_kernel(&mem, &mut Cursor::new(vec![1u8, 2])).unwrap_err();

        assert!(matches!(err, Error::NotAKernel));
    }

    #[test]
    fn test_write_cmdline_writes_nul_terminated() {
        let mem = guest(&layout());

        let len = write_cmdline(&mem, "console=ttyS0").unwrap();

        assert_eq!(len, 13);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn test_write_cmdline_too_long_is_rejected() {
        let mem = guest(&layout());
        let long = "x".repeat(CMDLINE_MAX_SIZE);

        let err = write_cmdline(&mem, &long).unwrap_err();

        assert!(matches!(
            err,
            Error::CmdlineTooLong {
                len,
                max: CMDLINE_MAX_SIZE
            } if len == CMDLINE_MAX_SIZE + 1
        ));
    }

    #[test]
    fn test_write_cmdline_with_nul_is_rejected() {
        let mem = guest(&layout());

        let err = write_cmdline(&mem, "a\0b").unwrap_err();

        assert!(matches!(err, Error::CmdlineNul));
    }

    fn elf_kernel() -> KernelEntry {
        KernelEntry {
            entry_addr: GuestAddress(KERNEL_PADDR),
            kind: BootProtocol::Elf64,
            setup_header: None,
            kernel_load: GuestAddress(KERNEL_PADDR),
            kernel_end: 0x200_0000,
        }
    }

    #[test]
    fn test_initrd_address_top_of_low_ram_page_aligned() {
        let layout = layout();

        let addr = initrd_address(&layout, &elf_kernel(), 10_000).unwrap();

        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + 10_000 <= layout.low_ram_end());
        assert!(layout.low_ram_end() - addr.raw_value() < 10_000 + PAGE_SIZE);
    }

    #[test]
    fn test_initrd_address_big_guest_stays_below_hole() {
        let layout = MemoryLayout::new(6 << 30, None).unwrap();

        let addr = initrd_address(&layout, &elf_kernel(), 1 << 20).unwrap();

        assert_eq!(addr.raw_value(), crate::layout::MMIO_HOLE_START - (1 << 20));
    }

    #[test]
    fn test_initrd_address_respects_initrd_addr_max() {
        let layout = MemoryLayout::new(2 << 30, None).unwrap();
        let mut hdr = setup_header {
            version: 0x020f,
            initrd_addr_max: 0x3fff_ffff,
            ..Default::default()
        };
        hdr.xloadflags = 1;
        let kernel = KernelEntry {
            setup_header: Some(hdr),
            kind: BootProtocol::Linux64,
            ..elf_kernel()
        };

        let addr = initrd_address(&layout, &kernel, 4096).unwrap();

        assert_eq!(addr.raw_value(), 0x4000_0000 - 4096);
    }

    #[test]
    fn test_initrd_address_overlapping_kernel_is_rejected() {
        let layout = layout();

        let err = initrd_address(&layout, &elf_kernel(), 250 << 20).unwrap_err();

        assert!(matches!(err, Error::InitrdTooLarge { .. }));
    }

    #[test]
    fn test_initrd_address_empty_is_rejected() {
        let err = initrd_address(&layout(), &elf_kernel(), 0).unwrap_err();

        assert!(matches!(err, Error::InitrdEmpty));
    }

    #[test]
    fn test_load_initrd_copies_contents() {
        let layout = layout();
        let mem = guest(&layout);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();

        let region =
            load_initrd(&mem, &layout, &elf_kernel(), &mut Cursor::new(data.clone())).unwrap();

        assert_eq!(region.size, 5000);
        let mut buf = vec![0u8; 5000];
        mem.read_slice(&mut buf, region.addr).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn test_configure_boot_bzimage_fills_zero_page() {
        let layout = layout();
        let mem = guest(&layout);
        let kernel = load_kernel(&mem, &mut Cursor::new(bzimage(0x020f, 1))).unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(0x800_0000),
            size: 1234,
        };
        let config = BootConfig {
            cmdline: "console=ttyS0",
            initrd: Some(initrd),
            rsdp_addr: Some(GuestAddress(0xe0000)),
        };

        configure_boot(&mem, &layout, &kernel, &config).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 2047);
        assert_eq!({ hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ hdr.ramdisk_size }, 1234);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        let entries = layout.e820_entries();
        assert_eq!(params.e820_entries as usize, entries.len());
        let table = params.e820_table;
        for (raw, entry) in table.iter().zip(&entries) {
            assert_eq!({ raw.addr }, entry.addr);
            assert_eq!({ raw.size }, entry.size);
            assert_eq!({ raw.r#type }, entry.type_code());
        }
    }

    #[test]
    fn test_configure_boot_elf64_synthesizes_header() {
        let layout = layout();
        let mem = guest(&layout);
        let config = BootConfig {
            cmdline: "quiet",
            initrd: None,
            rsdp_addr: None,
        };

        configure_boot(&mem, &layout, &elf_kernel(), &config).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.cmdline_size }, 5);
        assert_eq!({ hdr.ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn test_configure_boot_cmdline_longer_than_kernel_accepts_is_rejected() {
        let layout = layout();
        let mem = guest(&layout);
        let mut kernel = load_kernel(&mem, &mut Cursor::new(bzimage(0x020f, 1))).unwrap();
        if let Some(hdr) = kernel.setup_header.as_mut() {
            hdr.cmdline_size = 4;
        }
        let config = BootConfig {
            cmdline: "console=ttyS0",
            initrd: None,
            rsdp_addr: None,
        };

        let err = configure_boot(&mem, &layout, &kernel, &config).unwrap_err();

        assert!(matches!(err, Error::CmdlineTooLong { max: 5, .. }));
    }

    #[test]
    fn test_configure_boot_pvh_writes_start_info() {
        let layout = MemoryLayout::new(6 << 30, None).unwrap();
        let mem = guest(&layout);
        let kernel = KernelEntry {
            kind: BootProtocol::Pvh,
            ..elf_kernel()
        };
        let config = BootConfig {
            cmdline: "console=ttyS0",
            initrd: Some(InitrdRegion {
                addr: GuestAddress(0x800_0000),
                size: 4096,
            }),
            rsdp_addr: Some(GuestAddress(0xe0000)),
        };

        configure_boot(&mem, &layout, &kernel, &config).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(module.paddr, 0x800_0000);
        assert_eq!(module.size, 4096);
        let entries = layout.e820_entries();
        assert_eq!(info.memmap_entries as usize, entries.len());
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                PVH_MEMMAP_START + 24 * (entries.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!(last.addr, crate::layout::RAM_64BIT_START);
        assert_eq!(last.type_, E820Type::Ram as u32);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn test_configure_boot_kernel_beyond_ram_is_rejected() {
        let layout = MemoryLayout::new(crate::layout::MIN_MEMORY, None).unwrap();
        let mem = guest(&layout);
        let kernel = KernelEntry {
            kernel_end: crate::layout::MIN_MEMORY + 1,
            ..elf_kernel()
        };
        let config = BootConfig {
            cmdline: "",
            initrd: None,
            rsdp_addr: None,
        };

        let err = configure_boot(&mem, &layout, &kernel, &config).unwrap_err();

        assert!(matches!(err, Error::KernelTooLarge { .. }));
    }

    #[test]
    fn test_configure_boot_pvh_without_initrd_has_no_modules() {
        let layout = layout();
        let mem = guest(&layout);
        let kernel = KernelEntry {
            kind: BootProtocol::Pvh,
            ..elf_kernel()
        };
        let config = BootConfig {
            cmdline: "",
            initrd: None,
            rsdp_addr: None,
        };

        configure_boot(&mem, &layout, &kernel, &config).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert_eq!(info.rsdp_paddr, 0);
    }
}
