//! The PVH `hvm_start_info` handed over in EBX: command line, ACPI RSDP, memory map.

use crate::sys::{mmio, phys_ok};

/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Longest command line kept.
pub const CMDLINE_MAX: usize = 2048;
/// Most memory-map entries kept.
pub const MEMMAP_MAX: usize = 128;

/// One PVH memory-map entry (e820 style).
#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

/// What the guest keeps from the start info (copied before low memory is reused).
pub struct BootInfo {
    /// Address of the start info.
    pub info_addr: u64,
    /// Memory-map address and entry count as given by the loader.
    pub memmap_raw: (u64, u32),
    /// Start-info version.
    pub version: u32,
    /// Number of modules (e.g. an initrd) in the module list; not used otherwise.
    pub nr_modules: u32,
    /// Kernel command line bytes.
    pub cmdline: [u8; CMDLINE_MAX],
    /// Valid bytes of `cmdline`.
    pub cmdline_len: usize,
    /// RSDP address (0 if the loader gave none).
    pub rsdp: u64,
    /// Memory map.
    pub memmap: [MemEntry; MEMMAP_MAX],
    /// Valid entries of `memmap`.
    pub memmap_len: usize,
}

/// Why the start info was not usable.
pub enum PvhError {
    /// EBX pointed outside memory.
    BadPointer,
    /// Wrong magic value.
    BadMagic(u32),
}

impl BootInfo {
    /// Parses the start info at `addr`, validating every pointer.
    pub fn parse(addr: u64) -> Result<BootInfo, PvhError> {
        if !phys_ok(addr, 56) {
            return Err(PvhError::BadPointer);
        }
        let magic = mmio::r32(addr);
        if magic != PVH_MAGIC {
            return Err(PvhError::BadMagic(magic));
        }
        let mut bi = BootInfo {
            info_addr: addr,
            version: mmio::r32(addr + 4),
            nr_modules: mmio::r32(addr + 12),
            memmap_raw: (mmio::r64(addr + 40), mmio::r32(addr + 48)),
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            rsdp: mmio::r64(addr + 32),
            memmap: [MemEntry::default(); MEMMAP_MAX],
            memmap_len: 0,
        };
        let cmdline = mmio::r64(addr + 24);
        if cmdline != 0 && phys_ok(cmdline, 1) {
            let mut n = 0;
            while n < CMDLINE_MAX && phys_ok(cmdline + n as u64, 1) {
                let b = mmio::r8(cmdline + n as u64);
                if b == 0 {
                    break;
                }
                bi.cmdline[n] = b;
                n += 1;
            }
            bi.cmdline_len = n;
        }
        if bi.version >= 1 {
            let map = mmio::r64(addr + 40);
            let entries = (mmio::r32(addr + 48) as usize).min(MEMMAP_MAX);
            if phys_ok(map, entries as u64 * 24) {
                for i in 0..entries {
                    let e = map + i as u64 * 24;
                    bi.memmap[i] = MemEntry {
                        addr: mmio::r64(e),
                        size: mmio::r64(e + 8),
                        kind: mmio::r32(e + 16),
                    };
                }
                bi.memmap_len = entries;
            }
        }
        Ok(bi)
    }

    /// The command line as text (invalid UTF-8 yields an empty string).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// RAM entries only.
    pub fn ram(&self) -> impl Iterator<Item = &MemEntry> {
        self.memmap[..self.memmap_len]
            .iter()
            .filter(|e| e.kind == 1 && e.size > 0)
    }
}

/// Extracts the value of `cmds=` from a kernel command line: `cmds="a;b"` or `cmds=a;b`.
pub fn cmds_param(cmdline: &str) -> Option<&str> {
    let mut rest = cmdline;
    loop {
        let idx = rest.find("cmds=")?;
        let at_word_start = idx == 0 || rest.as_bytes()[idx - 1] == b' ';
        let after = &rest[idx + 5..];
        if at_word_start {
            if let Some(quoted) = after.strip_prefix('"') {
                return Some(match quoted.find('"') {
                    Some(end) => &quoted[..end],
                    None => quoted,
                });
            }
            return Some(after.split(' ').next().unwrap_or(""));
        }
        rest = after;
    }
}
