//! Whole-VM snapshots: what a paused VM is made of (its configuration, KVM's VM and vCPU
//! state, every device's state and guest RAM), written in the `snapshot` crate's format, and
//! read back and checked for a restore into a fresh process.
//!
//! Sections of `state.bin` (see `crates/snapshot/FORMAT.md` and docs/snapshots.md):
//! `meta` ([`SnapshotMeta`]), `kvm-vm` (irqchip, PIT, clock), `vcpu.N` (one per vCPU),
//! `legacy-devices` (COM1, i8042, CMOS, ACPI PM, reset register, POST port) and
//! `virtio-devices` (every virtio function in PCI slot order: PCI configuration space,
//! MSI-X table, transport registers, virtqueue positions) and `vmgenid` (the VM generation
//! ID; absent in snapshots of VMs booted without the device). `memory.bin` holds guest RAM,
//! only the pages the guest touched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::{LegacyDevices, LegacyDevicesState};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use snapshot::{MemoryRegion, SnapshotDir, StateReader, StateWriter};
use virtio::{VirtioPciDevice, VirtioPciState};
use vm_device::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::persist::vcpu_state::VcpuState;
use crate::persist::vm_state::VmKvmState;
use crate::vmgenid::GenerationId;

const META: &str = "meta";
const KVM_VM: &str = "kvm-vm";
const LEGACY: &str = "legacy-devices";
const VIRTIO: &str = "virtio-devices";
const MEMORY_DIFF: &str = "memory-diff";
const VMGENID: &str = "vmgenid";

fn vcpu_section(id: usize) -> String {
    format!("vcpu.{id}")
}

/// Errors taking or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum VmSnapshotError {
    /// The snapshot files.
    #[error(transparent)]
    Format(#[from] snapshot::SnapshotError),
    /// KVM state.
    #[error(transparent)]
    Kvm(#[from] crate::persist::PersistError),
    /// The snapshot does not fit the VM it is loaded into.
    #[error("Snapshot does not match this VM: {0}")]
    Mismatch(String),
    /// Taking the snapshot failed before anything was written.
    #[error("Cannot snapshot the VM: {0}")]
    Capture(String),
}

/// Who took the snapshot, when, and the VM it describes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Ferrite's version.
    pub ferrite_version: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The VM's configuration (a restore rebuilds the same machine from it).
    pub config: VmConfig,
    /// Guest RAM regions and where each lies in `memory.bin`.
    pub memory: Vec<MemoryRegion>,
}

/// How guest RAM goes into `memory.bin`.
pub enum MemoryCapture {
    /// The pages the guest touched (resident in its anonymous mapping).
    Touched,
    /// Only `dirty` pages (one bitmap per region), on top of the snapshot `base`: a diff
    /// snapshot, restorable after [`merge`].
    Diff {
        /// The snapshot this one is a diff to.
        base: PathBuf,
        /// Pages written since `base`.
        dirty: Vec<Vec<u64>>,
    },
    /// A full snapshot of a VM restored from `base`: `base`'s memory file plus the `dirty`
    /// pages written since the restore (pages of `base` the guest has not touched are not
    /// resident, so [`MemoryCapture::Touched`] would miss them).
    BasePlusDirty {
        /// The snapshot the VM was restored from.
        base: PathBuf,
        /// Pages written since the restore.
        dirty: Vec<Vec<u64>>,
    },
}

/// The `memory-diff` section of a diff snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryDiff {
    /// The snapshot this one is a diff to.
    pub base: PathBuf,
    /// The pages `memory.bin` holds.
    pub pages: snapshot::PageMap,
}

/// The parts of a paused VM a snapshot is taken from.
pub struct SnapshotSources<'a> {
    /// The KVM VM (irqchip, PIT, clock).
    pub vm: &'a VmFd,
    /// Guest RAM (the vCPUs and device workers are paused).
    pub memory: &'a GuestMemoryMmap,
    /// Legacy devices.
    pub legacy: &'a LegacyDevices,
    /// Virtio functions in PCI slot order.
    pub virtio: &'a [Arc<Mutex<VirtioPciDevice>>],
    /// The configuration the VM was built from.
    pub config: &'a VmConfig,
    /// Every vCPU's state, by index.
    pub vcpus: Vec<VcpuState>,
    /// How to save guest RAM.
    pub capture: MemoryCapture,
    /// The VM generation ID the guest sees (None: its tables have no VMGENID device).
    pub vmgenid: Option<GenerationId>,
}

/// What writing a snapshot cost.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    /// The snapshot directory.
    pub path: PathBuf,
    /// Guest RAM bytes written (touched, non-zero pages).
    pub memory_bytes_written: u64,
    /// Zero pages left out.
    pub zero_pages_skipped: u64,
    /// Size of `state.bin`.
    pub state_bytes: u64,
    /// Time to write everything, ms.
    pub write_ms: f64,
}

fn memory_layout(memory: &GuestMemoryMmap) -> Result<Vec<MemoryRegion>, VmSnapshotError> {
    let ranges: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
    Ok(MemoryRegion::layout(&ranges)?)
}

/// Add the VM's sections (everything but memory) to `state`: what a snapshot's state file and
/// a migration's final state hold.
fn put_vm_state(
    state: &mut StateWriter,
    src: &SnapshotSources<'_>,
    layout: Vec<MemoryRegion>,
) -> Result<(), VmSnapshotError> {
    let meta = SnapshotMeta {
        ferrite_version: env!("CARGO_PKG_VERSION").to_string(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        config: src.config.clone(),
        memory: layout,
    };
    state.put(META, &meta)?;
    state.put(KVM_VM, &crate::persist::vm_state::save_vm(src.vm)?)?;
    for (id, vcpu) in src.vcpus.iter().enumerate() {
        state.put(&vcpu_section(id), vcpu)?;
    }
    state.put(LEGACY, &src.legacy.save())?;
    let virtio: Vec<VirtioPciState> = src
        .virtio
        .iter()
        .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).state())
        .collect();
    state.put(VIRTIO, &virtio)?;
    if let Some(id) = &src.vmgenid {
        state.put(VMGENID, id)?;
    }
    Ok(())
}

/// The state file's bytes for a paused VM whose memory travels separately (a migration's
/// final state; `src.capture` is ignored).
pub fn state_bytes(src: &SnapshotSources<'_>) -> Result<Vec<u8>, VmSnapshotError> {
    let mut state = StateWriter::new();
    put_vm_state(&mut state, src, memory_layout(src.memory)?)?;
    Ok(state.to_bytes())
}

/// Write the snapshot of a paused VM to the new directory `path` (nothing is left behind
/// when this fails).
pub fn write(path: &Path, src: SnapshotSources<'_>) -> Result<SnapshotSummary, VmSnapshotError> {
    let start = Instant::now();
    let dir = SnapshotDir::create(path)?;
    let layout = memory_layout(src.memory)?;
    let slices: Vec<(MemoryRegion, &[u8])> = layout
        .iter()
        .zip(src.memory.iter())
        .map(|(region, mapped)| {
            // SAFETY: the mapping is owned by `src.memory`, which outlives this function, and
            // is `len()` bytes long. The vCPUs and device workers are paused, so nothing
            // writes guest RAM while the slice is read.
            let bytes =
                unsafe { std::slice::from_raw_parts(mapped.as_ptr(), mapped.len() as usize) };
            (*region, bytes)
        })
        .collect();
    let mut state = StateWriter::new();
    let written = match &src.capture {
        MemoryCapture::Touched => snapshot::write_memory(&dir.memory_path(), &slices)?,
        MemoryCapture::Diff { base, dirty } => {
            let bitmaps: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
            let (stats, pages) =
                snapshot::write_memory_dirty(&dir.memory_path(), &slices, &bitmaps)?;
            state.put(
                MEMORY_DIFF,
                &MemoryDiff {
                    base: base.clone(),
                    pages,
                },
            )?;
            stats
        }
        MemoryCapture::BasePlusDirty { base, dirty } => {
            let bitmaps: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
            let diff_path = dir.path().join("memory.diff");
            let (stats, pages) = snapshot::write_memory_dirty(&diff_path, &slices, &bitmaps)?;
            snapshot::copy_sparse(&base.join(snapshot::MEMORY_FILE), &dir.memory_path())?;
            snapshot::merge_diff(&dir.memory_path(), &diff_path, &pages)?;
            std::fs::remove_file(&diff_path).map_err(|e| {
                VmSnapshotError::Capture(format!("cannot remove {}: {e}", diff_path.display()))
            })?;
            stats
        }
    };

    put_vm_state(&mut state, &src, layout)?;
    state.write_to(&dir.state_path())?;
    let state_bytes = std::fs::metadata(dir.state_path())
        .map(|m| m.len())
        .unwrap_or(0);
    let committed = dir.commit()?;
    Ok(SnapshotSummary {
        path: committed.path().to_path_buf(),
        memory_bytes_written: written.bytes_written,
        zero_pages_skipped: written.pages_skipped_zero,
        state_bytes,
        write_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Where a restored VM's RAM comes from.
pub enum SnapshotMemory {
    /// A snapshot's `memory.bin`, opened: mapped copy-on-write.
    File(std::fs::File),
    /// Already in place: received by an incoming migration.
    Received(GuestMemoryMmap),
}

/// A snapshot read back and checked, ready to rebuild the VM from.
pub struct LoadedSnapshot {
    /// The snapshot directory it came from (None: received by a migration).
    pub dir: Option<PathBuf>,
    /// Configuration and memory layout.
    pub meta: SnapshotMeta,
    /// irqchip, PIT, clock.
    pub kvm_vm: VmKvmState,
    /// vCPU states by index.
    pub vcpus: Vec<VcpuState>,
    /// Legacy devices.
    pub legacy: LegacyDevicesState,
    /// Virtio functions in PCI slot order.
    pub virtio: Vec<VirtioPciState>,
    /// Where guest RAM comes from.
    pub memory: SnapshotMemory,
    /// The VM generation ID the guest saw (None: its tables have no VMGENID device).
    pub vmgenid: Option<GenerationId>,
    /// Restore as a clone: give the guest a new generation ID and notify it
    /// (set by `crate::clone::apply`).
    pub new_identity: bool,
    /// An incoming migration's commit exchange: the vCPUs may start only once it opens.
    pub start_gate: Option<std::sync::Mutex<Option<crate::migrate::incoming::StartGate>>>,
    /// The KVM VM, already created over [`SnapshotMemory::Received`] memory.
    pub prebuilt: Option<std::sync::Mutex<Option<crate::builder::PrebuiltVm>>>,
}

impl std::fmt::Debug for LoadedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSnapshot")
            .field("dir", &self.dir)
            .field("vcpus", &self.vcpus.len())
            .field("virtio", &self.virtio.len())
            .finish_non_exhaustive()
    }
}

/// Read and check the snapshot in `path`: every section present, checksummed and decodable,
/// one vCPU state per configured vCPU, and a memory file long enough for the layout.
pub fn load(path: &Path) -> Result<LoadedSnapshot, VmSnapshotError> {
    let dir = SnapshotDir::open(path)?;
    let reader = StateReader::open(&dir.state_path())?;
    if reader.contains(MEMORY_DIFF) {
        let diff: MemoryDiff = reader.get(MEMORY_DIFF)?;
        return Err(VmSnapshotError::Mismatch(format!(
            "it is a diff snapshot on top of {}: merge it into a full snapshot first \
             (ferrite snapshot merge {} NEW_DIR)",
            diff.base.display(),
            path.display()
        )));
    }
    let meta: SnapshotMeta = reader.get(META)?;
    let needed = snapshot::memory_file_len(&meta.memory)?;
    let memory_path = dir.memory_path();
    let memory_file = std::fs::File::open(&memory_path).map_err(|e| {
        VmSnapshotError::Mismatch(format!("cannot open {}: {e}", memory_path.display()))
    })?;
    let len = memory_file
        .metadata()
        .map_err(|e| VmSnapshotError::Mismatch(e.to_string()))?
        .len();
    if len < needed {
        return Err(VmSnapshotError::Mismatch(format!(
            "{} is {len} bytes but the memory layout needs {needed}: the snapshot is truncated",
            memory_path.display()
        )));
    }
    from_reader(
        &reader,
        Some(dir.path().to_path_buf()),
        SnapshotMemory::File(memory_file),
    )
}

/// Decode and check the VM sections of `reader` (one vCPU state per configured vCPU).
/// `dir` is the snapshot directory (None: the state came from a migration).
pub fn from_reader(
    reader: &StateReader,
    dir: Option<PathBuf>,
    memory: SnapshotMemory,
) -> Result<LoadedSnapshot, VmSnapshotError> {
    let meta: SnapshotMeta = reader.get(META)?;
    let kvm_vm: VmKvmState = reader.get(KVM_VM)?;
    let vcpus = (0..meta.config.vcpus as usize)
        .map(|id| reader.get::<VcpuState>(&vcpu_section(id)))
        .collect::<Result<Vec<_>, _>>()?;
    if reader.contains(&vcpu_section(vcpus.len())) {
        return Err(VmSnapshotError::Mismatch(format!(
            "it holds more vCPU states than its configuration's {} vCPUs",
            meta.config.vcpus
        )));
    }
    let legacy: LegacyDevicesState = reader.get(LEGACY)?;
    let virtio: Vec<VirtioPciState> = reader.get(VIRTIO)?;
    let vmgenid = if reader.contains(VMGENID) {
        Some(reader.get::<GenerationId>(VMGENID)?)
    } else {
        None
    };
    Ok(LoadedSnapshot {
        dir,
        meta,
        kvm_vm,
        vcpus,
        legacy,
        virtio,
        memory,
        vmgenid,
        new_identity: false,
        start_gate: None,
        prebuilt: None,
    })
}

impl LoadedSnapshot {
    /// Check that the memory layout is the one `ranges` (from the configuration) gives, and
    /// return each region's offset in the memory file.
    pub fn file_offsets(
        &self,
        ranges: &[(vm_memory::GuestAddress, usize)],
    ) -> Result<Vec<u64>, VmSnapshotError> {
        let same = ranges.len() == self.meta.memory.len()
            && ranges
                .iter()
                .zip(&self.meta.memory)
                .all(|(r, m)| r.0 .0 == m.guest_addr && r.1 as u64 == m.size);
        if !same {
            return Err(VmSnapshotError::Mismatch(
                "its memory layout differs from the one its configuration gives".to_string(),
            ));
        }
        Ok(self.meta.memory.iter().map(|m| m.file_offset).collect())
    }
}

/// Merge the diff snapshot `diff_dir` with its base (a full snapshot) into the new full
/// snapshot `out_dir`: the base's memory with the diff's pages on top, and the diff's state.
/// Neither input changes; `out_dir` appears complete or not at all.
pub fn merge(diff_dir: &Path, out_dir: &Path) -> Result<SnapshotSummary, VmSnapshotError> {
    let start = Instant::now();
    let diff = SnapshotDir::open(diff_dir)?;
    let reader = StateReader::open(&diff.state_path())?;
    if !reader.contains(MEMORY_DIFF) {
        return Err(VmSnapshotError::Mismatch(format!(
            "{} is already a full snapshot: restore it directly",
            diff_dir.display()
        )));
    }
    let memory_diff: MemoryDiff = reader.get(MEMORY_DIFF)?;
    let base = SnapshotDir::open(&memory_diff.base)?;
    if StateReader::open(&base.state_path())?.contains(MEMORY_DIFF) {
        return Err(VmSnapshotError::Mismatch(format!(
            "its base {} is itself a diff: merge that one first, then this one onto the result",
            memory_diff.base.display()
        )));
    }
    let out = SnapshotDir::create(out_dir)?;
    let copied = snapshot::copy_sparse(&base.memory_path(), &out.memory_path())?;
    snapshot::merge_diff(&out.memory_path(), &diff.memory_path(), &memory_diff.pages)?;
    let mut state = StateWriter::new();
    for name in reader.names().filter(|n| *n != MEMORY_DIFF) {
        state.put_raw(name, reader.get_raw(name)?)?;
    }
    state.write_to(&out.state_path())?;
    let state_bytes = std::fs::metadata(out.state_path())
        .map(|m| m.len())
        .unwrap_or(0);
    let committed = out.commit()?;
    Ok(SnapshotSummary {
        path: committed.path().to_path_buf(),
        memory_bytes_written: copied + memory_diff.pages.page_count() * snapshot::PAGE_SIZE,
        zero_pages_skipped: 0,
        state_bytes,
        write_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}
