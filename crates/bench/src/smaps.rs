//! Reads `/proc/PID/smaps` and splits a VMM's memory into guest RAM and the VMM's own overhead.

use serde::Serialize;

use crate::error::{BenchError, Result};

/// Slack allowed above the guest RAM size when looking for its mapping (alignment, guard pages).
const RAM_MAPPING_SLACK: u64 = 4 << 20;

/// One mapping of `smaps` with the fields we need, in bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapping {
    /// Virtual size.
    pub size: u64,
    /// Resident set size.
    pub rss: u64,
    /// Proportional set size.
    pub pss: u64,
    /// Private (clean + dirty) resident memory.
    pub private: u64,
    /// The path column (empty for anonymous memory).
    pub path: String,
}

impl Mapping {
    /// True for memory that can hold guest RAM: anonymous, memfd or shared `/dev/zero`.
    fn is_ram_like(&self) -> bool {
        self.path.is_empty()
            || self.path.starts_with("[anon")
            || self.path.starts_with("/memfd:")
            || self.path.starts_with("/dev/zero")
            || self.path.starts_with("/SYSV")
    }
}

/// Memory of one VMM process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryUse {
    /// RSS of the whole process.
    pub rss_total: u64,
    /// PSS of the whole process.
    pub pss_total: u64,
    /// RSS outside the guest RAM mapping: the VMM's own overhead.
    pub rss_vmm: u64,
    /// PSS outside the guest RAM mapping.
    pub pss_vmm: u64,
    /// Private resident memory outside the guest RAM mapping (USS).
    pub private_vmm: u64,
    /// RSS of the guest RAM mapping (pages the guest touched).
    pub rss_guest_ram: u64,
}

/// Parse the text of `/proc/PID/smaps`.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some((start, end, path)) = parse_header(line) {
            maps.push(Mapping {
                size: end.saturating_sub(start),
                path,
                ..Mapping::default()
            });
            continue;
        }
        let Some(current) = maps.last_mut() else {
            continue;
        };
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => current.rss = kib.saturating_mul(1024),
            "Pss:" => current.pss = kib.saturating_mul(1024),
            "Private_Clean:" | "Private_Dirty:" => {
                current.private = current.private.saturating_add(kib.saturating_mul(1024));
            }
            _ => {}
        }
    }
    maps
}

/// `start-end perms offset dev inode [path]` → (start, end, path).
fn parse_header(line: &str) -> Option<(u64, u64, String)> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let path = fields.collect::<Vec<_>>().join(" ");
    Some((start, end, path))
}

/// Split `maps` into the guest RAM mapping (the largest RAM-like mapping of `ram_bytes` up to
/// `ram_bytes` + 4 MiB) and everything else.
pub fn memory_use(maps: &[Mapping], ram_bytes: u64) -> Result<MemoryUse> {
    let ram = maps
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_ram_like())
        .filter(|(_, m)| {
            m.size >= ram_bytes && m.size <= ram_bytes.saturating_add(RAM_MAPPING_SLACK)
        })
        .max_by_key(|(_, m)| m.size)
        .map(|(i, _)| i)
        .ok_or(BenchError::NoGuestRamMapping(ram_bytes))?;
    let rss_total: u64 = maps.iter().map(|m| m.rss).sum();
    let pss_total: u64 = maps.iter().map(|m| m.pss).sum();
    let private_total: u64 = maps.iter().map(|m| m.private).sum();
    Ok(MemoryUse {
        rss_total,
        pss_total,
        rss_vmm: rss_total - maps[ram].rss,
        pss_vmm: pss_total - maps[ram].pss,
        private_vmm: private_total.saturating_sub(maps[ram].private),
        rss_guest_ram: maps[ram].rss,
    })
}

/// Read and split the smaps of a live process.
pub fn measure(pid: u32, ram_bytes: u64) -> Result<MemoryUse> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|source| BenchError::ReadSmaps { pid, source })?;
    memory_use(&parse_smaps(&text), ram_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/vmm
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
Private_Clean:        50 kB
Private_Dirty:        10 kB
7f0000000000-7f0020000000 rw-p 00000000 00:00 0 
Size:             524288 kB
Rss:               2048 kB
Pss:               2048 kB
Private_Clean:         0 kB
Private_Dirty:      2048 kB
7f0020000000-7f0020200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                 100 kB
Pss:                 100 kB
Private_Dirty:       100 kB
VmFlags: rd wr mr mw me ac
";

    #[test]
    fn test_parse_smaps_three_mappings_sizes_in_bytes() {
        // Arrange
        let text = SAMPLE;

        // Act
        let maps = parse_smaps(text);

        // Assert
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[0].path, "/usr/bin/vmm");
        assert_eq!(maps[0].size, 1 << 20);
        assert_eq!(maps[1].size, 512 << 20);
        assert_eq!((maps[1].rss, maps[1].pss), (2048 * 1024, 2048 * 1024));
        assert_eq!(maps[2].path, "");
    }

    #[test]
    fn test_memory_use_guest_ram_excluded_from_vmm() {
        // Arrange
        let maps = parse_smaps(SAMPLE);

        // Act
        let m = memory_use(&maps, 512 << 20).expect("ram mapping found");

        // Assert
        assert_eq!(m.rss_guest_ram, 2048 * 1024);
        assert_eq!(m.rss_vmm, 900 * 1024);
        assert_eq!(m.pss_vmm, 500 * 1024);
        assert_eq!(m.private_vmm, 160 * 1024);
        assert_eq!(m.rss_total, 2948 * 1024);
    }

    #[test]
    fn test_memory_use_file_mapping_of_ram_size_not_ram() {
        // Arrange
        let maps = vec![Mapping {
            size: 512 << 20,
            rss: 1,
            pss: 1,
            private: 1,
            path: "/var/lib/disk.img".into(),
        }];

        // Act
        let r = memory_use(&maps, 512 << 20);

        // Assert
        assert!(matches!(r, Err(BenchError::NoGuestRamMapping(_))));
    }

    #[test]
    fn test_memory_use_memfd_ram_found() {
        // Arrange
        let maps = vec![
            Mapping {
                size: 4096,
                rss: 4096,
                pss: 4096,
                private: 4096,
                path: String::new(),
            },
            Mapping {
                size: 256 << 20,
                rss: 8192,
                pss: 8192,
                private: 8192,
                path: "/memfd:guest-ram (deleted)".into(),
            },
        ];

        // Act
        let m = memory_use(&maps, 256 << 20).expect("memfd ram found");

        // Assert
        assert_eq!((m.rss_vmm, m.rss_guest_ram), (4096, 8192));
    }
}
