//! Block migration, source side: which disks are copied, their write tracking, and reading
//! their blocks for the wire (data blocks with their bytes, all-zero blocks as zero ranges).

use std::sync::Arc;

use disk::{DiskBackend, SwappableDisk, DIRTY_BLOCK_SIZE};
use migration::wire::{DiskInfo, MAX_DISK_RUN};

use crate::live::LiveVm;

/// One disk whose contents the migration copies.
pub(super) struct CopiedDisk {
    /// Index in the VM configuration's disk list.
    pub index: u32,
    /// The device's disk (every guest write passes through it and is tracked there).
    pub disk: Arc<SwappableDisk>,
}

/// A piece of a disk for the wire.
pub(super) enum Piece<'a> {
    /// Bytes from `offset`.
    Data { offset: u64, bytes: &'a [u8] },
    /// `len` bytes from `offset` read as zeroes.
    Zero { offset: u64, len: u64 },
}

/// The disks a block migration copies: every writable one. Read-only disks are not copied
/// (the destination opens them at the same path, as with shared storage).
pub(super) fn copied_disks(vm: &LiveVm) -> Vec<CopiedDisk> {
    vm.disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.readonly)
        .map(|(i, d)| CopiedDisk {
            index: i as u32,
            disk: d.disk.clone(),
        })
        .collect()
}

/// The hello's disk list.
pub(super) fn announce(disks: &[CopiedDisk]) -> Vec<DiskInfo> {
    disks
        .iter()
        .map(|d| DiskInfo {
            index: d.index,
            virtual_size: d.disk.size(),
            format: d.disk.current().format.name().to_string(),
        })
        .collect()
}

/// Start recording guest writes to every copied disk (before round 0 reads them).
pub(super) fn start_tracking(disks: &[CopiedDisk]) {
    for d in disks {
        d.disk.write_tracker().start();
    }
}

/// Stop recording (the migration ended either way).
pub(super) fn stop_tracking(disks: &[CopiedDisk]) {
    for d in disks {
        d.disk.write_tracker().stop();
    }
}

/// The blocks written since the last harvest, one bitmap per copied disk.
pub(super) fn harvest(disks: &[CopiedDisk]) -> Vec<Vec<u64>> {
    disks
        .iter()
        .map(|d| d.disk.write_tracker().harvest())
        .collect()
}

/// Bytes the blocks set in `maps` stand for.
pub(super) fn map_bytes(maps: &[Vec<u64>]) -> u64 {
    maps.iter().map(|m| disk::blocks_set(m)).sum::<u64>() * DIRTY_BLOCK_SIZE
}

/// Round 0: the blocks that may hold data (a raw image's holes are skipped; a qcow2 image,
/// backing chain included, is read whole and its zero blocks skipped when sent).
pub(super) fn allocated_blocks(d: &CopiedDisk) -> Result<Vec<u64>, String> {
    let tracker = d.disk.write_tracker();
    let mut map = vec![0u64; tracker.blocks().div_ceil(64) as usize];
    let ranges = d.disk.data_ranges().map_err(|e| {
        format!(
            "Cannot map the data of disk {}: {e}",
            d.disk.path().display()
        )
    })?;
    for (start, len) in ranges {
        if len == 0 {
            continue;
        }
        let last = start.saturating_add(len - 1) / DIRTY_BLOCK_SIZE;
        for b in start / DIRTY_BLOCK_SIZE..=last {
            // Ranges past the disk's end (none expected) mark nothing.
            if let Some(w) = map.get_mut((b / 64) as usize) {
                *w |= 1 << (b % 64);
            } else {
                break;
            }
        }
    }
    Ok(map)
}

/// Read the blocks set in `map` and hand them to `emit` in order: runs of data blocks (up
/// to [`MAX_DISK_RUN`] bytes) and runs of all-zero blocks, which are left out entirely when
/// `zero_known` (the destination's new image reads as zeroes there). The guest may write a
/// block while it is read: the tracker sends it again.
pub(super) fn send_blocks<E>(
    d: &CopiedDisk,
    map: &[u64],
    zero_known: bool,
    emit: &mut dyn FnMut(Piece<'_>) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<String>,
{
    let tracker = d.disk.write_tracker();
    let mut buf = vec![0u8; MAX_DISK_RUN as usize];
    // Pending data run: (offset, bytes filled in buf); pending zero run: (offset, len).
    let mut data: Option<(u64, usize)> = None;
    let mut zero: Option<(u64, u64)> = None;
    for b in 0..tracker.blocks() {
        if !disk::block_is_set(map, b) {
            continue;
        }
        let (offset, len) = tracker.block_range(b);
        let at = match data {
            Some((start, filled))
                if start + filled as u64 == offset && filled + len as usize <= buf.len() =>
            {
                filled
            }
            Some((start, filled)) => {
                emit(Piece::Data {
                    offset: start,
                    bytes: &buf[..filled],
                })?;
                data = None;
                0
            }
            None => 0,
        };
        let slot = &mut buf[at..at + len as usize];
        d.disk.read_at(offset, slot).map_err(|e| {
            E::from(format!(
                "Cannot read disk {} at {offset:#x}: {e}",
                d.disk.path().display()
            ))
        })?;
        if slot.iter().all(|&x| x == 0) {
            if let Some((start, filled)) = data.take() {
                emit(Piece::Data {
                    offset: start,
                    bytes: &buf[..filled],
                })?;
            }
            if zero_known {
                continue;
            }
            zero = match zero {
                Some((start, zlen)) if start + zlen == offset => Some((start, zlen + len)),
                Some((start, zlen)) => {
                    emit(Piece::Zero {
                        offset: start,
                        len: zlen,
                    })?;
                    Some((offset, len))
                }
                None => Some((offset, len)),
            };
        } else {
            if let Some((start, zlen)) = zero.take() {
                emit(Piece::Zero {
                    offset: start,
                    len: zlen,
                })?;
            }
            if at == 0 {
                // The block was read to the front of the buffer: a new run starts there.
                data = Some((offset, len as usize));
            } else {
                data = data.map(|(start, filled)| (start, filled + len as usize));
            }
        }
    }
    if let Some((start, filled)) = data {
        emit(Piece::Data {
            offset: start,
            bytes: &buf[..filled],
        })?;
    }
    if let Some((start, zlen)) = zero {
        emit(Piece::Zero {
            offset: start,
            len: zlen,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::{CurrentImage, ImageFormat};
    use vmm_sys_util::tempfile::TempFile;

    /// What `send_blocks` emitted: (is data, offset, length).
    fn pieces(d: &CopiedDisk, map: &[u64], zero_known: bool) -> Vec<(bool, u64, u64)> {
        let mut out = Vec::new();
        send_blocks::<String>(d, map, zero_known, &mut |p| {
            out.push(match p {
                Piece::Data { offset, bytes } => (true, offset, bytes.len() as u64),
                Piece::Zero { offset, len } => (false, offset, len),
            });
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn test_blocks_go_as_data_runs_and_zero_ranges_never_as_zero_bytes() {
        // Arrange: 6 blocks; data in blocks 0, 1 and 3; 2, 4 and 5 all zero.
        let f = TempFile::new().unwrap();
        f.as_file().set_len(6 * DIRTY_BLOCK_SIZE).unwrap();
        let raw = disk::open_image(f.as_path(), false, Some(ImageFormat::Raw)).unwrap();
        for b in [0, 1, 3] {
            raw.write_at(b * DIRTY_BLOCK_SIZE + 100, &[9; 10]).unwrap();
        }
        let d = CopiedDisk {
            index: 0,
            disk: Arc::new(SwappableDisk::new(CurrentImage {
                backend: raw,
                path: f.as_path().to_path_buf(),
                format: ImageFormat::Raw,
            })),
        };
        let all = vec![0b11_1111u64];
        let b = DIRTY_BLOCK_SIZE;

        // Act
        let later_round = pieces(&d, &all, false);
        let round0 = pieces(&d, &all, true);
        let only_block_4 = pieces(&d, &[0b1_0000], false);

        // Assert
        assert_eq!(
            later_round,
            vec![
                (true, 0, 2 * b),
                (false, 2 * b, b),
                (true, 3 * b, b),
                (false, 4 * b, 2 * b)
            ]
        );
        assert_eq!(round0, vec![(true, 0, 2 * b), (true, 3 * b, b)]);
        assert_eq!(only_block_4, vec![(false, 4 * b, b)]);
    }
}
